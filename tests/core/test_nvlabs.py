"""groupvit_core.nvlabs: NVlabs GroupViT names -> canonical names, config inference, pickled configs, errors.

The NVlabs-layout state dicts are built here from the NVlabs naming (github.com/NVlabs/GroupViT models/*.py) with
their own random tensors; what a fused tensor means (q, k, v stacked along the output axis) is PyTorch's definition
of ``nn.MultiheadAttention.in_proj_weight`` and of NVlabs' ``qkv.reshape(B, N, 3, heads, C // heads)``. That the
converted model computes what the NVlabs modules compute is checked with torch in tests/pt/test_nvlabs_outputs.py.
"""

import collections
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from groupvit_core import checkpoint, nvlabs
from groupvit_core.config import GroupViTConfig
from groupvit_core.loading import load_pretrained
from groupvit_core.convert import convert_checkpoint
from groupvit_core.weights import weight_specs


def nvlabs_state(seed=0, hidden=24, patch=4, image=16, depths=(2, 1, 1), group_tokens=(5, 3, 0),
                 output_groups=(5, 3), width=128, layers=2, vocab=40, context=7, inner=20, out=8,
                 multi_label=True, shapes_only=False):
    """An NVlabs MultiLabelContrastive state dict (float32 numpy), named as NVlabs names it.

    ``shapes_only``: zero-strided zero arrays (no memory) for tests that only read shapes.
    """
    rng = np.random.RandomState(seed)
    state = collections.OrderedDict()

    def put(name, *shape):
        if shapes_only:
            state[name] = np.broadcast_to(np.float32(0), shape)
        else:
            state[name] = rng.standard_normal(shape).astype(np.float32)

    def linear(name, fan_in, fan_out):
        put(f"{name}.weight", fan_out, fan_in)
        put(f"{name}.bias", fan_out)

    def norm(name, size):
        put(f"{name}.weight", size)
        put(f"{name}.bias", size)

    def mlp(name, fan_in, hidden_size, fan_out):
        linear(f"{name}.fc1", fan_in, hidden_size)
        linear(f"{name}.fc2", hidden_size, fan_out)

    put("img_encoder.pos_embed", 1, (image // patch) ** 2, hidden)
    put("img_encoder.patch_embed.proj.weight", hidden, 3, patch, patch)
    put("img_encoder.patch_embed.proj.bias", hidden)
    norm("img_encoder.patch_embed.norm", hidden)
    for i, depth in enumerate(depths):
        prefix = f"img_encoder.layers.{i}"
        if group_tokens[i]:
            put(f"{prefix}.group_token", 1, group_tokens[i], hidden)
        for j in range(depth):
            norm(f"{prefix}.blocks.{j}.norm1", hidden)
            linear(f"{prefix}.blocks.{j}.attn.qkv", hidden, 3 * hidden)
            linear(f"{prefix}.blocks.{j}.attn.proj", hidden, hidden)
            norm(f"{prefix}.blocks.{j}.norm2", hidden)
            mlp(f"{prefix}.blocks.{j}.mlp", hidden, 4 * hidden, hidden)
        if i < len(depths) - 1:
            ds = f"{prefix}.downsample"
            norm(f"{ds}.norm_tokens", hidden)
            mlp(f"{ds}.mlp_inter", group_tokens[i], hidden // 2, output_groups[i])
            norm(f"{ds}.norm_post_tokens", hidden)
            norm(f"{ds}.norm_x", hidden)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                linear(f"{ds}.pre_assign_attn.attn.{proj}", hidden, hidden)
            norm(f"{ds}.pre_assign_attn.norm2", hidden)
            mlp(f"{ds}.pre_assign_attn.mlp", hidden, 4 * hidden, hidden)
            norm(f"{ds}.pre_assign_attn.norm_post", hidden)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                linear(f"{ds}.assign.{proj}", hidden, hidden)
            norm(f"{ds}.norm_new_x", hidden)
            mlp(f"{ds}.mlp_channels", hidden, 4 * hidden, hidden)
        if i > 0 and group_tokens[i]:
            norm(f"{prefix}.group_projector.0", hidden)
            mlp(f"{prefix}.group_projector.1", group_tokens[i - 1], hidden // 2, group_tokens[i])
    norm("img_encoder.norm", hidden)
    for i in range(layers):
        block = f"text_encoder.transformer.resblocks.{i}"
        put(f"{block}.attn.in_proj_weight", 3 * width, width)
        put(f"{block}.attn.in_proj_bias", 3 * width)
        linear(f"{block}.attn.out_proj", width, width)
        norm(f"{block}.ln_1", width)
        linear(f"{block}.mlp.c_fc", width, 4 * width)
        linear(f"{block}.mlp.c_proj", 4 * width, width)
        norm(f"{block}.ln_2", width)
    put("text_encoder.positional_embedding", context, width)
    norm("text_encoder.ln_final", width)
    put("text_encoder.token_embedding.weight", vocab, width)
    state["logit_scale"] = np.array(np.log(1 / 0.07), dtype=np.float32)
    for side, size in (("img_projector", hidden), ("text_projector", width)):
        put(f"{side}.linear_hidden.0.weight", inner, size, 1)
        put(f"{side}.linear_hidden.0.bias", inner)
        norm(f"{side}.linear_hidden.1", inner)
        put(f"{side}.linear_hidden.1.running_mean", inner)
        state[f"{side}.linear_hidden.1.running_var"] = rng.uniform(0.5, 1.5, inner).astype(np.float32)
        state[f"{side}.linear_hidden.1.num_batches_tracked"] = np.array(777, dtype=np.int64)
        put(f"{side}.linear_out.weight", out, inner, 1)
        put(f"{side}.linear_out.bias", out)
    if multi_label:
        state["multi_label_logit_scale"] = np.array(2.5, dtype=np.float32)
    return state


@pytest.fixture(scope="module")
def source():
    return nvlabs_state()


@pytest.fixture(scope="module")
def result(source):
    return nvlabs.convert_nvlabs_state(source)


# ----------------------------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------------------------


def test_every_canonical_tensor_is_produced(result):
    assert set(result.state) == {spec.name for spec in weight_specs(result.config)}
    for spec in weight_specs(result.config):
        assert result.state[spec.name].shape == spec.shape, spec.name
        assert result.state[spec.name].dtype == np.dtype(spec.dtype), spec.name


def test_fused_projections_split_in_q_k_v_order(source, result):
    c, w = 24, 128
    fused = source["img_encoder.layers.1.blocks.0.attn.qkv.weight"]
    bias = source["img_encoder.layers.1.blocks.0.attn.qkv.bias"]
    layer = "vision_model.encoder.stages.1.layers.0.self_attn"
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert np.array_equal(result.state[f"{layer}.{proj}.weight"], fused[index * c:(index + 1) * c])
        assert np.array_equal(result.state[f"{layer}.{proj}.bias"], bias[index * c:(index + 1) * c])
    fused = source["text_encoder.transformer.resblocks.1.attn.in_proj_weight"]
    bias = source["text_encoder.transformer.resblocks.1.attn.in_proj_bias"]
    layer = "text_model.encoder.layers.1.self_attn"
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert np.array_equal(result.state[f"{layer}.{proj}.weight"], fused[index * w:(index + 1) * w])
        assert np.array_equal(result.state[f"{layer}.{proj}.bias"], bias[index * w:(index + 1) * w])
        assert result.state[f"{layer}.{proj}.weight"].flags.c_contiguous


def test_renamed_tensors(source, result):
    pairs = {
        "img_encoder.pos_embed": "vision_model.embeddings.position_embeddings",
        "img_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embeddings.projection.weight",
        "img_encoder.patch_embed.norm.bias": "vision_model.embeddings.layernorm.bias",
        "img_encoder.layers.0.group_token": "vision_model.encoder.stages.0.group_token",
        "img_encoder.layers.0.blocks.1.norm1.weight": "vision_model.encoder.stages.0.layers.1.layer_norm1.weight",
        "img_encoder.layers.0.blocks.1.norm2.bias": "vision_model.encoder.stages.0.layers.1.layer_norm2.bias",
        "img_encoder.layers.0.blocks.1.attn.proj.weight":
            "vision_model.encoder.stages.0.layers.1.self_attn.out_proj.weight",
        "img_encoder.layers.0.blocks.1.mlp.fc2.weight": "vision_model.encoder.stages.0.layers.1.mlp.fc2.weight",
        "img_encoder.layers.0.downsample.pre_assign_attn.attn.proj.bias":
            "vision_model.encoder.stages.0.downsample.pre_assign_attn.attn.out_proj.bias",
        "img_encoder.layers.0.downsample.pre_assign_attn.attn.k_proj.weight":
            "vision_model.encoder.stages.0.downsample.pre_assign_attn.attn.k_proj.weight",
        "img_encoder.layers.1.downsample.assign.proj.weight":
            "vision_model.encoder.stages.1.downsample.assign.proj.weight",
        "img_encoder.layers.0.downsample.mlp_inter.fc1.weight":
            "vision_model.encoder.stages.0.downsample.mlp_inter.fc1.weight",
        "img_encoder.layers.1.group_projector.1.fc1.weight":
            "vision_model.encoder.stages.1.group_projector.1.fc1.weight",
        "img_encoder.norm.weight": "vision_model.layernorm.weight",
        "text_encoder.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "text_encoder.positional_embedding": "text_model.embeddings.position_embedding.weight",
        "text_encoder.transformer.resblocks.0.ln_1.weight": "text_model.encoder.layers.0.layer_norm1.weight",
        "text_encoder.transformer.resblocks.0.ln_2.bias": "text_model.encoder.layers.0.layer_norm2.bias",
        "text_encoder.transformer.resblocks.0.attn.out_proj.weight":
            "text_model.encoder.layers.0.self_attn.out_proj.weight",
        "text_encoder.transformer.resblocks.0.mlp.c_fc.weight": "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_encoder.transformer.resblocks.0.mlp.c_proj.bias": "text_model.encoder.layers.0.mlp.fc2.bias",
        "text_encoder.ln_final.weight": "text_model.final_layer_norm.weight",
        "img_projector.linear_hidden.1.running_var": "visual_projection.1.running_var",
        "text_projector.linear_hidden.1.num_batches_tracked": "text_projection.1.num_batches_tracked",
        "text_projector.linear_out.bias": "text_projection.3.bias",
    }
    for old, new in pairs.items():
        assert np.array_equal(result.state[new], source[old]), (old, new)
        assert result.state[new].dtype == source[old].dtype
    assert result.state["logit_scale"].shape == ()
    assert float(result.state["logit_scale"]) == float(source["logit_scale"])


def test_projector_conv1d_weights_are_squeezed(source, result):
    for side, target in (("img_projector", "visual_projection"), ("text_projector", "text_projection")):
        assert np.array_equal(result.state[f"{target}.0.weight"], source[f"{side}.linear_hidden.0.weight"][:, :, 0])
        assert np.array_equal(result.state[f"{target}.3.weight"], source[f"{side}.linear_out.weight"][:, :, 0])


def test_multi_label_logit_scale_is_dropped(source, result):
    assert result.dropped == ["multi_label_logit_scale"]
    assert not any("multi_label" in name for name in result.state)
    # A checkpoint trained without the multi-label loss has no such tensor.
    plain = nvlabs.convert_nvlabs_state(nvlabs_state(multi_label=False))
    assert plain.dropped == [] and set(plain.state) == set(result.state)


def test_module_prefix_is_stripped(source, result):
    ddp = {f"module.{k}": v for k, v in source.items()}
    assert nvlabs.looks_like_nvlabs(ddp)
    converted = nvlabs.convert_nvlabs_state(ddp)
    assert converted.state.keys() == result.state.keys()


def test_layout_detection():
    assert nvlabs.looks_like_nvlabs(["img_encoder.norm.weight", "logit_scale"])
    assert not nvlabs.looks_like_nvlabs(["vision_model.layernorm.weight", "logit_scale"])
    assert not nvlabs.looks_like_nvlabs(["foo.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------------------------------


def test_config_is_inferred_from_shapes(result):
    config = result.config
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.image_size) == (24, 96, 4, 16)
    assert vision.depths == [2, 1, 1] and vision.num_hidden_layers == 4
    assert vision.num_group_tokens == [5, 3, 0]
    assert vision.num_output_groups == [5, 3, 3]  # the last entry is unused; it repeats the previous as Hub files do
    assert vision.assign_mlp_ratio == [0.5, 4] and vision.assign_mlp_dims == (12, 96)
    assert vision.num_attention_heads == nvlabs.DEFAULT_VISION_HEADS == 6
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (40, 128, 512)
    assert (text.num_hidden_layers, text.max_position_embeddings) == (2, 7)
    assert text.num_attention_heads == 2  # the NVlabs TextTransformer rule: width // 64
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (0, 2, 1)
    assert text.legacy_eos_pooling
    assert (config.projection_intermediate_dim, config.projection_dim) == (20, 8)
    assert any("vision heads: 6 (published default" in note for note in result.notes)


def test_published_sizes_give_the_published_config():
    """At the published sizes the inferred config equals the Hub's nvidia/groupvit-gcc-* config."""
    shapes = nvlabs_state(hidden=384, patch=16, image=224, depths=(6, 3, 3), group_tokens=(64, 8, 0),
                          output_groups=(64, 8), width=256, layers=12, vocab=49408, context=77, inner=4096, out=256,
                          shapes_only=True)
    config, _ = nvlabs.infer_config(nvlabs.map_nvlabs_names(shapes)[0])
    published = GroupViTConfig.from_json_file(
        __file__.replace("core/test_nvlabs.py", "golden/config_legacy_hub.json"))
    for part in ("text_config", "vision_config"):
        ours, hub = getattr(config, part).to_dict(), getattr(published, part).to_dict()
        hub = {k: v for k, v in hub.items() if k in ours}
        assert {k: ours[k] for k in hub} == hub, part
    assert (config.projection_dim, config.projection_intermediate_dim) == (256, 4096)


def test_heads_from_explicit_arguments(source):
    converted = nvlabs.convert_nvlabs_state(source, vision_heads=4, text_heads=8)
    assert converted.config.vision_config.num_attention_heads == 4
    assert converted.config.text_config.num_attention_heads == 8


def test_heads_from_plain_config(source):
    config = {"model": {"type": "MultiLabelContrastive", "img_encoder": {"type": "GroupViT", "num_heads": [3, 3, 3]},
                        "text_encoder": {"type": "TextTransformer", "width": 128}}}
    converted = nvlabs.convert_nvlabs_state(source, config)
    assert converted.config.vision_config.num_attention_heads == 3
    assert any("from the checkpoint's config" in note for note in converted.notes)
    # An int is accepted as well as a per-stage list; the explicit argument wins over the config.
    assert nvlabs.convert_nvlabs_state(source, {"model": {"img_encoder": {"num_heads": 4}}}
                                       ).config.vision_config.num_attention_heads == 4
    assert nvlabs.convert_nvlabs_state(source, config, vision_heads=2).config.vision_config.num_attention_heads == 2


# ----------------------------------------------------------------------------------------------------------------
# Pickled configs, read by the restricted unpickler (no class is imported)
# ----------------------------------------------------------------------------------------------------------------


class _Node:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def _class(module, name):
    return type(name, (_Node,), {"__module__": module, "__qualname__": name})


def _pickled_zip(path, obj, monkeypatch, classes):
    """A torch-zip-layout file whose data.pkl pickles ``obj`` (no tensors), written with the fake classes."""
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setattr(sys.modules[cls.__module__], cls.__name__, cls, raising=False)
    data = pickle.dumps(obj, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
    return path


def test_omegaconf_config_is_read_as_plain_data(tmp_path, monkeypatch):
    """OmegaConf pickles {'_metadata', '_parent', '_content'} per container and {'_val'} per value node."""
    DictConfig = _class("omegaconf.dictconfig", "DictConfig")
    ListConfig = _class("omegaconf.listconfig", "ListConfig")
    AnyNode = _class("omegaconf.nodes", "AnyNode")
    Metadata = _class("omegaconf.base", "Metadata")

    def tree(data, parent=None):
        meta = Metadata(ref_type=None, object_type=dict, optional=True, key=None, flags={"readonly": True})
        if isinstance(data, dict):
            node = DictConfig(_metadata=meta, _parent=parent, _content=None)
            node._content = {k: tree(v, node) for k, v in data.items()}
            return node
        if isinstance(data, list):
            node = ListConfig(_metadata=meta, _parent=parent, _content=None)
            node._content = [tree(v, node) for v in data]
            return node
        return AnyNode(_metadata=meta, _parent=parent, _val=data)

    config = {"model": {"img_encoder": {"num_heads": [3, 3, 3], "depths": [2, 1, 1]},
                        "multi_label": "${data.text_aug.multi_label}"},
              "output": "???", "train": {"base_lr": 1.6e-3, "amp": True}}
    path = _pickled_zip(tmp_path / "cfg.pth", {"model": {}, "config": tree(config), "epoch": 30}, monkeypatch,
                        (DictConfig, ListConfig, AnyNode, Metadata))
    loaded = checkpoint.read_torch_pickle(path)
    plain = nvlabs.plain_data(loaded["config"])
    # Interpolations and '???' carry no value and are left out; everything else is plain data.
    assert plain == {"model": {"img_encoder": {"num_heads": [3, 3, 3], "depths": [2, 1, 1]}},
                     "train": {"base_lr": 1.6e-3, "amp": True}}
    assert nvlabs.model_section(plain) == plain["model"]


def test_namespace_and_unreadable_objects(tmp_path, monkeypatch):
    Namespace = _class("argparse", "Namespace")
    Opaque = _class("somewhere.secret", "Thing")
    obj = {"config": Namespace(model=Namespace(img_encoder={"num_heads": 4}), opaque=Opaque(x=1), seed=0)}
    path = _pickled_zip(tmp_path / "cfg.pth", obj, monkeypatch, (Namespace, Opaque))
    plain = nvlabs.plain_data(checkpoint.read_torch_pickle(path)["config"])
    assert plain["model"] == {"img_encoder": {"num_heads": 4}} and plain["seed"] == 0
    assert nvlabs.plain_data(object()) is None
    assert nvlabs.plain_data([1, object(), "${x}"]) == [1, None, None]


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_tensor_is_named(source):
    state = dict(source, **{"img_encoder.extra_thing.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"not NVlabs GroupViT tensors: img_encoder\.extra_thing\.weight"):
        nvlabs.convert_nvlabs_state(state)


@pytest.mark.parametrize("name, option", [
    ("img_encoder.layers.0.downsample.reduction.1.weight", "embed_factors"),
    ("img_encoder.head.weight", "classification head"),
    ("img_projector.linear_hidden.3.weight", "proj_num_layers"),
])
def test_unsupported_nvlabs_options(source, name, option):
    state = dict(source, **{name: np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=option):
        nvlabs.convert_nvlabs_state(state)


def test_missing_tensor_is_named(source):
    state = {k: v for k, v in source.items() if k != "img_encoder.layers.1.downsample.norm_x.bias"}
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): vision_model\.encoder\.stages\.1\.downsample\."
                                         r"norm_x\.bias"):
        nvlabs.convert_nvlabs_state(state)
    state = {k: v for k, v in source.items() if k != "text_encoder.token_embedding.weight"}
    with pytest.raises(ValueError, match="text_encoder.token_embedding.weight"):
        nvlabs.convert_nvlabs_state(state)


def test_shape_that_disagrees_with_the_inferred_config(source):
    # The GroupingBlock's cross-attention MLP is 4x wide in NVlabs and config.intermediate_size wide in HF.
    state = dict(source)
    state["img_encoder.layers.0.blocks.0.mlp.fc1.weight"] = np.zeros((50, 24), np.float32)
    with pytest.raises(ValueError, match="wrong shape"):
        nvlabs.convert_nvlabs_state(state)
    state = dict(source)
    state["img_encoder.layers.0.blocks.0.attn.qkv.weight"] = np.zeros((70, 24), np.float32)
    with pytest.raises(ValueError, match="fused q/k/v"):
        nvlabs.convert_nvlabs_state(state)


def test_bad_head_counts(source):
    with pytest.raises(ValueError, match="differs between stages"):
        nvlabs.convert_nvlabs_state(source, {"model": {"img_encoder": {"num_heads": [3, 6, 6]}}})
    with pytest.raises(ValueError, match="divisible"):
        nvlabs.convert_nvlabs_state(source, vision_heads=5)
    narrow = nvlabs_state(width=32)
    with pytest.raises(ValueError, match="give text_heads"):
        nvlabs.convert_nvlabs_state(narrow)
    assert nvlabs.convert_nvlabs_state(narrow, text_heads=4).config.text_config.num_attention_heads == 4


def test_config_options_the_architecture_lacks(source):
    for image, match in (({"qk_scale": 0.1}, "qk_scale"), ({"hard_assignment": False}, "hard_assignment"),
                         ({"embed_factors": [1, 2, 2]}, "embed_factors"), ({"depths": [6, 3, 3]}, "depths")):
        with pytest.raises(ValueError, match=match):
            nvlabs.convert_nvlabs_state(source, {"model": {"img_encoder": image}})


def test_group_projector_sized_by_group_tokens_not_output_groups():
    state = nvlabs_state(group_tokens=(6, 3, 0), output_groups=(5, 3))
    with pytest.raises(ValueError, match="group projector"):
        nvlabs.convert_nvlabs_state(state)


def test_non_square_position_table(source):
    state = dict(source, **{"img_encoder.pos_embed": np.zeros((1, 15, 24), np.float32)})
    with pytest.raises(ValueError, match="square"):
        nvlabs.convert_nvlabs_state(state)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def test_flat_pth_converts_without_torch(source, tmp_path):
    """A .pth holding the bare state dict (written by the numpy-only torch-zip writer) converts end to end."""
    checkpoint.write_torch_bin(tmp_path / "group_vit.pth", source)
    summary = convert_checkpoint(tmp_path / "group_vit.pth", tmp_path / "out")
    assert summary["format_in"] == "nvlabs" and summary["dropped"] == ["multi_label_logit_scale"]
    config, state = load_pretrained(tmp_path / "out")
    assert config == nvlabs.convert_nvlabs_state(source).config
    assert np.array_equal(state["text_model.encoder.layers.0.self_attn.v_proj.weight"],
                          source["text_encoder.transformer.resblocks.0.attn.in_proj_weight"][256:])
    assert int(state["visual_projection.1.num_batches_tracked"]) == 777


def test_read_nvlabs_checkpoint_rejects_non_checkpoints(tmp_path, monkeypatch):
    path = _pickled_zip(tmp_path / "x.pth", {"optimizer": {}, "epoch": 3}, monkeypatch, ())
    with pytest.raises(ValueError, match="no 'model' state dict"):
        nvlabs.read_nvlabs_checkpoint(path)
    path = _pickled_zip(tmp_path / "y.pth", [1, 2], monkeypatch, ())
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        nvlabs.read_nvlabs_checkpoint(path)
    checkpoint.write_torch_bin(tmp_path / "hf.pth", {"vision_model.layernorm.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not an NVlabs GroupViT checkpoint"):
        nvlabs.load_nvlabs(tmp_path / "hf.pth")


def test_reference_nvlabs_like_file_is_read(monkeypatch):
    """The checkpoint helper's torch.save-written {'model', 'optimizer', 'config': Namespace, ...} fixture."""
    golden = __file__.replace("core/test_nvlabs.py", "golden/ckpt_tiny/")
    state, config = nvlabs.read_nvlabs_checkpoint(golden + "nvlabs_like.pth")
    expected = np.load(golden + "expected_nvlabs.npz")
    assert sorted(state) == sorted(expected.files)
    for name in expected.files:
        assert np.array_equal(state[name], expected[name]), name
    assert config["depths"] == [6, 3, 3] and config["model"] == "GroupViT"
