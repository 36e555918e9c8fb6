"""Checkpoint conversion between every supported layout: safetensors, tf_model.h5, pytorch_model.bin, NVlabs .pth.

``convert_checkpoint(src, dst, format=..., dtype=...)`` reads ``src`` (a checkpoint directory, a weight file with its
``config.json`` beside it, or an original NVlabs ``.pth``), checks every tensor against the config, and writes a
complete checkpoint directory ``dst``: ``config.json``, the weights in ``format`` and the tokenizer and preprocessor
files. Only numpy, safetensors and h5py are used: no tensor framework is imported, and the NVlabs file is read by
the restricted unpickler of :mod:`groupvit_core.checkpoint`.

Conversions are lossless: every tensor keeps its name, dtype, shape and bits (BatchNorm statistics and
``num_batches_tracked`` included) unless ``dtype`` asks for float16 / bfloat16 / float32, which casts the floating
tensors only. bfloat16 sources are read as float32 (exact) and written as float32 unless ``dtype="bfloat16"``;
tf_model.h5 cannot hold bfloat16. The output directory is assembled in a temporary directory beside ``dst`` and
renamed into place, so a failure leaves no partial ``dst``; with ``overwrite=True`` an existing ``dst`` is replaced
only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import checkpoint, nvlabs
from .config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig, load_any_config, CONFIG_NAME
from .loading import WEIGHT_FILES
from .weights import AnyConfig, canonical_to_h5, check_state, h5_to_canonical, spec_table, weight_specs

FORMATS = tuple(WEIGHT_FILES)  # ('safetensors', 'bin', 'h5')
DTYPES = ("float32", "float16", "bfloat16")
# Files copied from a checkpoint directory source when present.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
PREPROCESSOR_FILES = ("preprocessor_config.json",)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Source:
    """A checkpoint read into memory: config, canonical state, and where it came from."""

    config: AnyConfig
    state: Dict[str, np.ndarray]
    format: str  # 'safetensors', 'bin', 'h5' or 'nvlabs'
    weights_path: str
    directory: Optional[str]  # where tokenizer / preprocessor files may be found (None for NVlabs)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _weights_file(directory: str) -> str:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "tf_model.h5"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    pth = sorted(n for n in os.listdir(directory) if n.endswith((".pth", ".pt")))
    hint = f"; to convert an NVlabs checkpoint pass the file itself ({os.path.join(directory, pth[0])})" if pth else ""
    raise FileNotFoundError(
        f"{directory}: unknown checkpoint layout: no model.safetensors, pytorch_model.bin or tf_model.h5{hint}"
    )


def _unknown_layout(path: str, names: List[str]) -> ValueError:
    sample = ", ".join(sorted(names)[:4]) or "(no tensors)"
    return ValueError(
        f"{path}: unknown checkpoint layout: tensor names such as {sample} are neither GroupViT "
        "(Hugging Face) names nor NVlabs GroupViT names"
    )


def read_source(src: PathLike, *, vision_heads: Optional[int] = None, text_heads: Optional[int] = None) -> Source:
    """Read any supported checkpoint into a :class:`Source` whose state is checked against its config."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    weights_path = _weights_file(src) if os.path.isdir(src) else src
    directory = os.path.dirname(os.path.abspath(weights_path))
    if weights_path.endswith(".index.json"):
        raw, fmt = checkpoint.load_state(weights_path)
        nvlabs_config = None
    else:
        fmt = checkpoint.sniff_format(weights_path)
        nvlabs_config = None
        if fmt == "bin":
            # read_nvlabs_checkpoint also takes the state dict out of {'model': ..., 'config': ...} files.
            raw, nvlabs_config = nvlabs.read_nvlabs_checkpoint(weights_path)
        else:
            raw, _ = checkpoint.load_state(weights_path)

    raw = {name: np.asarray(value) for name, value in raw.items()}  # 0-d bfloat16 may be read as a numpy scalar
    if fmt != "h5" and nvlabs.looks_like_nvlabs(raw):
        result = nvlabs.convert_nvlabs_state(raw, nvlabs_config, vision_heads=vision_heads, text_heads=text_heads,
                                             source=weights_path)
        return Source(result.config, result.state, "nvlabs", weights_path, None, result.dropped, result.notes)

    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        if fmt == "h5" or any(name.startswith(nvlabs.HF_PREFIXES) or name == "logit_scale" for name in raw):
            raise FileNotFoundError(f"{weights_path}: no {CONFIG_NAME} beside the weights (needed to read them)")
        raise _unknown_layout(weights_path, list(raw))
    config = load_any_config(config_path)
    table = spec_table(config)
    if fmt == "h5":
        if not any(spec.h5_name in raw for spec in table.values()):
            raise _unknown_layout(weights_path, list(raw))
        state = h5_to_canonical(raw, config, source=weights_path)
    else:
        if not any(name in table for name in raw):
            raise _unknown_layout(weights_path, list(raw))
        state = dict(raw)
    check_state(state, config, source=weights_path)
    return Source(config, state, fmt, weights_path, directory)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(array: np.ndarray, bfloat16: bool = False) -> str:
    return "bfloat16" if bfloat16 and array.dtype.kind == "f" else array.dtype.name


def cast_state(state: Mapping[str, np.ndarray], dtype: Optional[str]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Cast floating tensors to float32 / float16 (integer tensors untouched); returns (state, overflow warnings).

    bfloat16 is left to the writers (numpy has no bfloat16); None keeps every dtype.
    """
    if dtype not in (None, "bfloat16", "float32", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    warnings: List[str] = []
    if dtype in (None, "bfloat16"):
        return dict(state), warnings
    out = {}
    for name, array in state.items():
        if array.dtype.kind == "f" and array.dtype != np.dtype(dtype):
            with np.errstate(over="ignore"):
                cast = array.astype(dtype)
            if np.isfinite(array).all() and not np.isfinite(cast).all():
                warnings.append(f"{name} overflows {dtype} (values beyond its range became inf)")
            out[name] = cast
        else:
            out[name] = array
    return out, warnings


def _write_weights(directory: str, config: AnyConfig, state: Dict[str, np.ndarray], format: str,
                   dtype: Optional[str]) -> str:
    path = os.path.join(directory, WEIGHT_FILES[format])
    writer_dtype = "bfloat16" if dtype == "bfloat16" else None
    if format == "safetensors":
        checkpoint.write_safetensors(path, state, metadata={"format": "pt"}, dtype=writer_dtype)
    elif format == "bin":
        checkpoint.write_torch_bin(path, state, dtype=writer_dtype)
    else:
        checkpoint.write_h5(path, canonical_to_h5(state, config))
    return path


def _ordered_state(source: Source, fill_counters: bool) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """The state in the reference's registration order; absent BatchNorm counters added as 0 if asked."""
    state: Dict[str, np.ndarray] = {}
    filled: List[str] = []
    for spec in weight_specs(source.config):
        if spec.name in source.state:
            state[spec.name] = source.state[spec.name]
        elif fill_counters and spec.name.endswith("num_batches_tracked"):
            state[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
            filled.append(spec.name)
    return state, filled


def _fsync(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _copy_present(names: Tuple[str, ...], source_dir: Optional[str], target_dir: str) -> List[str]:
    """Copy those of ``names`` that exist in ``source_dir``; returns the copied names."""
    present = [n for n in names if source_dir and os.path.isfile(os.path.join(source_dir, n))]
    for name in present:
        target = os.path.join(target_dir, name)
        shutil.copyfile(os.path.join(source_dir, name), target)
        _fsync(target)
    return present


def _write_processors(directory: str, source: Source) -> List[str]:
    """Tokenizer and preprocessor files: copied from a directory source, else the defaults; returns notes.

    Defaults: the packaged CLIP tokenizer; the preprocessor with CLIP statistics (the Hub's), or ImageNet
    statistics for an NVlabs source (what the original code normalises with).
    """
    from .image import GroupViTImageProcessor
    from .tokenizer import GroupViTTokenizer

    notes: List[str] = []
    copied: List[str] = []
    if not isinstance(source.config, GroupViTVisionConfig):  # has a text tower
        present = _copy_present(TOKENIZER_FILES, source.directory, directory)
        if not present:
            GroupViTTokenizer().save_pretrained(directory)
        copied += present
    if not isinstance(source.config, GroupViTTextConfig):  # has a vision tower
        present = _copy_present(PREPROCESSOR_FILES, source.directory, directory)
        if not present:
            preset = "imagenet" if source.format == "nvlabs" else "clip"
            GroupViTImageProcessor.preset(preset).save_pretrained(directory)
            if preset == "imagenet":
                notes.append("preprocessor: ImageNet mean/std, as the NVlabs code normalises")
        copied += present
    if copied:
        notes.append("copied " + ", ".join(copied) + " from the source")
    return notes


@contextlib.contextmanager
def _staging_directory(dst: str) -> Iterator[str]:
    """A fresh temporary directory beside ``dst``; removed unless it was moved into place."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(directory: str) -> None:
    """mkdtemp / mkstemp create owner-only entries; give the output the permissions a plain mkdir / open would."""
    mask = _current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~mask)


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``dst``; an old ``dst`` is set aside first and deleted only afterwards."""
    _normal_permissions(tmp)
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    _check_destination(dst, overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".old", dir=parent)
    os.rmdir(backup)
    os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_destination(dst: str, overwrite: bool) -> None:
    if os.path.lexists(dst):
        if os.path.islink(dst):
            raise FileExistsError(f"{dst} is a symbolic link; give the directory itself or another destination")
        if not os.path.isdir(dst):
            raise FileExistsError(f"{dst} exists and is not a directory; choose another destination")
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path != directory and os.path.commonpath([path, directory]) == directory


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------


def describe_config(config: AnyConfig) -> str:
    """One line naming the model's sizes: '12 text layers x 256 (4 heads), vision stages [6, 3, 3] x 384 ...'."""
    parts = []
    text = config.text_config if isinstance(config, GroupViTConfig) else (
        config if isinstance(config, GroupViTTextConfig) else None)
    vision = config.vision_config if isinstance(config, GroupViTConfig) else (
        config if isinstance(config, GroupViTVisionConfig) else None)
    if text is not None:
        parts.append(f"text {text.num_hidden_layers} layers x {text.hidden_size} ({text.num_attention_heads} heads, "
                     f"vocab {text.vocab_size}, {text.max_position_embeddings} positions, eos {text.eos_token_id})")
    if vision is not None:
        parts.append(f"vision depths {vision.depths} x {vision.hidden_size} ({vision.num_attention_heads} heads, "
                     f"group tokens {vision.num_group_tokens} -> groups {vision.num_output_groups}, "
                     f"{vision.image_size}px / patch {vision.patch_size})")
    if isinstance(config, GroupViTConfig):
        parts.append(f"projection {config.projection_intermediate_dim} -> {config.projection_dim}")
    return "; ".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable lines for a :func:`convert_checkpoint` summary."""
    lines = [
        f"converted {summary['source']} ({summary['format_in']}) -> {summary['destination']} "
        f"({summary['format_out']}: {summary['weights_file']})",
        f"  tensors:    {summary['num_tensors']} ({summary['num_parameters']:,} parameters, "
        f"{summary['num_elements']:,} values with buffers)",
        f"  dtype:      {', '.join(summary['dtype_in'])} -> {', '.join(summary['dtype_out'])}",
        f"  weights:    {summary['bytes']:,} bytes",
        f"  model:      {summary['model_type']}: {summary['config_summary']}",
        f"  files:      {', '.join(summary['files'])}",
    ]
    for note in summary.get("notes", []):
        lines.append(f"  note:       {note}")
    for warning in summary.get("warnings", []):
        lines.append(f"  warning:    {warning}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------


class _Progress:
    """A step bar on stderr (tqdm), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    def stage(self, description: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(description)
            self._bar.refresh()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def convert_checkpoint(src: PathLike, dst: PathLike, format: str = "safetensors", dtype: Optional[str] = None,
                       overwrite: bool = False, progress: bool = False, *, vision_heads: Optional[int] = None,
                       text_heads: Optional[int] = None) -> Dict[str, Any]:
    """Convert ``src`` into the checkpoint directory ``dst`` holding weights in ``format``; returns a summary dict.

    ``src``: a checkpoint directory (model.safetensors, pytorch_model.bin or tf_model.h5 with config.json), one of
    those weight files (config.json beside it), or an NVlabs ``.pth``. ``format``: 'safetensors', 'h5' or 'bin'.
    ``dtype``: None (keep), 'float32', 'float16' or 'bfloat16' (floating tensors only). ``progress``: show a bar on
    stderr. ``vision_heads`` / ``text_heads`` override the head counts of an NVlabs source (see groupvit_core.nvlabs).

    Raises FileNotFoundError (missing ``src``), FileExistsError (``dst`` exists and ``overwrite`` is False),
    ValueError (unknown layout, missing / unexpected / mis-shaped tensors, bad arguments).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {list(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if format == "h5" and dtype == "bfloat16":
        raise ValueError("tf_model.h5 cannot store bfloat16; use --format safetensors or bin, or another dtype")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    _check_destination(dst, overwrite)
    if _inside(src, dst):
        raise ValueError(f"{src} lies inside {dst}, which the conversion would replace; choose another destination")

    bar = _Progress(progress, total=4)
    try:
        bar.stage(f"reading {os.path.basename(src.rstrip(os.sep)) or src}")
        source = read_source(src, vision_heads=vision_heads, text_heads=text_heads)
        bar.advance()

        bar.stage("casting" if dtype else "checking")
        state, filled = _ordered_state(source, fill_counters=format != "h5")
        state, warnings = cast_state(state, dtype)
        bar.advance()

        with _staging_directory(dst) as tmp:
            bar.stage(f"writing {WEIGHT_FILES[format]}")
            source.config.save_pretrained(tmp)
            weights_path = _write_weights(tmp, source.config, state, format, dtype)
            bar.advance()
            bar.stage("writing tokenizer and preprocessor")
            notes = list(source.notes) + _write_processors(tmp, source)
            if filled:
                notes.append(f"{len(filled)} BatchNorm num_batches_tracked counter(s) absent from the source "
                             "(Keras keeps none) written as 0, as PyTorch checkpoints carry them")
            files = sorted(os.listdir(tmp))
            weight_bytes = os.path.getsize(weights_path)
            _publish(tmp, dst, overwrite)
            bar.advance()
    finally:
        bar.close()

    table = spec_table(source.config)
    bf16 = dtype == "bfloat16"
    return {
        "source": src,
        "destination": dst,
        "source_file": source.weights_path,
        "format_in": source.format,
        "format_out": format,
        "weights_file": WEIGHT_FILES[format],
        "num_tensors": len(state),
        "num_parameters": int(sum(a.size for n, a in state.items() if not table[n].is_buffer)),
        "num_elements": int(sum(a.size for a in state.values())),
        "bytes": weight_bytes,
        "dtype_in": sorted({a.dtype.name for a in source.state.values()}),
        "dtype_out": sorted({_dtype_name(a, bf16) for a in state.values()}),
        "model_type": source.config.model_type,
        "config": source.config.to_dict(),
        "config_summary": describe_config(source.config),
        "dropped": list(source.dropped),
        "notes": notes,
        "warnings": warnings,
        "files": files,
    }
