"""Checkpoint files as plain ``{name: numpy array}`` dicts: safetensors, Keras-2 ``tf_model.h5`` and torch zip files.

Numpy-only: nothing here imports torch, tensorflow or keras, and no pickled code is ever executed.

* safetensors (``model.safetensors``): the reader parses and validates the header itself (numpy has no
  bfloat16, so BF16 tensors are returned widened to float32, which is exact); the writer uses
  ``safetensors.numpy`` with ``{"format": "pt"}`` metadata so that transformers accepts the file, and writes
  the header by hand only when ``dtype="bfloat16"`` is asked for.
* ``tf_model.h5`` in the Hugging Face / Keras-2 layout: root attribute ``layer_names`` (``['groupvit']``), each
  layer group carries ``weight_names`` such as ``tf_group_vi_t_model/groupvit/text_model/.../kernel:0`` and the
  dataset lives at ``group[weight_name]``.  Keys are returned without the model scope, the ``groupvit/``
  segment and the ``:0`` suffix: ``text_model/embeddings/token_embedding/weight``.  libhdf5 can hang
  (uninterruptibly) or crash on a damaged file, so the file is parsed in a child process with a time limit;
  external and virtual datasets and links to other files are refused.
* torch zip files (``pytorch_model.bin``, NVlabs ``.pth``, torch >= 1.6): ``<archive>/data.pkl`` is read by an
  unpickler that resolves only ``collections.OrderedDict``, the tensor-rebuild helpers and the storage types;
  every other global (an OmegaConf config, ``argparse.Namespace``, numpy scalars in optimizer state, or
  ``os.system`` in a malicious file) becomes an inert :class:`UnresolvedGlobal` that records its name and
  arguments and is never imported or called.  Tensors come back as numpy arrays (bfloat16 as float32);
  the bytes they copy out of the storages are bounded in total, not only per tensor.
  The writer emits the pickle opcodes directly, so ``torch.load(path, weights_only=True)`` reads the file
  although torch is never imported here.

Every reader checks that the file exists, rejects truncated or corrupt files and sizes that the file cannot
hold before allocating anything (OSError / ValueError naming the file), and rejects duplicate keys.  Every
writer is atomic (:func:`atomic_write` / :func:`atomic_path`): a failed write leaves any old file intact.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import io
import json
import math
import os
import pickle
import pickletools
import reprlib
import signal
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import h5py
import numpy as np
import safetensors.numpy
from numpy.lib import format as npy_format

from groupvit_core.io_utils import PathLike, atomic_path, parse_json_bytes, read_json_file

__all__ = [
    "UnresolvedGlobal",
    "atomic_path",
    "atomic_write",
    "load_state",
    "read_h5",
    "read_safetensors",
    "read_torch_bin",
    "read_torch_pickle",
    "write_h5",
    "write_safetensors",
    "write_torch_bin",
]

StateDict = Dict[str, np.ndarray]

# Caps on metadata (not on tensor data, which is checked against the file size instead).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_MAX_PICKLE_BYTES = 256 * 1024 * 1024
# A stride-0 (expanded) tensor may be larger than its storage; materialising a huge one is refused.
_MAX_EXPANDED_BYTES = 256 * 1024 * 1024
# Deflate cannot expand more than ~1032:1, so a compressed zip member claiming more is corrupt or a bomb.
_MAX_DEFLATE_RATIO = 1100
_FLOAT_DTYPES = (None, "float32", "float16", "bfloat16")


def atomic_write(path: PathLike, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` on a temporary file next to ``path``, then move it over ``path``.

    If ``writer`` raises, the temporary file is removed and any existing ``path`` is left untouched.
    """
    with atomic_path(path) as tmp:
        writer(tmp)


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def _existing_file(path: PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return path


def _no_duplicate_pairs(path: str) -> Callable[[Iterable[Tuple[str, Any]]], dict]:
    def hook(pairs):
        result = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"{path}: duplicate key {key!r} in JSON header")
            result[key] = value
        return result

    return hook


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32; exact, NaN payloads kept."""
    widened = np.array(bits, dtype=np.uint32)  # an array even for 0-d input (a shift would give a scalar)
    widened <<= 16
    return widened.view(np.float32)


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round to bfloat16 like torch: nearest, ties to even; every NaN becomes the quiet NaN 0x7FC0."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    bits = flat.view(np.uint32).astype(np.uint64)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    rounded[np.isnan(flat)] = 0x7FC0
    return rounded.reshape(np.shape(values))


def _prepare_tensors(tensors: Mapping[str, Any], dtype: Optional[str], what: str) -> Dict[str, np.ndarray]:
    """Validate a name->array mapping and return little-endian, C-contiguous numpy arrays."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what}: tensors must be a mapping of name -> array, got {type(tensors).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    prepared = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what}: tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.kind not in "fiucb":
            raise TypeError(f"{what}: tensor {name!r} has non-numeric dtype {array.dtype}")
        if dtype in ("float32", "float16") and array.dtype.kind == "f":
            array = array.astype(dtype)
        prepared[name] = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return prepared


# ----------------------------------------------------------------------------------------------------------
# safetensors

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits, widened to float32 after reading
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items() if k != "BF16"}


_MAX_NDIM = 32  # safetensors tensors may have at most this many dimensions here (numpy allows 64)
_MAX_DIM = 2**62  # bound on each dimension and on the byte size implied by the nonzero dimensions


def _read_safetensors_header(handle, path: str, file_size: int) -> Tuple[int, list]:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise OSError(f"{path}: truncated safetensors file ({file_size} bytes)")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > file_size - 8 or header_size > _MAX_SAFETENSORS_HEADER:
        raise OSError(f"{path}: safetensors header claims {header_size} bytes but the file has {file_size}")
    raw = handle.read(header_size)
    header = parse_json_bytes(raw, path, "safetensors header", object_pairs_hook=_no_duplicate_pairs(path))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_size
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: malformed header entry for {name!r}: {info!r}")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {reprlib.repr(info['dtype'])}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(n) is int and 0 <= n < _MAX_DIM for n in shape)):
            raise ValueError(f"{path}: tensor {name!r} has invalid shape {reprlib.repr(shape)}")
        if len(shape) > _MAX_NDIM:
            raise ValueError(f"{path}: tensor {name!r} has {len(shape)} dimensions; at most {_MAX_NDIM} are supported")
        # numpy refuses shapes whose nonzero dims overflow even when another dim is 0 (a zero-element tensor).
        if math.prod(n for n in shape if n) * dtype.itemsize >= _MAX_DIM:
            raise ValueError(f"{path}: tensor {name!r} has an impossibly large shape {reprlib.repr(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise ValueError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise OSError(f"{path}: tensor {name!r} spans bytes {begin}..{end} but the data section has {data_size}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"{path}: tensor {name!r} of shape {shape} {info['dtype']} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes but occupies {end - begin}"
            )
        entries.append((name, info["dtype"], tuple(shape), begin, end))
    position = 0
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != position:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != data_size:
        raise ValueError(f"{path}: {data_size - position} bytes after the last tensor (corrupt file)")
    return 8 + header_size, entries


def read_safetensors(path: PathLike) -> StateDict:
    """Read a ``.safetensors`` file into ``{name: array}`` (BF16 tensors are returned as float32)."""
    path = _existing_file(path)
    file_size = os.path.getsize(path)
    tensors: StateDict = {}
    with open(path, "rb") as handle:
        data_start, entries = _read_safetensors_header(handle, path, file_size)
        for name, dtype_name, shape, begin, end in entries:
            array = np.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype_name])
            handle.seek(data_start + begin)
            if end > begin and handle.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise OSError(f"{path}: truncated while reading tensor {name!r}")
            if dtype_name == "BF16":
                array = _bfloat16_bits_to_float32(array)
            tensors[name] = array
    return tensors


def _write_safetensors_by_hand(path: str, tensors: Dict[str, Tuple[str, np.ndarray]], metadata: dict) -> None:
    """Write ``{name: (safetensors dtype, contiguous array)}`` in the safetensors layout.

    Tensors go in order of decreasing item size and the header is padded to 8 bytes, so every tensor is
    naturally aligned for readers that map the file.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n][1].itemsize, n))
    header: Dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype_name, array = tensors[name]
        span = [offset, offset + array.nbytes]
        header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": span}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in order:
            handle.write(memoryview(tensors[name][1].reshape(-1).view(np.uint8)))


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any],
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Optional[str] = None,
) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically.

    ``metadata`` defaults to ``{"format": "pt"}`` (what transformers expects).  ``dtype`` in
    ``{"float32", "float16", "bfloat16"}`` converts floating-point tensors only (integer tensors such as
    ``num_batches_tracked`` keep their type); bfloat16 rounds to nearest-even like torch.
    """
    path = os.fspath(path)
    arrays = _prepare_tensors(tensors, dtype, path)
    metadata = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"{path}: safetensors metadata must map str -> str, got {metadata!r}")
    for name, array in arrays.items():
        if array.dtype not in _NUMPY_TO_SAFETENSORS:
            raise TypeError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
    if dtype == "bfloat16":
        typed = {}
        for name, array in arrays.items():
            if array.dtype.kind == "f":
                typed[name] = ("BF16", _float32_to_bfloat16_bits(array))
            else:
                typed[name] = (_NUMPY_TO_SAFETENSORS[array.dtype], array)
        atomic_write(path, lambda tmp: _write_safetensors_by_hand(tmp, typed, metadata))
        return
    atomic_write(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp, metadata=metadata or None))


# ----------------------------------------------------------------------------------------------------------
# Keras-2 HDF5 (tf_model.h5)

_KERAS_HEADER_LIMIT = 64512  # HDF5 object-header limit that Keras splits string-list attributes at


def _read_string_list_attr(group, name: str) -> Optional[list]:
    """Read a Keras string-list attribute, joining the ``name0``, ``name1``... chunks Keras writes when large."""
    if name in group.attrs:
        values = list(np.atleast_1d(group.attrs[name]))
    elif f"{name}0" in group.attrs:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(np.atleast_1d(group.attrs[f"{name}{chunk}"]))
            chunk += 1
    else:
        return None
    result = []
    for value in values:
        if isinstance(value, (bytes, np.bytes_)):
            value = bytes(value).decode("utf-8")
        if not isinstance(value, str):
            raise ValueError(f"attribute {name!r} of {group.name!r} holds a non-string {value!r}")
        result.append(value)
    return result


def _write_string_list_attr(group, name: str, values: list) -> None:
    """Write a string-list attribute the way Keras 2 ``save_attributes_to_hdf5_group`` does."""
    encoded = [v.encode("utf-8") for v in values]
    as_array = np.asarray(encoded)
    chunks = 1
    while any(c.nbytes > _KERAS_HEADER_LIMIT for c in np.array_split(as_array, chunks)):
        chunks += 1
    if chunks == 1:
        group.attrs[name] = encoded
    else:
        for index, chunk in enumerate(np.array_split(as_array, chunks)):
            group.attrs[f"{name}{index}"] = [bytes(v) for v in chunk]


def _strip_keras_weight_name(weight_name: str, path: str) -> str:
    """``tf_group_vi_t_model/groupvit/text_model/x/kernel:0`` -> ``text_model/x/kernel``."""
    name = weight_name
    head, sep, tail = name.rpartition(":")
    if sep and tail.isdigit():
        name = head
    parts = name.split("/")
    if "groupvit" not in parts[:-1]:
        raise ValueError(f"{path}: weight name {weight_name!r} has no 'groupvit/' scope segment")
    return "/".join(parts[parts.index("groupvit") + 1 :])


def _check_h5_dataset(dataset, path: str, weight_name: str) -> None:
    """Reject datasets whose data lives outside the file, or whose declared size the file cannot hold, before
    anything is allocated or read."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == getattr(h5py.h5d, "VIRTUAL", -1):
        raise OSError(
            f"{path}: weight {weight_name!r} is a virtual dataset whose data comes from external files; "
            "a checkpoint may not read other files"
        )
    if plist.get_external_count():
        raise OSError(
            f"{path}: weight {weight_name!r} keeps its data in external raw files; a checkpoint may not read "
            "other files"
        )
    if dataset.dtype.kind not in "fiub":
        raise ValueError(f"{path}: weight {weight_name!r} has non-numeric dtype {dataset.dtype}")
    if dataset.shape is None:
        raise ValueError(f"{path}: weight {weight_name!r} has an empty (null) dataspace")
    nbytes = math.prod(dataset.shape) * dataset.dtype.itemsize
    if nbytes == 0 or layout == h5py.h5d.COMPACT:  # compact data lives in the object header (< 64 KiB)
        return
    stored = dataset.id.get_storage_size()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        if offset is None or stored != nbytes or offset + nbytes > os.path.getsize(path):
            raise OSError(f"{path}: weight {weight_name!r} ({nbytes} bytes) is not fully stored in the file")
    elif nbytes > _MAX_DEFLATE_RATIO * stored + (1 << 20):
        raise ValueError(f"{path}: weight {weight_name!r} claims {nbytes} bytes from {stored} stored bytes")


_MAX_H5_SOFT_LINKS = 8  # Keras writes none; HDF5 itself stops at 16


def _get_h5_local(root, start, name: str, path: str, what: str, depth: int = 0):
    """The object at ``name`` (relative to group ``start``, or absolute), or None if there is none.

    Every path component is looked up as a link first: hard links are followed, soft links are resolved the same
    way (so they too stay inside the file), and external or user-defined links are refused (OSError), so the file
    cannot make the reader open other files.
    """
    current = root if name.startswith("/") else start
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if not isinstance(current, h5py.Group):
            return None
        link = current.get(part, getlink=True)
        if link is None:
            return None
        if isinstance(link, h5py.HardLink):
            current = current[part]
        elif isinstance(link, h5py.SoftLink):
            if depth >= _MAX_H5_SOFT_LINKS:
                raise ValueError(f"{path}: {what} goes through more than {_MAX_H5_SOFT_LINKS} soft links")
            current = _get_h5_local(root, current, link.path, path, what, depth + 1)
        elif isinstance(link, h5py.ExternalLink):
            raise OSError(
                f"{path}: {what} is an external link to {link.filename!r}:{link.path!r}; "
                "a checkpoint may not read other files"
            )
        else:
            raise OSError(f"{path}: {what} is a {type(link).__name__} (external or user-defined link); refused")
    return current


def _iter_h5_in_process(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Parse ``tf_model.h5`` in this process, yielding ``(stripped key, array)``.

    :func:`read_h5` runs this in a child process, because libhdf5 may spin forever or crash on a damaged file.
    """
    if not h5py.is_hdf5(path):
        raise OSError(f"{path}: not an HDF5 file")
    keys = set()
    try:
        with h5py.File(path, "r") as handle:
            layer_names = _read_string_list_attr(handle, "layer_names")
            if layer_names is None:
                raise OSError(f"{path}: no 'layer_names' attribute; not a Keras-2 tf_model.h5 weights file")
            for layer_name in layer_names:
                group = _get_h5_local(handle, handle, layer_name, path, f"layer group {layer_name!r}")
                if not isinstance(group, h5py.Group):
                    raise ValueError(f"{path}: layer group {layer_name!r} listed in layer_names is missing")
                for weight_name in _read_string_list_attr(group, "weight_names") or []:
                    key = _strip_keras_weight_name(weight_name, path)
                    if key in keys:
                        raise ValueError(f"{path}: duplicate weight {key!r} (from {weight_name!r})")
                    keys.add(key)
                    dataset = _get_h5_local(handle, group, weight_name, path, f"weight {weight_name!r}")
                    if not isinstance(dataset, h5py.Dataset):
                        raise ValueError(f"{path}: weight {weight_name!r} has no dataset in group {layer_name!r}")
                    _check_h5_dataset(dataset, path, weight_name)
                    array = np.asarray(dataset[()])
                    yield key, array.astype(array.dtype.newbyteorder("="), copy=False)
    except Exception as error:  # h5py surfaces corruption as OSError/KeyError/RuntimeError without the path
        if isinstance(error, (ValueError, OSError)) and path in str(error):
            raise
        raise OSError(f"{path}: corrupt HDF5 file ({type(error).__name__}: {error})") from error


def _read_h5_in_process(path: str) -> StateDict:
    """:func:`read_h5` without the child process (the child's parser; see the warning there)."""
    return dict(_iter_h5_in_process(path))


# tf_model.h5 is parsed in a child process: libhdf5 can spin forever, uninterruptibly, on a damaged file (seen on a
# damaged global heap), and can crash on others.  The child gets this much wall-clock (and CPU) time:
_H5_TIMEOUT_S = 60.0
_H5_TIMEOUT_PER_100MB_S = 5.0
_H5_IN_CHILD = True  # False: parse in this process (only for files known to be sound, e.g. in tests)
# The child runs in isolated mode (-I: no PYTHON* variables, no user site, not the caller's __main__) with the
# parent's sys.path, imports only this module (numpy, h5py; never a framework), and hands the arrays back as .npy
# records in a private temporary directory: nothing it returns is unpickled.
_H5_CHILD_BOOTSTRAP = (
    "import json, os, sys\n"
    "with open(os.path.join(sys.argv[1], 'request.json'), encoding='utf-8') as handle:\n"
    "    request = json.load(handle)\n"
    "sys.path[:] = request['sys_path']\n"
    "from groupvit_core.checkpoint import _h5_child_main\n"
    "sys.exit(_h5_child_main(sys.argv[1], request))\n"
)


def _h5_time_limit(file_size: int) -> float:
    return _H5_TIMEOUT_S + _H5_TIMEOUT_PER_100MB_S * file_size / 100e6


def _h5_child_command(workdir: str) -> list:
    return [sys.executable, "-I", "-c", _H5_CHILD_BOOTSTRAP, workdir]


def _child_sys_path() -> list:
    """The parent's sys.path, with the directory holding this package first (so the child imports this code)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [package_parent] + [entry for entry in sys.path if isinstance(entry, str) and entry != package_parent]


def _limit_own_cpu_time(seconds: float) -> None:
    """Make the kernel kill this process after ``seconds`` of CPU time, even if its parent is gone (POSIX)."""
    try:
        import resource
    except ImportError:  # Windows: the parent's wall-clock limit alone applies
        return
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would otherwise dump core
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(math.ceil(seconds)) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass


def _h5_child_main(workdir: str, request: dict) -> int:
    """Entry point of :func:`read_h5`'s child process: parse ``request['path']``, write ``arrays.npy`` (one .npy
    record per tensor) and then ``result.json`` (the names, or the error type and message) into ``workdir``."""
    _limit_own_cpu_time(request["seconds"])
    path = request["path"]
    try:
        names = []
        with open(os.path.join(workdir, "arrays.npy"), "wb") as handle:
            for key, array in _iter_h5_in_process(path):
                names.append(key)
                npy_format.write_array(handle, array, allow_pickle=False)
        result: Dict[str, Any] = {"names": names}
    except (ValueError, OSError) as error:
        result = {"error": type(error).__name__, "message": str(error)}
    with open(os.path.join(workdir, "result.json.tmp"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    os.replace(os.path.join(workdir, "result.json.tmp"), os.path.join(workdir, "result.json"))
    return 0


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _run_h5_child(path: str, workdir: str, seconds: float) -> None:
    """Run the child on ``path``; OSError naming the file if it runs out of time or dies without a result."""
    with open(os.path.join(workdir, "request.json"), "w", encoding="utf-8") as handle:
        json.dump({"path": path, "sys_path": _child_sys_path(), "seconds": seconds}, handle)
    with open(os.path.join(workdir, "stderr.txt"), "wb") as stderr:
        try:
            process = subprocess.Popen(_h5_child_command(workdir), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
        except OSError as error:
            raise OSError(f"{path}: cannot start the process that parses the file ({error})") from error
        try:
            returncode = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            raise OSError(f"{path}: took longer than {seconds:.0f} s to parse; the file is probably damaged") from None
        finally:
            if process.poll() is None:  # timed out, or interrupted (KeyboardInterrupt) while waiting
                process.kill()
                process.wait()
    if returncode == -getattr(signal, "SIGXCPU", 0):
        raise OSError(f"{path}: took longer than {seconds:.0f} s of CPU time to parse; the file is probably damaged")
    if returncode != 0 or not os.path.isfile(os.path.join(workdir, "result.json")):
        with open(os.path.join(workdir, "stderr.txt"), "rb") as handle:
            lines = handle.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        detail = f": {lines[-1][-300:]}" if lines else ""
        raise OSError(f"{path}: the process parsing the file died ({_describe_exit(returncode)}{detail})")


def _collect_h5_child_result(path: str, workdir: str) -> StateDict:
    with open(os.path.join(workdir, "result.json"), "rb") as handle:
        result = parse_json_bytes(handle.read(), path, "parser result")
    if not isinstance(result, dict):
        raise OSError(f"{path}: malformed result from the parser process")
    if "error" in result:
        error_type = getattr(builtins, str(result["error"]), None)
        if not (isinstance(error_type, type) and issubclass(error_type, (ValueError, OSError))):
            error_type = OSError
        message = str(result.get("message"))
        raise error_type(message if path in message else f"{path}: {message}")
    names = result.get("names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
        raise OSError(f"{path}: malformed result from the parser process")
    tensors: StateDict = {}
    try:
        with open(os.path.join(workdir, "arrays.npy"), "rb") as handle:
            for name in names:
                tensors[name] = npy_format.read_array(handle, allow_pickle=False)
            if handle.read(1):
                raise ValueError("trailing data")
    except (ValueError, OSError, EOFError) as error:
        raise OSError(f"{path}: cannot read the arrays from the parser process ({error})") from error
    return tensors


def read_h5(path: PathLike) -> StateDict:
    """Read a Hugging Face ``tf_model.h5`` (Keras-2 layout) into ``{'text_model/.../kernel': array, ...}``.

    The file is parsed in a child process (same interpreter, isolated mode) with a time limit of
    ``_H5_TIMEOUT_S`` plus ``_H5_TIMEOUT_PER_100MB_S`` per 100 MB, because libhdf5 can hang uninterruptibly or
    crash on a damaged file: a hang, a crash or a kill ends in an OSError naming the file, and the errors the
    parser raises (ValueError / OSError) come back unchanged.  Links and virtual or external datasets that would
    read other files are refused.  Where ``sys.executable`` is unknown (an embedded interpreter) the file is
    parsed in this process, without the time limit.
    """
    path = _existing_file(path)
    if not (_H5_IN_CHILD and sys.executable):
        return _read_h5_in_process(path)
    seconds = _h5_time_limit(os.path.getsize(path))
    with tempfile.TemporaryDirectory(prefix="groupvit-h5-") as workdir:
        _run_h5_child(path, workdir, seconds)
        return _collect_h5_child_result(path, workdir)


def write_h5(path: PathLike, tensors: Mapping[str, Any], scope: str = "tf_group_vi_t_model") -> None:
    """Write ``{'text_model/.../kernel': array}`` as the ``tf_model.h5`` that transformers' TF models load.

    Layout as written by Keras 2 ``save_weights`` under ``TFGroupViTModel.save_pretrained``: root attributes
    ``backend``, ``keras_version`` and ``layer_names=['groupvit']``; group ``groupvit`` whose ``weight_names``
    are ``{scope}/groupvit/{key}:0`` with each dataset at that path inside the group; an empty
    ``top_level_model_weights`` group.
    """
    path = os.fspath(path)
    arrays = _prepare_tensors(tensors, None, path)
    if not scope or "/" in scope or ":" in scope:
        raise ValueError(f"{path}: invalid model scope {scope!r}")
    for key in arrays:
        if key.startswith("/") or key.endswith("/") or "//" in key or ":" in key:
            raise ValueError(f"{path}: invalid weight key {key!r}")
    weight_names = [f"{scope}/groupvit/{key}:0" for key in arrays]

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as handle:
            _write_string_list_attr(handle, "layer_names", ["groupvit"])
            handle.attrs["backend"] = b"tensorflow"
            handle.attrs["keras_version"] = b"2.21.0"
            group = handle.create_group("groupvit")
            _write_string_list_attr(group, "weight_names", weight_names)
            for weight_name, array in zip(weight_names, arrays.values()):
                dataset = group.create_dataset(weight_name, array.shape, dtype=array.dtype)
                if array.shape:
                    dataset[:] = array
                else:
                    dataset[()] = array
            handle.create_group("top_level_model_weights").attrs["weight_names"] = np.zeros((0,), np.float64)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# torch zip files: restricted unpickling


class UnresolvedGlobal:
    """Inert stand-in for a pickled global that is not trusted (never imported, never called).

    Instances record what the pickle tried to build: ``qualname`` (e.g. ``'argparse.Namespace'``), the
    constructor ``args``/``kwargs``, the ``state`` passed by BUILD, and any ``items``/``list_items`` that
    SETITEMS/APPENDS added.  Subclasses are created per qualified name by :func:`_unresolved_class`.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args, instance.kwargs = args, kwargs
        instance.state, instance.items, instance.list_items = None, {}, []
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __call__(self, *args, **kwargs):
        # e.g. REDUCE on the result of getattr(<unresolved class>, name); stays inert
        return _unresolved_class(f"{self.qualname}(...)")(*args, **kwargs)

    def __repr__(self):
        return f"<unresolved {self.qualname}>"


def _unresolved_class(qualname: str) -> type:
    return type("Unresolved", (UnresolvedGlobal,), {"qualname": qualname, "__module__": __name__})


class _StorageType:
    """What ``torch.FloatStorage`` etc. resolve to: only a dtype, for use in persistent ids (immutable)."""

    __slots__ = ("name", "dtype", "bfloat16")

    def __init__(self, name: str, dtype: np.dtype, bfloat16: bool = False):
        for attribute, value in (("name", name), ("dtype", dtype), ("bfloat16", bfloat16)):
            object.__setattr__(self, attribute, value)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"torch.{self.name} cannot be modified")

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"torch.{self.name} may only appear in a storage persistent id")

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {
    "DoubleStorage": np.dtype("f8"),
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "BFloat16Storage": np.dtype("u2"),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "UntypedStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("c8"),
    "ComplexDoubleStorage": np.dtype("c16"),
}
_NUMPY_TO_STORAGE = {
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("<i2"): "ShortStorage",
    np.dtype("i1"): "CharStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
    np.dtype("<c8"): "ComplexFloatStorage",
    np.dtype("<c16"): "ComplexDoubleStorage",
}


class _Storage:
    """A storage loaded from ``<archive>/data/<key>``: a flat array (bfloat16 kept as uint16 bits)."""

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array, self.bfloat16 = array, bfloat16


class _CopyBudget:
    """Bytes that tensors of one file may copy out of its storages, in total.

    Each tensor is bounded by ``_MAX_EXPANDED_BYTES`` beyond its storage, but many tensors can view one small
    storage (stride 0, or the same storage key again), so the sum is bounded too: twice the storage bytes loaded so
    far (tied or shared weights view a storage more than once) plus ``_MAX_EXPANDED_BYTES``.
    """

    def __init__(self, path: str):
        self.path, self.loaded, self.copied = path, 0, 0

    def spend(self, nbytes: int, size: Tuple[int, ...]) -> None:
        limit = 2 * self.loaded + _MAX_EXPANDED_BYTES
        if self.copied + nbytes > limit:
            raise ValueError(
                f"{self.path}: tensors would copy more than {limit} bytes out of {self.loaded} bytes of storage "
                f"(at a tensor of size {size}); refusing to materialise them"
            )
        self.copied += nbytes


def _check_int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored, budget: Optional[_CopyBudget] = None):
    """numpy equivalent of ``torch._utils._rebuild_tensor(_v2)``; never reads outside the storage, and charges the
    bytes it copies to ``budget`` before copying."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor storage must come from a persistent id, got {storage!r}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ValueError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    size, stride = _check_int_tuple(size, "size"), _check_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in length")
    flat = storage.array
    numel = math.prod(size)
    if numel > flat.size and numel * flat.dtype.itemsize > _MAX_EXPANDED_BYTES:
        raise ValueError(f"tensor of size {size} expands a storage of {flat.size}; refusing to materialise it")
    if numel == 0:
        array = np.empty(size, dtype=flat.dtype)
    else:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise ValueError(
                f"tensor of size {size}, stride {stride}, offset {storage_offset} reads element {last} "
                f"of a storage of {flat.size}"
            )
        itemsize = flat.dtype.itemsize
        if budget is not None:
            budget.spend(numel * itemsize, size)
        view = np.lib.stride_tricks.as_strided(
            flat[storage_offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
        )
        array = np.array(view, order="C")
    return _bfloat16_bits_to_float32(array) if storage.bfloat16 else array


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args)


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _UniqueKeyDict(dict):
    """What EMPTY_DICT / DICT build: setting a key twice (SETITEM/SETITEMS) is refused, as safetensors and
    tf_model.h5 readers refuse duplicate names, so no two readers can disagree on a file."""

    def __setitem__(self, key, value):
        if key in self:
            raise ValueError(f"duplicate key {_short_repr(key)} in a pickled dict (state dict)")
        super().__setitem__(key, value)


class _UniqueKeyOrderedDict(collections.OrderedDict):
    """What ``collections.OrderedDict`` builds (a fresh subclass per lookup); a key set twice is refused."""

    def __setitem__(self, key, value):
        if key in self:
            raise ValueError(f"duplicate key {_short_repr(key)} in state dict")
        super().__setitem__(key, value)


_REBUILD_HELPERS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler for ``data.pkl`` that resolves only tensors, storages and OrderedDict.

    The pure-Python unpickler, so that opcodes can be checked: dicts refuse a key set twice, BUILD may only give
    state to dicts and :class:`UnresolvedGlobal` instances, and EXT codes go through :meth:`find_class` rather
    than copyreg's process-wide cache.  :meth:`find_class` returns a fresh object on every call, so nothing a file
    does to what it gets (BUILD, setattr) reaches the library's own functions and classes.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
        self._storages: Dict[str, _Storage] = {}
        self._unresolved: Dict[str, type] = {}
        self._budget = _CopyBudget(path)

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if qualname == "collections.OrderedDict":
            return type("OrderedDict", (_UniqueKeyOrderedDict,), {"__module__": __name__})
        if qualname in _REBUILD_HELPERS:
            helper, budget = _REBUILD_HELPERS[qualname], self._budget
            if helper is _rebuild_tensor:
                return lambda *args: _rebuild_tensor(*args, budget=budget)
            return lambda *args: helper(*args)
        if module in ("torch", "torch.cuda") and name in _STORAGE_TYPES:
            return _StorageType(name, _STORAGE_TYPES[name], bfloat16=name == "BFloat16Storage")
        if qualname not in self._unresolved:
            self._unresolved[qualname] = _unresolved_class(qualname)
        return self._unresolved[qualname]

    def get_extension(self, code):
        # EXT1/2/4: resolved through find_class every time; copyreg._extension_cache may hold real objects that
        # another unpickler in this process resolved, and must not receive ours either.
        key = copyreg._inverted_registry.get(code)
        if not key:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))

    def _load_empty_dict(self):
        self.append(_UniqueKeyDict())

    def _load_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("DICT with an odd number of items")
        result = _UniqueKeyDict()
        for index in range(0, len(items), 2):
            result[items[index]] = items[index + 1]
        self.append(result)

    def _load_build(self):
        if len(self.stack) < 2:
            raise pickle.UnpicklingError("BUILD on an empty stack")
        target = self.stack[-2]
        if not isinstance(target, (dict, UnresolvedGlobal)):
            raise pickle.UnpicklingError(f"BUILD may not set the state of {reprlib.repr(target)}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.EMPTY_DICT[0]] = _load_empty_dict
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names an unknown storage type {storage_type!r}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage persistent id {pid!r}")
        if key in self._storages:
            return self._storages[key]
        member = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise ValueError(f"{self._path}: storage record {member!r} is missing") from None
        dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        if info.file_size != numel * dtype.itemsize:
            raise ValueError(
                f"{self._path}: storage {member!r} should hold {numel} x {storage_type.name} "
                f"({numel * dtype.itemsize} bytes) but the record has {info.file_size}"
            )
        raw = _read_zip_member(self._archive, info, self._path)
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
        storage = _Storage(array, storage_type.bfloat16)
        self._storages[key] = storage
        self._budget.loaded += array.nbytes
        return storage


_MAX_PICKLE_NESTING = 100  # torch state dicts nest < 10 levels
_PICKLE_IN_PLACE = {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "BUILD", "ADDITEMS"}
_PICKLE_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_PICKLE_GET = {"GET", "BINGET", "LONG_BINGET"}


def _check_pickle_nesting(data: bytes, path: str) -> None:
    """Refuse a pickle whose objects (or MARKs) nest deeper than ``_MAX_PICKLE_NESTING``, before unpickling.

    The C unpickler and the hash/repr of the objects it builds recurse without a depth check (a deep tuple key
    crashes the interpreter), so the opcode stream is scanned first: every stack entry carries the nesting depth
    of the object it stands for, conservatively one more than the deepest object an opcode consumed.
    """
    stack: list = []
    marks: list = []
    memo: Dict[Any, int] = {}
    try:
        for opcode, arg, position in pickletools.genops(data):
            name = opcode.name
            if name in _PICKLE_PUT or name == "MEMOIZE":
                memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1] if stack else 0
                continue
            if name in _PICKLE_GET:
                stack.append(memo.get(arg, 0))
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else 0)
                continue
            if name == "MARK":
                marks.append(len(stack))
                if len(marks) > _MAX_PICKLE_NESTING:
                    raise ValueError(
                        f"{path}: data.pkl nests deeper than {_MAX_PICKLE_NESTING} levels (MARK at byte {position})"
                    )
                continue
            before = opcode.stack_before
            if pickletools.markobject in before:
                start = marks.pop() if marks else 0
                inner = stack[start:]
                del stack[start:]
                below = [stack.pop() if stack else 0 for _ in range(before.index(pickletools.markobject))]
            else:
                inner = [stack.pop() if stack else 0 for _ in before]
                below = []
            if name in _PICKLE_IN_PLACE:
                # the container stays where it was; it is now as deep as its deepest new member, plus one
                container = below[-1] if below else (inner.pop() if inner else 0)
                depths = [container] + [d + 1 for d in inner]
                pushed = [max(depths)] * len(opcode.stack_after)
            else:
                depth = max(inner + below, default=-1) + 1
                pushed = [depth] * len(opcode.stack_after)
            if any(d > _MAX_PICKLE_NESTING for d in pushed):
                raise ValueError(
                    f"{path}: data.pkl nests deeper than {_MAX_PICKLE_NESTING} levels ({name} at byte {position})"
                )
            stack.extend(pushed)
    except ValueError as error:
        if path in str(error):
            raise
        raise ValueError(f"{path}: corrupt data.pkl ({error})") from None


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    archive_size = os.path.getsize(path)
    if info.header_offset + info.compress_size > archive_size:
        raise OSError(f"{path}: zip record {info.filename!r} extends past the end of the file (truncated)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise ValueError(f"{path}: zip record {info.filename!r} has inconsistent sizes")
    elif info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
        raise ValueError(f"{path}: zip record {info.filename!r} claims an impossible compression ratio")
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, ValueError) as error:
        raise OSError(f"{path}: cannot read zip record {info.filename!r} ({error})") from error
    if len(data) != info.file_size:
        raise OSError(f"{path}: zip record {info.filename!r} is truncated")
    return data


def _open_torch_zip(path: str) -> zipfile.ZipFile:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if not zipfile.is_zipfile(path):
        if magic[:1] == b"\x80":
            raise OSError(
                f"{path}: legacy (pre-1.6, non-zip) torch checkpoint; this format is not supported: "
                "re-save it with torch>=1.6 torch.save or convert it to safetensors"
            )
        if magic == b"PK\x03\x04":
            raise OSError(f"{path}: truncated or corrupt zip archive")
        raise OSError(f"{path}: not a torch zip checkpoint")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise OSError(f"{path}: truncated or corrupt zip archive ({error})") from error


def read_torch_pickle(path: PathLike) -> Any:
    """Unpickle a torch zip checkpoint without executing code; tensors become numpy arrays.

    Untrusted globals become :class:`UnresolvedGlobal` instances.  bfloat16 tensors are returned as float32.
    """
    path = _existing_file(path)
    with _open_torch_zip(path) as archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: zip archive has duplicate record names")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("/constants.pkl") for n in names):
                raise OSError(f"{path}: TorchScript archives are not supported; save a state dict instead")
            raise OSError(f"{path}: expected one '<archive>/data.pkl' record, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            record = _read_zip_member(archive, archive.getinfo(f"{prefix}byteorder"), path)
            byteorder = record.decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise ValueError(f"{path}: data.pkl claims {info.file_size} bytes")
        data = _read_zip_member(archive, info, path)
        _check_pickle_nesting(data, path)
        unpickler = _RestrictedUnpickler(data, archive, prefix, byteorder, path)
        try:
            return unpickler.load()
        except (ValueError, OSError) as error:
            if path in str(error):
                raise
            raise ValueError(f"{path}: corrupt data.pkl ({error})") from error
        except Exception as error:  # UnpicklingError, EOFError, TypeError from a malformed REDUCE, ...
            raise ValueError(f"{path}: corrupt data.pkl ({type(error).__name__}: {error})") from error


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values())


def read_torch_bin(path: PathLike) -> StateDict:
    """Read ``pytorch_model.bin`` / an NVlabs ``.pth`` into a flat ``{name: array}`` dict.

    The top-level object is used if it is a state dict, else its ``'model'`` or ``'state_dict'`` entry
    (NVlabs checkpoints hold ``{'model': ..., 'optimizer': ..., 'config': ...}``).  Key prefixes such as
    ``module.`` are left as they are.
    """
    path = os.fspath(path)
    obj = read_torch_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__} {reprlib.repr(obj)}, not a dict")
    state = obj
    if not _is_state_dict(obj):
        for entry in ("model", "state_dict"):
            if isinstance(obj.get(entry), dict):
                state = obj[entry]
                break
        else:
            raise ValueError(f"{path}: no state dict found; top-level keys are {sorted(map(str, obj))}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state dict key {reprlib.repr(key)} is not a string")
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: state dict entry {key!r} is {reprlib.repr(value)}, not a tensor")
    return dict(state)


# ----------------------------------------------------------------------------------------------------------
# torch zip files: writing


class _PickleWriter:
    """Emits protocol-2 pickle opcodes; used because the globals named (torch.*) must not be imported."""

    def __init__(self):
        self.out = bytearray(pickle.PROTO + b"\x02")

    def global_(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")

    def str_(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    def int_(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += pickle.BININT1 + struct.pack("<B", value)
        elif 0 <= value < 65536:
            self.out += pickle.BININT2 + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += pickle.BININT + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += pickle.LONG1 + struct.pack("<B", len(data)) + data

    def int_tuple(self, values: Tuple[int, ...]) -> None:
        if not values:
            self.out += pickle.EMPTY_TUPLE
            return
        self.out += pickle.MARK
        for value in values:
            self.int_(value)
        self.out += pickle.TUPLE

    def empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE


def _torch_state_pickle(entries: list) -> bytes:
    """Pickle ``OrderedDict(name -> tensor)`` exactly as ``torch.save`` lays it out (persistent storage ids)."""
    writer = _PickleWriter()
    writer.empty_ordered_dict()
    writer.out += pickle.MARK
    for index, (name, storage_name, array) in enumerate(entries):
        writer.str_(name)
        writer.global_("torch._utils", "_rebuild_tensor_v2")
        writer.out += pickle.MARK
        writer.out += pickle.MARK  # persistent id: ('storage', type, key, location, numel)
        writer.str_("storage")
        writer.global_("torch", storage_name)
        writer.str_(str(index))
        writer.str_("cpu")
        writer.int_(array.size)
        writer.out += pickle.TUPLE + pickle.BINPERSID
        writer.int_(0)  # storage offset
        writer.int_tuple(array.shape)
        writer.int_tuple(tuple(math.prod(array.shape[i + 1 :]) for i in range(array.ndim)))  # C-contiguous
        writer.out += pickle.NEWFALSE  # requires_grad
        writer.empty_ordered_dict()  # backward hooks
        writer.out += pickle.TUPLE + pickle.REDUCE
    writer.out += pickle.SETITEMS + pickle.STOP
    return bytes(writer.out)


def _write_aligned_record(archive: zipfile.ZipFile, name: str, data, alignment: int = 64) -> None:
    """Add an uncompressed record whose data starts on an ``alignment`` boundary, as torch's writer does."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    nbytes = len(data)
    zip64 = nbytes >= zipfile.ZIP64_LIMIT
    header = 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
    padding = -(archive.fp.tell() + header) % alignment
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as handle:
        handle.write(data)


def write_torch_bin(path: PathLike, tensors: Mapping[str, Any], dtype: Optional[str] = None) -> None:
    """Write ``tensors`` as a torch zip file that ``torch.load(path, weights_only=True)`` reads, atomically.

    ``dtype`` in ``{"float32", "float16", "bfloat16"}`` converts floating-point tensors only.
    """
    path = os.fspath(path)
    arrays = _prepare_tensors(tensors, dtype, path)
    entries = []
    for name, array in arrays.items():
        if dtype == "bfloat16" and array.dtype.kind == "f":
            entries.append((name, "BFloat16Storage", _float32_to_bfloat16_bits(array)))
        elif array.dtype in _NUMPY_TO_STORAGE:
            entries.append((name, _NUMPY_TO_STORAGE[array.dtype], array))
        else:
            raise TypeError(f"{path}: tensor {name!r} has dtype {array.dtype}, which torch files cannot store")
    stem = os.path.splitext(os.path.basename(path))[0]
    prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem) or "archive"

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            _write_aligned_record(archive, f"{prefix}/data.pkl", _torch_state_pickle(entries))
            _write_aligned_record(archive, f"{prefix}/.format_version", b"1")
            _write_aligned_record(archive, f"{prefix}/.storage_alignment", b"64")
            _write_aligned_record(archive, f"{prefix}/byteorder", b"little")
            for index, (_, _, array) in enumerate(entries):
                _write_aligned_record(archive, f"{prefix}/data/{index}", memoryview(array.reshape(-1).view(np.uint8)))
            _write_aligned_record(archive, f"{prefix}/version", b"3\n")

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# finding and loading a checkpoint

_READERS = {"safetensors": read_safetensors, "bin": read_torch_bin, "h5": read_h5}
_DIRECTORY_FILES = (
    ("model.safetensors", "safetensors"),
    ("model.safetensors.index.json", "safetensors"),
    ("pytorch_model.bin", "bin"),
    ("pytorch_model.bin.index.json", "bin"),
    ("tf_model.h5", "h5"),
)


def sniff_format(path: str) -> str:
    """'safetensors', 'bin' or 'h5' from a file's first bytes; ValueError for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "bin"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "h5"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(f"{path}: unknown checkpoint layout (not a safetensors, torch zip or HDF5 file)")


def _read_sharded(index_path: str) -> Tuple[StateDict, str]:
    """Read a ``*.index.json`` sharded checkpoint; every tensor must sit in the shard the index names."""
    index = read_json_file(index_path, "shard index", object_pairs_hook=_no_duplicate_pairs(index_path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: shard index has no valid 'weight_map'")
    directory = os.path.dirname(os.path.abspath(index_path))
    tensors: StateDict = {}
    formats = set()
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index_path}: shard name {shard!r} must be a file name in the same directory")
        shard_path = _existing_file(os.path.join(directory, shard))
        fmt = sniff_format(shard_path)
        formats.add(fmt)
        if len(formats) > 1:
            raise ValueError(f"{index_path}: shards mix checkpoint formats {sorted(formats)}")
        for name, array in _READERS[fmt](shard_path).items():
            if weight_map.get(name) != shard:
                raise ValueError(f"{shard_path}: tensor {name!r} is not assigned to this shard by {index_path}")
            if name in tensors:
                raise ValueError(f"{shard_path}: duplicate tensor {name!r}")
            tensors[name] = array
    if not formats:
        raise ValueError(f"{index_path}: shard index lists no tensors")
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index_path}: tensors listed in the index are missing from the shards: {missing[:5]}")
    return tensors, formats.pop()


def load_state(directory_or_file: PathLike) -> Tuple[StateDict, str]:
    """Load a checkpoint as ``({name: array}, fmt)`` with ``fmt`` in ``{'safetensors', 'bin', 'h5'}``.

    A directory is searched for ``model.safetensors``, then ``pytorch_model.bin``, then ``tf_model.h5``
    (each also as a sharded ``.index.json``).  A file is recognised by its content.  Names are returned as
    stored: HF PyTorch names for safetensors/bin, stripped Keras names for h5 (see :func:`read_h5`).
    """
    path = os.fspath(directory_or_file)
    if os.path.isdir(path):
        for name, fmt in _DIRECTORY_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return load_state(candidate)
        looked_for = ", ".join(name for name, _ in _DIRECTORY_FILES)
        raise FileNotFoundError(f"{path}: no checkpoint found; looked for {looked_for}")
    path = _existing_file(path)
    if path.endswith(".index.json"):
        return _read_sharded(path)
    fmt = sniff_format(path)
    return _READERS[fmt](path), fmt
