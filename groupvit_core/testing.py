"""Deterministic test fixtures shared by every test suite: named configs, perturbed weights and model inputs.

``random_weights(config, seed)`` gives a canonical (PyTorch-layout) numpy state for any GroupViT config in which
every tensor is perturbed, including those the reference initialises to constants (LayerNorm gamma/beta, biases,
group tokens, the position table, BatchNorm statistics), so that a mix-up of any two tensors or a missed layout fix
changes the outputs. ``random_inputs`` gives token ids and pixels shaped as the real preprocessors give them (right
padding, mixed lengths). The golden reference outputs in ``tests/golden/model_<name>.npz`` were produced by
``tools/make_model_golden.py`` from these fixtures with the reference implementation, and record
``state_checksum`` of the weights they used, so any drift of this generator is caught by the core tests.

Determinism: every tensor is drawn from its own legacy ``np.random.RandomState`` (whose stream numpy keeps frozen
across versions) seeded from ``sha256(seed, tensor name)``. A tensor's values therefore do not depend on the other
tensors of the config: a text-only config gets the same text weights as the full config with the same text part.
Numpy only; never imports a tensor framework.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig
from .weights import WeightSpec, weight_specs

AnyConfig = Union[GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig]

# Longest text random_inputs makes when no lengths are given (the position table may be longer).
DEFAULT_MAX_TEXT_LENGTH = 16


# ----------------------------------------------------------------------------------------------------------------
# Named configs
# ----------------------------------------------------------------------------------------------------------------


def _default() -> GroupViTConfig:
    return GroupViTConfig()


def _tiny_odd() -> GroupViTConfig:
    # Odd sizes everywhere so that a transposed or mis-split tensor cannot go unnoticed; the last stage has no
    # group tokens (it only runs layers on the 3 groups of stage 1).
    return GroupViTConfig(
        text_config=dict(vocab_size=99, hidden_size=24, num_attention_heads=3, intermediate_size=37,
                         num_hidden_layers=2, max_position_embeddings=13, bos_token_id=97, eos_token_id=98,
                         pad_token_id=1),
        vision_config=dict(hidden_size=30, num_attention_heads=3, intermediate_size=37, patch_size=4,
                           image_size=20, depths=[2, 1, 1], num_hidden_layers=4, num_group_tokens=[7, 3, 0],
                           num_output_groups=[7, 3, 3]),
        projection_dim=11,
        projection_intermediate_dim=19,
    )


def _two_stage() -> GroupViTConfig:
    # Two grouping stages, a scalar assign_mlp_ratio, and the legacy ids of the published checkpoints
    # (eos_token_id == 2 switches text pooling to argmax(input_ids)).
    return GroupViTConfig(
        text_config=dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=40,
                         num_hidden_layers=3, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=48, num_attention_heads=4, intermediate_size=64, patch_size=8,
                           image_size=48, depths=[2, 2], num_hidden_layers=4, num_group_tokens=[12, 4],
                           num_output_groups=[12, 4], assign_mlp_ratio=0.75),
        projection_dim=16,
        projection_intermediate_dim=40,
    )


def _tiny_act() -> GroupViTConfig:
    # tiny_odd's shapes with every numeric knob moved off its default: activations, eps values, assign_eps.
    # Catches an implementation that hard-codes a default instead of reading the config.
    config = _tiny_odd().to_dict()
    config["text_config"].update(hidden_act="gelu_new", layer_norm_eps=1e-6)
    config["vision_config"].update(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, assign_eps=0.5,
                                   assign_mlp_ratio=[1.5, 2.5])
    return GroupViTConfig.from_dict(config)


def _small() -> GroupViTConfig:
    # Small but with the real vocabulary and 77 positions, so the real tokenizer's ids work.
    return GroupViTConfig(
        text_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, patch_size=8,
                           image_size=32, depths=[1, 1, 1], num_hidden_layers=3, num_group_tokens=[8, 4, 0],
                           num_output_groups=[8, 4, 4]),
        projection_dim=16,
        projection_intermediate_dim=32,
    )


TEST_CONFIGS: Dict[str, Callable[[], GroupViTConfig]] = {
    "default": _default,
    "tiny_odd": _tiny_odd,
    "two_stage": _two_stage,
    "tiny_act": _tiny_act,
    "small": _small,
}

# Configs that have golden reference outputs in tests/golden/model_<name>.npz.
GOLDEN_CONFIGS: Tuple[str, ...] = ("default", "tiny_odd", "two_stage", "tiny_act")


def test_config(name: str) -> GroupViTConfig:
    """A fresh GroupViTConfig for one of the names in TEST_CONFIGS."""
    if name not in TEST_CONFIGS:
        raise ValueError(f"unknown test config {name!r}; known: {sorted(TEST_CONFIGS)}")
    return TEST_CONFIGS[name]()


test_config.__test__ = False  # not a pytest test despite its name


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def _tensor_rng(seed: int, name: str) -> np.random.RandomState:
    digest = hashlib.sha256(f"groupvit-testing:{seed}:{name}".encode("utf-8")).digest()
    return np.random.RandomState(np.frombuffer(digest[:16], dtype="<u4"))


def _draw(spec: WeightSpec, rng: np.random.RandomState, shapes: Mapping[str, Tuple[int, ...]],
          logit_scale: float) -> np.ndarray:
    name, shape = spec.name, spec.shape
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 1)[0] if "." in name else ""
    if spec.dtype == "int64":  # BatchNorm num_batches_tracked
        return np.asarray(rng.randint(1, 1000), dtype=np.int64).reshape(shape)
    if name == "logit_scale":
        value = logit_scale + 0.05 * rng.standard_normal(shape)
    elif leaf == "running_mean":
        value = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_var":
        value = rng.uniform(0.5, 1.5, size=shape)
    elif module.endswith(("token_embedding", "position_embedding")):
        value = 0.1 * rng.standard_normal(shape)
    elif leaf in ("group_token", "position_embeddings"):
        value = 0.1 * rng.standard_normal(shape)
    elif leaf == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm gamma
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf == "bias" and len(shapes.get(f"{module}.weight", ())) == 1:  # LayerNorm / BatchNorm beta
        value = 0.05 * rng.standard_normal(shape)
    elif leaf == "bias":  # Linear / conv bias
        value = 0.02 * rng.standard_normal(shape)
    elif leaf == "weight" and len(shape) in (2, 4):  # Linear [out, in] / conv [out, in, kh, kw]
        fan_in = int(np.prod(shape[1:]))
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    else:  # pragma: no cover - a new kind of tensor in weights.py must get a rule here
        raise ValueError(f"random_weights has no rule for tensor {name} with shape {shape}")
    return np.asarray(value, dtype=np.float32).reshape(shape)


def random_weights(config: AnyConfig, seed: int = 0) -> Dict[str, np.ndarray]:
    """A canonical state for ``config`` (full, text-only or vision-only) with every tensor perturbed.

    Linear and conv weights ~ N(0, 1/fan_in) (unit-variance activations through any depth), their biases 0.02 N;
    LayerNorm/BatchNorm gamma 1 + 0.1 N and beta 0.05 N; token/position embeddings, the vision position table and
    the group tokens 0.1 N; BatchNorm running_mean 0.1 N, running_var U(0.5, 1.5), num_batches_tracked a random
    int64 in [1, 1000); logit_scale = config.logit_scale_init_value + 0.05 N. Float32 (the counter int64).
    Same config and seed give bit-identical arrays on any machine.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    specs = weight_specs(config)
    shapes = {spec.name: spec.shape for spec in specs}
    logit_scale = float(getattr(config, "logit_scale_init_value", 2.6592))
    return {spec.name: _draw(spec, _tensor_rng(int(seed), spec.name), shapes, logit_scale) for spec in specs}


def state_checksum(state: Mapping[str, np.ndarray]) -> Dict[str, object]:
    """A small, exact fingerprint of a state dict: sha256 over names, dtypes, shapes and little-endian bytes.

    Also the tensor count, the element count and the float64 sum of all values (readable when the hash differs).
    """
    hasher = hashlib.sha256()
    total = 0.0
    elements = 0
    for name in sorted(state):
        array = np.ascontiguousarray(np.asarray(state[name]))
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header = json.dumps([name, little.dtype.str, list(little.shape)])
        hasher.update(header.encode("utf-8"))
        hasher.update(little.tobytes())
        total += float(np.sum(array, dtype=np.float64))
        elements += int(array.size)
    return {"sha256": hasher.hexdigest(), "num_tensors": len(state), "num_elements": elements, "sum": total}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _text_config(config: AnyConfig) -> Optional[GroupViTTextConfig]:
    if isinstance(config, GroupViTConfig):
        return config.text_config
    return config if isinstance(config, GroupViTTextConfig) else None


def _vision_config(config: AnyConfig) -> Optional[GroupViTVisionConfig]:
    if isinstance(config, GroupViTConfig):
        return config.vision_config
    return config if isinstance(config, GroupViTVisionConfig) else None


#: Text padding masks for 3 texts of 9 tokens, each with how many leading positions the text attention needs as
#: keys (groupvit_pt / groupvit_tf leave out the keys past the last one any text attends to, unless a text is
#: masked at its first position, whose first rows then see only masked keys).
PADDING_CASES: Dict[str, Tuple[Tuple[Tuple[int, ...], ...], int]] = {
    "right": (((1, 1, 1, 1, 0, 0, 0, 0, 0), (1, 1, 1, 1, 1, 1, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0, 0, 0)), 6),
    "holes": (((1, 0, 1, 1, 0, 0, 0, 0, 0), (1, 1, 1, 0, 1, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0, 0, 0)), 5),
    "left": (((0, 0, 1, 1, 1, 1, 0, 0, 0), (1, 1, 1, 1, 1, 1, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0, 0, 0)), 9),
    "last_used": (((1, 1, 1, 1, 0, 0, 0, 0, 1), (1, 1, 1, 1, 1, 1, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0, 0, 0)), 9),
}


def text_special_ids(text_config: GroupViTTextConfig) -> Tuple[Optional[int], int, int]:
    """(start id or None, end id, padding id) that random_inputs uses for ``text_config``.

    Normally: the config's bos (if inside the vocabulary) / eos / eos, as the CLIP tokenizer does (it pads with
    its end token). With the legacy ids (eos_token_id == 2) the reference pools at argmax(input_ids), which works
    because the real tokenizer's end token 49407 is the largest id; the inputs mimic that with start vocab-2 and
    end (and padding) vocab-1, so pooling lands on the first end token and the config's bos/eos ids are ordinary
    tokens.
    """
    vocab = text_config.vocab_size
    if text_config.legacy_eos_pooling:
        if vocab < 4:
            raise ValueError(f"legacy-id inputs need vocab_size >= 4, got {vocab}")
        return vocab - 2, vocab - 1, vocab - 1
    eos = text_config.eos_token_id
    if eos >= vocab:
        raise ValueError(f"text_config.eos_token_id ({eos}) is outside the vocabulary ({vocab})")
    bos = text_config.bos_token_id
    if bos is not None and not 0 <= bos < vocab:
        bos = None
    return bos, eos, eos


def _text_lengths(rng: np.random.RandomState, batch: int, max_length: int, min_length: int) -> np.ndarray:
    lengths = rng.randint(min_length, max_length + 1, size=batch)
    lengths[0] = max_length  # the longest text fills the sequence: no all-padding column
    if batch > 1 and max_length > min_length:
        # Mixed lengths: the last text is always strictly shorter than the first.
        lengths[-1] = rng.randint(min_length, max_length)
    return lengths


def random_inputs(config: AnyConfig, batch_images: int, batch_texts: int, seed: int = 0,
                  text_lengths: Optional[Sequence[int]] = None,
                  image_size: Optional[Union[int, Tuple[int, int]]] = None) -> Dict[str, np.ndarray]:
    """Model inputs for ``config``: int64 ``input_ids``/``attention_mask`` and float32 ``pixel_values``.

    Each text is [start] + random tokens + [end], right-padded with the end id (attention_mask 0 on padding);
    see ``text_special_ids`` for the ids, including the legacy-id case. Random tokens are drawn from [0, vocab)
    without the start and end ids, so the first end token is the last real token. ``text_lengths`` (real tokens,
    specials included) default to mixed lengths up to min(max_position_embeddings, 16) with the first text the
    longest. ``pixel_values`` ~ N(0, 1) of shape (batch_images, channels, H, W), H = W = image_size by default;
    ``image_size`` may be an int or (H, W). A text-only or vision-only config (or a batch of 0) leaves out the
    other modality's keys.
    """
    for label, value in (("batch_images", batch_images), ("batch_texts", batch_texts), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    rng = np.random.RandomState(int(seed))
    inputs: Dict[str, np.ndarray] = {}

    text_config = _text_config(config)
    if batch_texts and text_config is None:
        raise ValueError(f"{type(config).__name__} has no text tower but batch_texts={batch_texts}")
    if batch_texts:
        start, end, pad = text_special_ids(text_config)
        specials = 1 + (start is not None)
        if text_lengths is None:
            max_length = min(text_config.max_position_embeddings, DEFAULT_MAX_TEXT_LENGTH)
            lengths = _text_lengths(rng, batch_texts, max_length, min_length=specials)
        else:
            lengths = np.asarray(list(text_lengths), dtype=np.int64)
            if lengths.shape != (batch_texts,):
                raise ValueError(f"text_lengths needs {batch_texts} entries, got {len(lengths)}")
            if lengths.min() < specials:
                raise ValueError(f"text_lengths must be at least {specials} (start/end tokens), got {lengths.min()}")
            if lengths.max() > text_config.max_position_embeddings:
                raise ValueError(
                    f"text_lengths must be at most max_position_embeddings "
                    f"({text_config.max_position_embeddings}), got {lengths.max()}"
                )
        seq_len = int(lengths.max())
        allowed = np.setdiff1d(np.arange(text_config.vocab_size), [i for i in (start, end) if i is not None])
        if allowed.size == 0:
            raise ValueError("vocabulary too small: no ordinary tokens besides the start and end ids")
        input_ids = np.full((batch_texts, seq_len), pad, dtype=np.int64)
        attention_mask = np.zeros((batch_texts, seq_len), dtype=np.int64)
        for row, length in enumerate(lengths):
            length = int(length)
            body = allowed[rng.randint(0, allowed.size, size=length - specials)]
            tokens = ([start] if start is not None else []) + body.tolist() + [end]
            input_ids[row, :length] = tokens
            attention_mask[row, :length] = 1
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = attention_mask

    vision_config = _vision_config(config)
    if batch_images and vision_config is None:
        raise ValueError(f"{type(config).__name__} has no vision tower but batch_images={batch_images}")
    if batch_images:
        if image_size is None:
            height = width = vision_config.image_size
        elif isinstance(image_size, (tuple, list)):
            height, width = (int(s) for s in image_size)
        else:
            height = width = int(image_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        shape = (batch_images, vision_config.num_channels, height, width)
        inputs["pixel_values"] = rng.standard_normal(shape).astype(np.float32)
    return inputs


def first_end_positions(input_ids: np.ndarray, text_config: GroupViTTextConfig) -> np.ndarray:
    """Where the reference pools each text: first eos, or argmax(input_ids) under the legacy ids."""
    input_ids = np.asarray(input_ids)
    if text_config.legacy_eos_pooling:
        return np.argmax(input_ids, axis=-1)
    return np.argmax(input_ids == text_config.eos_token_id, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# One tolerance table for every numerical comparison (golden tests of both frameworks and the parity suite)
# ----------------------------------------------------------------------------------------------------------------

#: kind -> (absolute, relative) tolerance, fp32. Logits 1e-4, embeddings and assignment maps 1e-5,
#: segmentation logits 2e-3; hidden states grow with depth and are compared with a relative term too.
TOLERANCES: Dict[str, Tuple[float, float]] = {
    "logits": (1e-4, 0.0),
    "embeds": (1e-5, 0.0),
    "assignment": (1e-5, 0.0),
    "segmentation": (2e-3, 0.0),
    "attentions": (1e-5, 0.0),
    "features": (1e-5, 1e-5),
    "hidden": (1e-4, 1e-4),
    # Gradients sum many terms: the relative part is taken against the tensor's largest magnitude.
    "gradients": (1e-5, 1e-4),
}
TENSOR_RELATIVE_KINDS = frozenset({"gradients"})


#: Prefixes of the golden files' repeated runs: other images (``interp_``), other text paddings (``padded_``,
#: ``leftpad_``); an output keeps its tolerance under any of them.
GOLDEN_RUN_PREFIXES = ("interp_", "padded_", "leftpad_")


def tolerance_kind(key: str) -> str:
    """The row of TOLERANCES that a named output belongs to (GOLDEN_RUN_PREFIXES and ``[i]`` suffixes ignored)."""
    base = key
    for prefix in GOLDEN_RUN_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    base = base.split("[")[0]
    if base.startswith(("logits", "loss")):
        return "logits"
    if base.endswith("_embeds"):
        return "embeds"
    if base.startswith("assignment"):
        return "assignment"
    if base.startswith("segmentation"):
        return "segmentation"
    if base == "text_attentions":
        return "attentions"
    if base.endswith("_features"):
        return "features"
    if base.startswith("grad"):
        return "gradients"
    return "hidden"


def compare_arrays(key: str, got: np.ndarray, expected: np.ndarray, kind: Optional[str] = None) -> Optional[str]:
    """None when ``got`` matches ``expected`` within the tolerance of its kind, else a message naming the tensor."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return f"{key}: shape {got.shape} != expected {expected.shape}"
    if got.size == 0:
        return None
    kind = kind or tolerance_kind(key)
    atol, rtol = TOLERANCES[kind]
    if not np.all(np.isfinite(got)):
        return f"{key}: non-finite values"
    scale = np.abs(expected).max() if kind in TENSOR_RELATIVE_KINDS else np.abs(expected)
    excess = np.abs(got - expected) - (atol + rtol * scale)
    if excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        return (f"{key}: max |diff| {np.abs(got - expected).max():.3g} > atol {atol:g} + rtol {rtol:g} "
                f"(at {tuple(int(i) for i in worst)}: {got[worst]!r} vs {expected[worst]!r})")
    return None


def first_divergence(pairs) -> Optional[str]:
    """Compare ``(key, got, expected)`` triples in computation order; report the first that diverges.

    The message names the first diverging tensor and how many later ones diverge too, so a failure points at the
    layer where two implementations part ways rather than at everything downstream of it.
    """
    problems = [p for p in (compare_arrays(key, got, expected) for key, got, expected in pairs) if p]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} later tensor(s))" if len(problems) > 1 else ""
    return f"first diverging tensor: {problems[0]}{more}"


def hard_assignment_agreement(soft_a: np.ndarray, soft_b: np.ndarray, min_margin: float = 1e-3):
    """Compare the hard assignments (argmax over groups, axis -2) of two soft maps of shape (batch, groups, tokens).

    The margin is the gap between the best and second-best pre-softmax score, log(p1) - log(p2), read from
    ``soft_a``. Tokens whose margin is below ``min_margin`` are near-ties: either group is a correct answer, so
    they are counted, not compared. Returns (number of clear tokens that disagree, number of near-ties).
    """
    soft_a = np.asarray(soft_a, dtype=np.float64)
    top2 = np.sort(np.log(np.maximum(soft_a, 1e-300)), axis=-2)[..., -2:, :]
    margin = top2[..., 1, :] - top2[..., 0, :]
    clear = margin >= min_margin
    disagree = np.argmax(soft_a, axis=-2) != np.argmax(np.asarray(soft_b), axis=-2)
    return int(np.sum(disagree & clear)), int(np.sum(~clear))
