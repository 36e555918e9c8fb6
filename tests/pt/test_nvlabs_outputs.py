"""NVlabs .pth -> groupvit_pt: outputs of the converted model equal outputs computed from the unconverted tensors.

The NVlabs-layout state dict is built here from the NVlabs naming (models/group_vit.py, models/transformer.py,
models/multi_label_contrastive.py of github.com/NVlabs/GroupViT) with its own random tensors, written with
``torch.save`` the way NVlabs saves (``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'config'}``), converted
through ``groupvit convert``, and loaded into groupvit_pt. The expected values come from plain torch ops applied to
the NVlabs tensors as the NVlabs modules use them (fused ``qkv`` reshaped to (B, N, 3, heads, C/heads),
``nn.MultiheadAttention`` through ``F.multi_head_attention_forward``, Conv1d projectors, ``text.argmax`` pooling),
never from the conversion's own mapping.
"""

import argparse
import collections
import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from groupvit_core.cli import main as cli_main  # noqa: E402

# Sizes of the synthetic NVlabs model. Vision heads (3) differ from the published default (6) so that the head
# count must come from the checkpoint's config; text width 128 gives 2 heads by NVlabs' width // 64 rule.
VISION = dict(hidden=24, heads=3, patch=4, image=16, depths=[2, 1, 1], group_tokens=[5, 3, 0], output_groups=[5, 3])
TEXT = dict(width=128, layers=2, vocab=64, context=10)
PROJECTION = dict(inner=40, out=16)
EPS = 1e-5
ATOL = 2e-5


# ----------------------------------------------------------------------------------------------------------------
# The synthetic NVlabs checkpoint
# ----------------------------------------------------------------------------------------------------------------


def make_nvlabs_state(seed=0):
    """An NVlabs MultiLabelContrastive state dict (multi_label > 0, proj_num_layers 2) with random tensors."""
    gen = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(name, fan_in, fan_out, bias=True):
        state[f"{name}.weight"] = normal(fan_out, fan_in, std=fan_in ** -0.5)
        if bias:
            state[f"{name}.bias"] = normal(fan_out, std=0.02)

    def norm(name, size):
        state[f"{name}.weight"] = normal(size, std=0.1, mean=1.0)
        state[f"{name}.bias"] = normal(size, std=0.05)

    def mlp(name, fan_in, hidden, fan_out):
        linear(f"{name}.fc1", fan_in, hidden)
        linear(f"{name}.fc2", hidden, fan_out)

    c, p = VISION["hidden"], VISION["patch"]
    num_patches = (VISION["image"] // p) ** 2
    state["img_encoder.pos_embed"] = normal(1, num_patches, c, std=0.1)
    state["img_encoder.patch_embed.proj.weight"] = normal(c, 3, p, p, std=(3 * p * p) ** -0.5)
    state["img_encoder.patch_embed.proj.bias"] = normal(c, std=0.02)
    norm("img_encoder.patch_embed.norm", c)
    stages = len(VISION["depths"])
    for i, depth in enumerate(VISION["depths"]):
        prefix = f"img_encoder.layers.{i}"
        groups = VISION["group_tokens"][i]
        if groups:
            state[f"{prefix}.group_token"] = normal(1, groups, c, std=0.1)
        for j in range(depth):
            block = f"{prefix}.blocks.{j}"
            norm(f"{block}.norm1", c)
            linear(f"{block}.attn.qkv", c, 3 * c)
            linear(f"{block}.attn.proj", c, c)
            norm(f"{block}.norm2", c)
            mlp(f"{block}.mlp", c, 4 * c, c)
        if i < stages - 1:  # GroupingBlock
            ds = f"{prefix}.downsample"
            out_groups = VISION["output_groups"][i]
            norm(f"{ds}.norm_tokens", c)
            mlp(f"{ds}.mlp_inter", groups, c // 2, out_groups)
            norm(f"{ds}.norm_post_tokens", c)
            norm(f"{ds}.norm_x", c)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                linear(f"{ds}.pre_assign_attn.attn.{proj}", c, c)
            norm(f"{ds}.pre_assign_attn.norm2", c)
            mlp(f"{ds}.pre_assign_attn.mlp", c, 4 * c, c)
            norm(f"{ds}.pre_assign_attn.norm_post", c)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                linear(f"{ds}.assign.{proj}", c, c)
            norm(f"{ds}.norm_new_x", c)
            mlp(f"{ds}.mlp_channels", c, 4 * c, c)
        if i > 0 and groups:
            norm(f"{prefix}.group_projector.0", c)
            mlp(f"{prefix}.group_projector.1", VISION["group_tokens"][i - 1], c // 2, groups)
    norm("img_encoder.norm", c)

    w = TEXT["width"]
    for i in range(TEXT["layers"]):
        block = f"text_encoder.transformer.resblocks.{i}"
        state[f"{block}.attn.in_proj_weight"] = normal(3 * w, w, std=w ** -0.5)
        state[f"{block}.attn.in_proj_bias"] = normal(3 * w, std=0.02)
        linear(f"{block}.attn.out_proj", w, w)
        norm(f"{block}.ln_1", w)
        linear(f"{block}.mlp.c_fc", w, 4 * w)
        linear(f"{block}.mlp.c_proj", 4 * w, w)
        norm(f"{block}.ln_2", w)
    state["text_encoder.positional_embedding"] = normal(TEXT["context"], w, std=0.1)
    norm("text_encoder.ln_final", w)
    state["text_encoder.token_embedding.weight"] = normal(TEXT["vocab"], w, std=0.1)

    state["logit_scale"] = torch.tensor(float(np.log(1 / 0.07))) + normal((), std=0.05)
    for side, width in (("img_projector", c), ("text_projector", w)):
        inner, out = PROJECTION["inner"], PROJECTION["out"]
        state[f"{side}.linear_hidden.0.weight"] = normal(inner, width, 1, std=width ** -0.5)
        state[f"{side}.linear_hidden.0.bias"] = normal(inner, std=0.02)
        norm(f"{side}.linear_hidden.1", inner)
        state[f"{side}.linear_hidden.1.running_mean"] = normal(inner, std=0.1)
        state[f"{side}.linear_hidden.1.running_var"] = torch.rand(inner, generator=gen) + 0.5
        state[f"{side}.linear_hidden.1.num_batches_tracked"] = torch.tensor(12345, dtype=torch.int64)
        state[f"{side}.linear_out.weight"] = normal(out, inner, 1, std=inner ** -0.5)
        state[f"{side}.linear_out.bias"] = normal(out, std=0.02)
    state["multi_label_logit_scale"] = torch.tensor(2.0)
    return state


class _OmegaNode:
    """Pickles like an OmegaConf container / value node: NEWOBJ + BUILD of {'_metadata', '_parent', ...}."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _omegaconf_like(data, parent=None):
    """Mimic an OmegaConf DictConfig tree as NVlabs pickles it (omegaconf is not installed in the test env)."""
    if isinstance(data, dict):
        node = DictConfig(_metadata=Metadata(ref_type=None, key=None, flags={"readonly": True}), _parent=parent,
                          _content=None)
        node._content = {k: _omegaconf_like(v, node) for k, v in data.items()}
        return node
    if isinstance(data, list):
        node = ListConfig(_metadata=Metadata(ref_type=None, key=None, flags={}), _parent=parent, _content=None)
        node._content = [_omegaconf_like(v, node) for v in data]
        return node
    return AnyNode(_metadata=Metadata(ref_type=None, key=None, flags={}), _parent=parent, _val=data)


def _fake_class(module, name):
    cls = type(name, (_OmegaNode,), {"__module__": module, "__qualname__": name})
    return cls


DictConfig = _fake_class("omegaconf.dictconfig", "DictConfig")
ListConfig = _fake_class("omegaconf.listconfig", "ListConfig")
AnyNode = _fake_class("omegaconf.nodes", "AnyNode")
Metadata = _fake_class("omegaconf.base", "Metadata")


NVLABS_CONFIG = {
    "data": {"text_aug": {"multi_label": 3}},
    "model": {
        "type": "MultiLabelContrastive",
        "img_encoder": {"type": "GroupViT", "embed_dim": VISION["hidden"], "num_heads": [VISION["heads"]] * 3,
                        "depths": VISION["depths"], "num_group_tokens": VISION["group_tokens"],
                        "num_output_groups": VISION["output_groups"], "drop_rate": 0.0, "drop_path_rate": 0.1},
        "text_encoder": {"type": "TextTransformer", "context_length": TEXT["context"], "width": TEXT["width"],
                         "layers": TEXT["layers"], "vocab_size": TEXT["vocab"]},
        "contrast_temperature": 0.07,
        "proj_num_layers": 2,
        "output_dim": PROJECTION["out"],
        "multi_label": "${data.text_aug.multi_label}",
    },
    "output": "???",
}


def save_nvlabs_pth(path, state, config):
    first = next(iter(state.values()))
    torch.save({
        "model": state,
        "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(first)}},
                      "param_groups": [{"lr": np.float64(1.6e-3), "betas": (0.9, 0.999), "params": [0]}]},
        "lr_scheduler": {"t_initial": np.int64(30)},
        "metrics": {"max_accuracy": 42.0, "max_miou": 52.3},
        "epoch": 30,
        "config": config,
    }, path)


# ----------------------------------------------------------------------------------------------------------------
# The NVlabs forward pass, from the NVlabs tensors
# ----------------------------------------------------------------------------------------------------------------


def nv_ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def nv_linear(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def nv_mlp(x, sd, name, act=F.gelu):
    return nv_linear(act(nv_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def nv_fused_attention(x, sd, name, heads):
    """models/group_vit.py Attention(qkv_fuse=True)."""
    b, n, c = x.shape
    qkv = nv_linear(x, sd, f"{name}.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return nv_linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd, f"{name}.proj")


def nv_cross_attention(query, key, sd, name, heads):
    """models/group_vit.py Attention(qkv_fuse=False)."""
    b, n, c = query.shape
    s = key.shape[1]
    q = nv_linear(query, sd, f"{name}.q_proj").reshape(b, n, heads, c // heads).transpose(1, 2)
    k = nv_linear(key, sd, f"{name}.k_proj").reshape(b, s, heads, c // heads).transpose(1, 2)
    v = nv_linear(key, sd, f"{name}.v_proj").reshape(b, s, heads, c // heads).transpose(1, 2)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return nv_linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd, f"{name}.proj")


def nv_attn_block(x, sd, name, heads):
    x = x + nv_fused_attention(nv_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn", heads)
    return x + nv_mlp(nv_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp")


def nv_assign(query, key, sd, name, assign_eps=1.0):
    """AssignAttention(num_heads=1, hard=True) in eval mode: returns (out, soft assignment, raw scores)."""
    c = query.shape[-1]
    q, k, v = (nv_linear(t, sd, f"{name}.{p}") for t, p in ((query, "q_proj"), (key, "k_proj"), (key, "v_proj")))
    raw = (q @ k.transpose(-2, -1)) * c ** -0.5  # (B, groups, tokens)
    soft = raw.softmax(dim=-2)
    hard = torch.zeros_like(raw).scatter_(-2, soft.max(dim=-2, keepdim=True)[1], 1.0)
    attn = hard - soft + soft
    attn = attn / (attn.sum(dim=-1, keepdim=True) + assign_eps)
    return nv_linear(attn @ v, sd, f"{name}.proj"), soft, raw


def nv_grouping_block(x, group_tokens, sd, name, heads):
    """GroupingBlock.forward: returns (new tokens, soft assignment, raw assignment scores)."""
    group_tokens = nv_ln(group_tokens, sd, f"{name}.norm_tokens")
    x = nv_ln(x, sd, f"{name}.norm_x")
    projected = nv_mlp(group_tokens.transpose(1, 2), sd, f"{name}.mlp_inter").transpose(1, 2)
    projected = nv_ln(projected, sd, f"{name}.norm_post_tokens")
    cross = f"{name}.pre_assign_attn"
    projected = projected + nv_cross_attention(projected, x, sd, f"{cross}.attn", heads)
    projected = projected + nv_mlp(nv_ln(projected, sd, f"{cross}.norm2"), sd, f"{cross}.mlp")
    projected = nv_ln(projected, sd, f"{cross}.norm_post")
    new_x, soft, raw = nv_assign(projected, x, sd, f"{name}.assign")
    new_x = new_x + projected
    new_x = new_x + nv_mlp(nv_ln(new_x, sd, f"{name}.norm_new_x"), sd, f"{name}.mlp_channels")
    return new_x, soft, raw


def nv_image_features(pixels, sd, heads):
    """GroupViT.forward_features + avgpool: returns (pooled (B, C), final tokens, [soft maps], [raw scores])."""
    x = F.conv2d(pixels, sd["img_encoder.patch_embed.proj.weight"], sd["img_encoder.patch_embed.proj.bias"],
                 stride=VISION["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = nv_ln(x, sd, "img_encoder.patch_embed.norm") + sd["img_encoder.pos_embed"]
    group_token, softs, raws = None, [], []
    for i, depth in enumerate(VISION["depths"]):
        prefix = f"img_encoder.layers.{i}"
        groups = VISION["group_tokens"][i]
        if groups:
            current = sd[f"{prefix}.group_token"].expand(x.shape[0], -1, -1)
            if f"{prefix}.group_projector.0.weight" in sd:
                projected = nv_ln(group_token, sd, f"{prefix}.group_projector.0")
                current = current + nv_mlp(projected.transpose(1, 2), sd, f"{prefix}.group_projector.1").transpose(1, 2)
            x = torch.cat([x, current], dim=1)
        for j in range(depth):
            x = nv_attn_block(x, sd, f"{prefix}.blocks.{j}", heads)
        if groups:
            x, group_token = x[:, :-groups], x[:, -groups:]
        else:
            group_token = None
        if f"{prefix}.downsample.norm_x.weight" in sd:
            x, soft, raw = nv_grouping_block(x, group_token, sd, f"{prefix}.downsample", heads)
            softs.append(soft)
            raws.append(raw)
    x = nv_ln(x, sd, "img_encoder.norm")
    return x.mean(dim=1), x, softs, raws


def nv_text_features(ids, sd):
    """TextTransformer.forward: (B, context) ids -> pooled (B, width) at text.argmax(dim=-1)."""
    w = TEXT["width"]
    heads = w // 64
    x = F.embedding(ids, sd["text_encoder.token_embedding.weight"]) + sd["text_encoder.positional_embedding"]
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu_(1)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i in range(TEXT["layers"]):
        block = f"text_encoder.transformer.resblocks.{i}"
        y = nv_ln(x, sd, f"{block}.ln_1")
        attn, _ = F.multi_head_attention_forward(
            y, y, y, w, heads, sd[f"{block}.attn.in_proj_weight"], sd[f"{block}.attn.in_proj_bias"], None, None,
            False, 0.0, sd[f"{block}.attn.out_proj.weight"], sd[f"{block}.attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)
        x = x + attn
        y = nv_ln(x, sd, f"{block}.ln_2")
        x = x + F.linear(quick_gelu(F.linear(y, sd[f"{block}.mlp.c_fc.weight"], sd[f"{block}.mlp.c_fc.bias"])),
                         sd[f"{block}.mlp.c_proj.weight"], sd[f"{block}.mlp.c_proj.bias"])
    x = nv_ln(x.permute(1, 0, 2), sd, "text_encoder.ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]


def nv_projector(x, sd, side):
    """ProjectMLP(num_layers=2) on (B, C): Conv1d(k=1) -> BatchNorm1d (eval) -> ReLU -> Conv1d(k=1)."""
    x = x.unsqueeze(1).transpose(1, 2)  # (B, C, 1)
    x = F.conv1d(x, sd[f"{side}.linear_hidden.0.weight"], sd[f"{side}.linear_hidden.0.bias"])
    x = F.batch_norm(x, sd[f"{side}.linear_hidden.1.running_mean"], sd[f"{side}.linear_hidden.1.running_var"],
                     sd[f"{side}.linear_hidden.1.weight"], sd[f"{side}.linear_hidden.1.bias"], training=False,
                     eps=EPS)
    x = F.conv1d(F.relu(x), sd[f"{side}.linear_out.weight"], sd[f"{side}.linear_out.bias"])
    return x.transpose(1, 2).squeeze(1)


def text_ids(batch, seed=1):
    """NVlabs-style ids: [start] tokens [end] then 0-padding to the context length; end is the largest id."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((batch, TEXT["context"]), dtype=np.int64)
    for row in range(batch):
        length = rng.randint(3, TEXT["context"] + 1)
        ids[row, 0] = TEXT["vocab"] - 2
        ids[row, 1:length - 1] = rng.randint(3, TEXT["vocab"] - 2, size=length - 2)
        ids[row, length - 1] = TEXT["vocab"] - 1
    return torch.from_numpy(ids)


def pixels(batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, VISION["image"], VISION["image"], generator=gen)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _assert_clear_margins(raws, min_gap=1e-4):
    """The hard assignment is an argmax: the fixture must not sit on a near-tie (else any rounding flips it)."""
    for raw in raws:
        top2 = raw.topk(2, dim=-2).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
        assert gap > min_gap, f"fixture has a near-tie in the hard assignment (gap {gap}); change the seed"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvlabs_state():
    return make_nvlabs_state(seed=0)


@pytest.fixture(scope="module")
def converted(nvlabs_state, tmp_path_factory):
    """The synthetic NVlabs .pth (OmegaConf-like config) converted by `groupvit convert`; returns the directory."""
    root = tmp_path_factory.mktemp("nvlabs")
    with pytest.MonkeyPatch.context() as mp:
        # pickle imports each class's module (and its parent package) to check that the class is importable.
        for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.nodes", "omegaconf.base"):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        for cls in (DictConfig, ListConfig, AnyNode, Metadata):
            setattr(sys.modules[cls.__module__], cls.__name__, cls)
        save_nvlabs_pth(root / "group_vit_tiny_30e.pth", nvlabs_state, _omegaconf_like(NVLABS_CONFIG))
    dst = root / "converted"
    assert cli_main(["convert", str(root / "group_vit_tiny_30e.pth"), str(dst), "--quiet"]) == 0
    return dst


@pytest.fixture(scope="module")
def model(converted):
    import groupvit_pt

    return groupvit_pt.GroupViTModel.from_pretrained(converted).eval()


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_converted_config_reads_the_pth_config_and_legacy_ids(converted):
    with open(converted / "config.json") as handle:
        config = json.load(handle)
    vision, text = config["vision_config"], config["text_config"]
    assert vision["num_attention_heads"] == VISION["heads"]  # from the pickled config, not the default 6
    assert text["num_attention_heads"] == TEXT["width"] // 64
    assert vision["depths"] == VISION["depths"]
    assert vision["num_group_tokens"] == VISION["group_tokens"]
    assert vision["num_output_groups"] == VISION["output_groups"] + VISION["output_groups"][-1:]
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (0, 2, 1)
    with open(converted / "preprocessor_config.json") as handle:
        assert json.load(handle)["image_mean"] == [0.485, 0.456, 0.406]  # NVlabs normalises with ImageNet stats
    for name in ("model.safetensors", "vocab.json", "merges.txt"):
        assert (converted / name).is_file(), name


def test_text_tower_end_to_end(model, nvlabs_state):
    ids = text_ids(4)
    with torch.no_grad():
        pooled = nv_text_features(ids, nvlabs_state)
        expected = nv_projector(pooled, nvlabs_state, "text_projector")
        out = model.text_model(input_ids=ids)
        features = model.get_text_features(input_ids=ids)
    torch.testing.assert_close(out.pooler_output, pooled, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(features, expected, atol=ATOL, rtol=1e-5)


def test_vision_attention_block_with_fused_qkv(model, nvlabs_state):
    gen = torch.Generator().manual_seed(3)
    num_tokens = (VISION["image"] // VISION["patch"]) ** 2 + VISION["group_tokens"][0]
    hidden = torch.randn(2, num_tokens, VISION["hidden"], generator=gen)
    layer = model.vision_model.encoder.stages[0].layers[1]
    with torch.no_grad():
        expected_attn = nv_fused_attention(nv_ln(hidden, nvlabs_state, "img_encoder.layers.0.blocks.1.norm1"),
                                           nvlabs_state, "img_encoder.layers.0.blocks.1.attn", VISION["heads"])
        attn = _first(layer.self_attn(layer.layer_norm1(hidden)))
        expected = nv_attn_block(hidden, nvlabs_state, "img_encoder.layers.0.blocks.1", VISION["heads"])
        got = _first(layer(hidden))
    torch.testing.assert_close(attn, expected_attn, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_assign_attention(model, nvlabs_state):
    gen = torch.Generator().manual_seed(4)
    groups, tokens = VISION["output_groups"][0], (VISION["image"] // VISION["patch"]) ** 2
    query = torch.randn(2, groups, VISION["hidden"], generator=gen)
    key = torch.randn(2, tokens, VISION["hidden"], generator=gen)
    with torch.no_grad():
        expected, expected_soft, raw = nv_assign(query, key, nvlabs_state, "img_encoder.layers.0.downsample.assign")
        _assert_clear_margins([raw])
        out, soft = model.vision_model.encoder.stages[0].downsample.assign(query, key)[:2]
    torch.testing.assert_close(soft, expected_soft, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def test_grouping_block(model, nvlabs_state):
    gen = torch.Generator().manual_seed(5)
    tokens = (VISION["image"] // VISION["patch"]) ** 2
    image_tokens = torch.randn(2, tokens, VISION["hidden"], generator=gen)
    group_tokens = torch.randn(2, VISION["group_tokens"][0], VISION["hidden"], generator=gen)
    with torch.no_grad():
        expected, expected_soft, raw = nv_grouping_block(image_tokens, group_tokens, nvlabs_state,
                                                         "img_encoder.layers.0.downsample", VISION["heads"])
        _assert_clear_margins([raw])
        out, soft = model.vision_model.encoder.stages[0].downsample(image_tokens, group_tokens)[:2]
    torch.testing.assert_close(soft, expected_soft, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def test_projectors(model, nvlabs_state):
    gen = torch.Generator().manual_seed(6)
    for module, side, width in ((model.visual_projection, "img_projector", VISION["hidden"]),
                                (model.text_projection, "text_projector", TEXT["width"])):
        x = torch.randn(5, width, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(module(x), nv_projector(x, nvlabs_state, side), atol=ATOL, rtol=1e-5)
        # BatchNorm statistics and the counter came across too.
        torch.testing.assert_close(module[1].running_var, nvlabs_state[f"{side}.linear_hidden.1.running_var"])
        assert int(module[1].num_batches_tracked) == 12345


def test_vision_tower_end_to_end(model, nvlabs_state):
    images = pixels(3)
    with torch.no_grad():
        pooled, tokens, softs, raws = nv_image_features(images, nvlabs_state, VISION["heads"])
        _assert_clear_margins(raws)
        expected = nv_projector(pooled, nvlabs_state, "img_projector")
        out = model.vision_model(pixel_values=images, output_attentions=True)
        features = model.get_image_features(pixel_values=images)
    torch.testing.assert_close(out.last_hidden_state, tokens, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, atol=ATOL, rtol=1e-5)
    assert len(out.attentions) == len(softs)
    for got, want in zip(out.attentions, softs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features, expected, atol=ATOL, rtol=1e-5)


def test_logit_scale_and_logits(model, nvlabs_state):
    ids, images = text_ids(2), pixels(3)
    with torch.no_grad():
        assert float(model.logit_scale) == float(nvlabs_state["logit_scale"])
        image_x = F.normalize(nv_projector(nv_image_features(images, nvlabs_state, VISION["heads"])[0], nvlabs_state,
                                           "img_projector"), dim=-1)
        text_x = F.normalize(nv_projector(nv_text_features(ids, nvlabs_state), nvlabs_state, "text_projector"), dim=-1)
        expected = nvlabs_state["logit_scale"].exp() * image_x @ text_x.t()
        out = model(input_ids=ids, pixel_values=images)
    torch.testing.assert_close(out.logits_per_image, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_text, expected.t(), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Other pickled configs, and no readable config at all
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["namespace", "dict", "none"])
def test_other_config_objects(kind, nvlabs_state, tmp_path, capsys):
    model_cfg = {"img_encoder": {"num_heads": [VISION["heads"]] * 3}, "text_encoder": {"width": TEXT["width"]}}
    if kind == "namespace":
        config = argparse.Namespace(model=argparse.Namespace(**model_cfg), seed=0)
    elif kind == "dict":
        config = {"model": model_cfg}
    else:
        config = None
    state = collections.OrderedDict((f"module.{k}", v) for k, v in nvlabs_state.items())  # DDP-saved
    save_nvlabs_pth(tmp_path / "ckpt.pth", state, config)
    args = ["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), "--json"]
    assert cli_main(args) == 0
    # Without a readable config the vision tower gets the published 6 heads.
    expected_heads = 6 if kind == "none" else VISION["heads"]
    summary = json.loads(capsys.readouterr().out)
    assert summary["format_in"] == "nvlabs"
    assert summary["dropped"] == ["multi_label_logit_scale"]
    assert summary["config"]["vision_config"]["num_attention_heads"] == expected_heads
    assert summary["num_tensors"] == len(nvlabs_state) - 1 + 2 * 2 * (
        sum(VISION["depths"]) + TEXT["layers"])  # dropped one; each fused weight and bias became three


def test_vision_heads_flag_overrides(nvlabs_state, tmp_path, capsys):
    save_nvlabs_pth(tmp_path / "ckpt.pth", nvlabs_state, None)
    assert cli_main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), "--json",
                     "--vision-heads", "3", "--text-heads", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["vision_config"]["num_attention_heads"] == 3
    assert summary["config"]["text_config"]["num_attention_heads"] == 4


def test_bfloat16_conversion_matches_torch_rounding(nvlabs_state, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    save_nvlabs_pth(tmp_path / "ckpt.pth", nvlabs_state, None)
    assert cli_main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "bf16"), "-q", "--dtype",
                     "bfloat16"]) == 0
    assert cli_main(["convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "f32"), "-q"]) == 0
    bf16 = safetensors_torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    f32 = safetensors_torch.load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert bf16.keys() == f32.keys()
    for name, value in f32.items():
        if value.dtype.is_floating_point:
            assert bf16[name].dtype == torch.bfloat16, name
            assert torch.equal(bf16[name].view(torch.int16), value.to(torch.bfloat16).view(torch.int16)), name
        else:
            assert bf16[name].dtype == value.dtype == torch.int64 and torch.equal(bf16[name], value), name
