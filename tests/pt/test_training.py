"""PyTorch training: the losses against direct numpy formulas, the schedule, determinism, checkpoint/resume,
data-parallel over two gloo processes, the evaluation hook and the shipped built-in model."""

import json
import math
import os

import numpy as np
import pytest
import torch

from groupvit_core import synthetic
from groupvit_core.testing import test_config
from groupvit_pt import GroupViTModel
from groupvit_pt import training as tr


def _np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    images, texts, prompts, groups = _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 3, 8), _unit(rng, 4, 5, 8)
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], np.float64)
    scale = 7.0
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    s = torch.tensor(scale, dtype=torch.float64)

    logits = scale * images @ texts.T
    expected = -0.5 * (np.mean(np.diag(_np_log_softmax(logits, 1))) + np.mean(np.diag(_np_log_softmax(logits, 0))))
    assert float(tr.contrastive_loss(t(images), t(texts), s)) == pytest.approx(expected, rel=1e-10)

    logits = scale * images @ prompts.T
    image_term = -np.mean(np.sum(targets / targets.sum(1, keepdims=True) * _np_log_softmax(logits, 1), 1))
    valid = targets.sum(0) > 0
    text_targets = (targets / targets.sum(0, keepdims=True)).T[valid]
    text_term = -np.mean(np.sum(text_targets * _np_log_softmax(logits.T[valid], 1), 1))
    got = float(tr.multilabel_loss(t(images), t(prompts), t(targets), s))
    assert got == pytest.approx(0.5 * (image_term + text_term), rel=1e-10)

    log_p = _np_log_softmax(scale * groups @ prompts.T, -1)  # (4, 5, 3)
    present = targets > 0
    coverage = -np.sum(log_p.max(axis=1) * present) / present.sum()
    purity = -np.mean(np.log(np.sum(np.exp(log_p) * present[:, None, :], -1)))
    got = float(tr.group_loss(t(groups), t(prompts), t(targets), s))
    assert got == pytest.approx(0.5 * (coverage + purity), rel=1e-10)

    # only the groups that own pixels count (TrainConfig.group_owned_only)
    owned = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], bool)
    masked = np.where(owned[..., None], log_p, -np.inf)
    coverage = -np.sum(masked.max(axis=1) * present) / present.sum()
    per_group = np.log(np.sum(np.exp(log_p) * present[:, None, :], -1))
    purity = -np.sum(per_group * owned) / owned.sum()
    got = float(tr.group_loss(t(groups), t(prompts), t(targets), s, owned=torch.from_numpy(owned)))
    assert got == pytest.approx(0.5 * (coverage + purity), rel=1e-10)
    assert float(tr.group_loss(t(groups), t(prompts), t(targets), s, owned=torch.ones(4, 5, dtype=torch.bool))) == \
        pytest.approx(float(tr.group_loss(t(groups), t(prompts), t(targets), s)), rel=1e-12)


def test_owned_groups():
    soft = torch.zeros(2, 3, 4)
    soft[0, 0] = 1.0  # every patch to group 0
    soft[1, :, :2] = torch.tensor([[0.2, 0.1], [0.5, 0.2], [0.3, 0.7]])
    soft[1, :, 2:] = 1.0 / 3  # ties go to the lowest group, as argmax
    assert tr.owned_groups(soft).tolist() == [[True, False, False], [True, True, True]]


def test_prompt_uniformity_loss_matches_numpy_and_pushes_close_prompts_apart():
    rng = np.random.default_rng(1)
    prompts = _unit(rng, 5, 8)
    prompts[1] = prompts[0] + 0.05 * prompts[1]  # a near-duplicate pair
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    t = 5.0
    sims = prompts @ prompts.T
    off = sims[~np.eye(5, dtype=bool)]
    expected = (np.log(np.mean(np.exp(t * off)))) / t
    p = torch.tensor(prompts, dtype=torch.float64, requires_grad=True)
    loss = tr.prompt_uniformity_loss(p, t)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    loss.backward()
    # the near-duplicates get the largest gradients, and a small step separates them
    norms = p.grad.norm(dim=-1).numpy()
    assert set(np.argsort(-norms)[:2]) == {0, 1}
    moved = p.detach() - 0.1 * p.grad
    moved = moved / moved.norm(dim=-1, keepdim=True)
    assert float(moved[0] @ moved[1]) < sims[0, 1]
    with pytest.raises(ValueError, match="prompt_uniformity_temperature"):
        tr.TrainConfig(prompt_uniformity_weight=1.0, prompt_uniformity_temperature=0.0).validate()


def test_affinity_loss_matches_numpy_and_favours_groups_that_follow_colour():
    from groupvit_core.losses import AFFINITY_EDGE_POWER, patch_affinities, patch_neighbours

    rng = np.random.default_rng(1)
    index, valid = patch_neighbours(3, 4)
    soft = rng.random((2, 5, 12))
    soft /= soft.sum(axis=1, keepdims=True)
    weights = rng.random((2, 12, index.shape[1])) * valid
    pairs = [(b, n, k) for b in range(2) for n in range(12) for k in range(index.shape[1])]
    agree = {(b, n, k): soft[b, :, n] @ soft[b, :, index[n, k]] for b, n, k in pairs}
    edge = {(b, n, k): (1 - weights[b, n, k]) ** AFFINITY_EDGE_POWER * valid[n, k] for b, n, k in pairs}
    expected = sum(weights[p] * (1 - agree[p]) for p in pairs) / weights.sum() + \
        sum(edge[p] * agree[p] for p in pairs) / sum(edge.values())
    got = float(tr.affinity_loss(torch.from_numpy(soft), torch.from_numpy(weights), torch.from_numpy(index),
                                 torch.from_numpy(valid)))
    assert got == pytest.approx(expected, rel=1e-10)

    # two colour regions (left and right half of a 4x4 grid): a grouping along the colour edge costs least, one
    # across it more, and one group for everything (attraction alone's minimum) and a checkerboard (repulsion
    # alone's) both cost more than grouping along the edge
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[..., 8:, :] = 200
    affinity = torch.from_numpy(patch_affinities(image, 4)).double()
    index, valid = (torch.from_numpy(a) for a in patch_neighbours(4, 4))
    row, column = torch.arange(16) // 4, torch.arange(16) % 4
    groupings = {"along": column >= 2, "across": row >= 2, "one": torch.zeros(16, dtype=torch.bool),
                 "checkerboard": (row + column) % 2 == 1}
    cost = {name: float(tr.affinity_loss(torch.nn.functional.one_hot(g.long(), 2).T[None].double(), affinity,
                                         index, valid)) for name, g in groupings.items()}
    assert cost["along"] < 0.25 * min(cost["across"], cost["one"], cost["checkerboard"])


def test_trainer_with_the_affinity_term_draws_affinities_and_needs_them(tokenizer, data):
    trainer = _trainer(tokenizer, data, steps=2, affinity_weight=1.0)
    assert trainer.affinity_patch == trainer.model.config.vision_config.patch_size
    history = trainer.train()
    assert all(0 < record["affinity"] < 2 for record in history)  # attraction and repulsion, each at most 1
    batch = data.batch(0, 4, seed=0)
    assert "patch_affinity" not in batch
    with pytest.raises(ValueError, match="patch_affinity"):
        trainer.module(**batch)
    with pytest.raises(ValueError, match="affinity_weight"):
        tr.TrainConfig(affinity_weight=-1.0).validate()


def test_sincos_position_init():
    from groupvit_core.losses import sincos_position_table

    table = sincos_position_table(4, 4, 8)
    assert table.shape == (16, 8) and table.dtype == np.float32
    # row-major patches: the first half of the channels depends on the row only, the second on the column only
    grid = table.reshape(4, 4, 8)
    np.testing.assert_array_equal(grid[:, 0, :4], grid[:, 3, :4])
    np.testing.assert_array_equal(grid[0, :, 4:], grid[3, :, 4:])
    # lowest frequency is 1: sin/cos of the row index itself
    np.testing.assert_allclose(grid[:, 0, 0], np.sin(np.arange(4)), atol=1e-6)
    np.testing.assert_allclose(grid[0, :, 6], np.cos(np.arange(4)), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table(4, 4, 6)
    model = GroupViTModel(tr.builtin_model_config(vision_hidden=64, depths=(1, 1), image_size=32))
    before = model.vision_model.embeddings.position_embeddings.detach().clone()
    tr.init_positions(model, "random")
    assert torch.equal(before, model.vision_model.embeddings.position_embeddings)
    tr.init_positions(model, "sincos")
    np.testing.assert_array_equal(model.vision_model.embeddings.position_embeddings[0].detach().numpy(),
                                  sincos_position_table(8, 8, 64))
    with pytest.raises(ValueError, match="position_init"):
        tr.TrainConfig(position_init="learned").validate()


def test_mimetic_attention_init():
    from groupvit_core.losses import MIMETIC_QK, MIMETIC_VO, mimetic_factors

    rng = np.random.default_rng(3)
    left, right = mimetic_factors(32, 0.7, 0.7, 1.0, rng)
    assert left.shape == right.shape == (32, 32) and left.dtype == np.float32
    # the factors multiply back to their target: identity plus noise of variance alpha^2 / dim
    target = left.astype(np.float64) @ right
    assert abs(np.diag(target).mean() - 0.7) < 0.1
    off = target[~np.eye(32, dtype=bool)]
    assert abs(off.mean()) < 0.02 and 0.5 * 0.7 / np.sqrt(32) < off.std() < 1.5 * 0.7 / np.sqrt(32)
    # the first k columns / rows are the best rank-k approximation (SVD split): singular values in order
    norms = np.linalg.norm(left, axis=0) * np.linalg.norm(right, axis=1)
    assert np.all(np.diff(norms) <= 1e-5)
    with pytest.raises(ValueError, match="dim"):
        mimetic_factors(0, 0.7, 0.7, 1.0, rng)

    model = GroupViTModel(tr.builtin_model_config(vision_hidden=32, depths=(1, 1), image_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr.init_attention(model, "default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tr.init_attention(model, "mimetic", seed=5)
    heads, dim = model.config.vision_config.num_attention_heads, 32
    width = dim // heads
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    # every stage's self-attention weights, nothing else (the grouping blocks and the text tower keep theirs)
    assert changed and all(".self_attn." in k and k.startswith("vision_model.encoder.stages.") for k in changed)
    assert not any(k.startswith("text_model.") or ".downsample." in k for k in changed)
    for stage in model.vision_model.encoder.stages:
        for layer in stage.layers:
            attn = layer.self_attn
            wq, wk = attn.q_proj.weight.detach().double(), attn.k_proj.weight.detach().double()
            for head in range(heads):
                rows = slice(head * width, (head + 1) * width)
                # each head's query-key product leans to the identity: positive trace well above noise
                product = wq[rows].T @ wk[rows]
                assert torch.trace(product) > 0.5 * MIMETIC_QK[1] * width
            vo = attn.v_proj.weight.detach().double().T @ attn.out_proj.weight.detach().double().T
            assert abs(float(torch.diagonal(vo).mean()) + MIMETIC_VO[1]) < 0.1
            assert all(float(p.bias.detach().abs().max()) == 0.0
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
    # deterministic for the seed
    again = GroupViTModel(tr.builtin_model_config(vision_hidden=32, depths=(1, 1), image_size=32))
    tr.init_attention(again, "mimetic", seed=5)
    assert torch.equal(again.vision_model.encoder.stages[0].layers[0].self_attn.q_proj.weight,
                       model.vision_model.encoder.stages[0].layers[0].self_attn.q_proj.weight)
    from groupvit_core.losses import initial_weights

    assert initial_weights(model.config) == {}  # the defaults leave the model's own init
    with pytest.raises(ValueError, match="position_init"):
        initial_weights(model.config, position_init="learned")
    with pytest.raises(ValueError, match="attention_init"):
        tr.init_attention(model, "orthogonal")
    with pytest.raises(ValueError, match="attention_init"):
        tr.TrainConfig(attention_init="orthogonal").validate()


def test_learning_rate_schedule():
    cfg = tr.TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert tr.learning_rate(0, cfg) == pytest.approx(0.1)
    assert tr.learning_rate(9, cfg) == pytest.approx(1.0)
    assert tr.learning_rate(10, cfg) == pytest.approx(1.0)
    assert tr.learning_rate(60, cfg) == pytest.approx(0.5)
    assert tr.learning_rate(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown training option"):
        tr.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="batch_size"):
        tr.TrainConfig(batch_size=0).validate()


@pytest.fixture(scope="module")
def tokenizer():
    from groupvit_core.tokenizer import GroupViTTokenizer

    return GroupViTTokenizer.from_pretrained(tr._empty_dir())


@pytest.fixture(scope="module")
def data(tokenizer):
    return tr.SyntheticData(tokenizer, pool_size=8, image_size=32, max_text_length=24)


def _trainer(tokenizer, data, steps=3, output_dir=None, resume=False, **kw):
    torch.manual_seed(99)  # model init differs from the trainer's seed on purpose
    model = GroupViTModel(test_config("small"))
    cfg = tr.TrainConfig(steps=steps, batch_size=4, image_size=32, pool_size=8, max_text_length=24,
                         warmup_steps=1, checkpoint_every=2, pixel_weight=0.5, **kw)
    return tr.Trainer(model, cfg, output_dir=output_dir, tokenizer=tokenizer, data=data, resume=resume,
                      progress=False, log=lambda line: None)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batches_are_seeded(data):
    a, b = data.batch(5, 4, seed=1), data.batch(5, 4, seed=1)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(data.batch(6, 4, seed=1)["input_ids"], a["input_ids"]) or \
        not torch.equal(data.batch(6, 4, seed=1)["pixel_values"], a["pixel_values"])
    half = data.batch(5, 4, seed=1, rank=1, world_size=2)
    assert torch.equal(half["pixel_values"], a["pixel_values"][2:])


def test_training_is_deterministic_and_learns(tokenizer, data):
    first, second = _trainer(tokenizer, data), _trainer(tokenizer, data)
    h1, h2 = first.train(), second.train()
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    w1, w2 = _weights(first.model), _weights(second.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(math.isfinite(r["loss"]) for r in h1)
    # every loss term is present and active
    assert all(h1[0][k] > 0 for k in ("contrastive", "multilabel", "group", "pixel"))


def test_checkpoint_and_resume_match_a_continuous_run(tmp_path, tokenizer, data):
    continuous = _trainer(tokenizer, data, steps=3)
    continuous.train()
    interrupted = _trainer(tokenizer, data, steps=3, output_dir=str(tmp_path))
    interrupted.train(steps=2)  # checkpoint_every=2 writes checkpoint/ at step 2
    assert os.path.isfile(tmp_path / "checkpoint" / tr.TRAIN_STATE_FILE)
    resumed = _trainer(tokenizer, data, steps=3, output_dir=str(tmp_path), resume=True)
    assert resumed.step == 2
    resumed.train()
    w1, w2 = _weights(continuous.model), _weights(resumed.model)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=0, msg=key)
    assert os.path.isfile(tmp_path / "model" / "model.safetensors")
    loaded = GroupViTModel.from_pretrained(str(tmp_path / "model"))
    torch.testing.assert_close(loaded.logit_scale, resumed.model.logit_scale)


def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _eval_recorder(trainer, seen):
    """on_eval callback: the weights and validation mIoU of each evaluation, as the trainer saw them."""
    return lambda step, result: seen.append((step, result["miou"], _weights(trainer.model)))


def test_keep_best_ends_on_the_best_validation_evaluation(tmp_path, tokenizer, data, monkeypatch):
    # scripted validation scores, so that the best evaluation is neither the first nor the last
    scores = iter([0.2, 0.7, 0.4])
    splits = []

    def fake_evaluate(model, count, split, **kwargs):
        splits.append(split)
        return {"miou": next(scores)}

    monkeypatch.setattr(tr, "evaluate_segmentation", fake_evaluate)
    trainer = _trainer(tokenizer, data, steps=6, output_dir=str(tmp_path), eval_every=2, eval_count=2,
                       keep_best=True)
    seen = []
    trainer.train(on_eval=_eval_recorder(trainer, seen))
    assert splits == ["val"] * 3  # chosen on the validation split, never the test split
    assert [(step, miou) for step, miou, _ in seen] == [(2, 0.2), (4, 0.7), (6, 0.4)]
    assert trainer.best[:2] == (4, 0.7)
    assert _state_equal(_weights(trainer.model), seen[1][2])
    assert not _state_equal(seen[1][2], seen[2][2])
    # run/model and run/best_model hold the best weights; the checkpoint keeps the last state, for resuming
    assert _state_equal(_weights(GroupViTModel.from_pretrained(str(tmp_path / "model"))), seen[1][2])
    assert _state_equal(_weights(GroupViTModel.from_pretrained(str(tmp_path / tr.BEST_MODEL_DIR))), seen[1][2])
    assert _state_equal(_weights(GroupViTModel.from_pretrained(str(tmp_path / "checkpoint"))), seen[2][2])

    # interrupted after the best evaluation and resumed: the same final weights (the best comes back from disk)
    scores = iter([0.2, 0.7, 0.4])
    other = tmp_path / "resumed"
    first = _trainer(tokenizer, data, steps=6, output_dir=str(other), eval_every=2, eval_count=2,
                     keep_best=True)
    first.train(steps=4)
    assert first.best[0] == 4 and _state_equal(_weights(first.model), seen[1][2])  # not over yet: no swap
    resumed = _trainer(tokenizer, data, steps=6, output_dir=str(other), resume=True, eval_every=2, eval_count=2,
                       keep_best=True)
    assert resumed.step == 4 and resumed.best[:2] == (4, 0.7)
    resumed.train()
    assert _state_equal(_weights(resumed.model), seen[1][2])


def test_keep_best_needs_evaluations():
    with pytest.raises(ValueError, match="keep_best needs eval_every"):
        tr.TrainConfig(keep_best=True).validate()
    with pytest.raises(ValueError, match="eval_count"):
        tr.TrainConfig(eval_every=10, eval_count=0).validate()


def test_resume_without_checkpoint_dir_raises(tokenizer, data):
    with pytest.raises(ValueError, match="output_dir"):
        _trainer(tokenizer, data, resume=True)


def _ddp_worker(rank, world_size, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from groupvit_core.tokenizer import GroupViTTokenizer

        tok = GroupViTTokenizer.from_pretrained(tr._empty_dir())
        data = tr.SyntheticData(tok, pool_size=8, image_size=32, max_text_length=24)
        trainer = _trainer(tok, data, steps=2)
        assert trainer.world_size == 2
        trainer.train()
        flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).numpy()
        np.save(os.path.join(out, f"rank{rank}.npy"), flat)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(99)
    start = torch.cat([p.detach().reshape(-1) for p in GroupViTModel(test_config("small")).parameters()]).numpy()
    assert not np.array_equal(a, start)


def test_evaluate_segmentation_runs_with_and_without_grouping():
    torch.manual_seed(0)
    model = GroupViTModel(tr.builtin_model_config(text_hidden=32, vision_hidden=32, depths=(1, 1)))
    for grouping in (True, False):
        result = tr.evaluate_segmentation(model, count=2, grouping=grouping)
        assert 0.0 <= result["miou"] <= 1.0
        assert set(result["iou"]) == set(synthetic.CLASS_NAMES)
        assert result["iou"]["background"] is None  # never in the masks nor predicted


def test_builtin_model_loads_in_pytorch():
    from groupvit_core.builtin import builtin_class_names, builtin_model_path, builtin_segmenter_options

    model = GroupViTModel.from_pretrained(builtin_model_path())
    assert model.logit_scale.dtype == torch.float32
    size = sum(os.path.getsize(os.path.join(builtin_model_path(), f)) for f in os.listdir(builtin_model_path()))
    assert size < 10 * 2**20
    assert builtin_segmenter_options()["window"] == "whole"
    assert builtin_segmenter_options()["refine"] is True  # chosen on the validation split (RESULTS_TRAINING.md)
    assert builtin_class_names() == synthetic.ENTITY_NAMES
    result = tr.evaluate_segmentation(model, count=4)
    assert 0.0 <= result["miou"] <= 1.0


def test_group_token_dropout_reimplements_token_assign_exactly():
    """training._assign_tokens is GroupViTTokenAssign.forward plus the dropout: with nothing dropped it must give
    the module's own outputs, and with dropout the dropped groups differ from them."""
    model = GroupViTModel(tr.builtin_model_config(vision_hidden=32, text_hidden=32, depths=(1, 1))).eval()  # no Gumbel
    stage = next(s for s in model.vision_model.encoder.stages if s.downsample is not None)
    torch.manual_seed(0)
    image_tokens = torch.randn(3, 256, 32)
    group_tokens = torch.randn(3, stage.group_token.shape[1], 32)
    with torch.no_grad():
        expected, expected_soft = stage.downsample(image_tokens, group_tokens)
        same, same_soft = tr._assign_tokens(stage.downsample, image_tokens, group_tokens, 1e-12)
        dropped, _ = tr._assign_tokens(stage.downsample, image_tokens, group_tokens, 0.9)
    torch.testing.assert_close(same, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same_soft, expected_soft)
    assert (dropped - expected).abs().amax(dim=-1).gt(1e-4).any()
    with pytest.raises(ValueError, match="group_token_dropout"):
        tr.TrainConfig(group_token_dropout=1.0).validate()


def test_train_synthetic_keeps_the_best_validation_step_and_reports_it(tmp_path):
    out = tmp_path / "run"
    result = tr.train_synthetic(str(out), "unif_tokdrop", eval_count=4, progress=False, steps=4, pool_size=16,
                                batch_size=8, warmup_steps=1, eval_every=2, arch={"text_hidden": 32})
    history = json.loads((out / "history.json").read_text())
    scored = {record["step"]: record["miou"] for record in history if "miou" in record}
    assert sorted(scored) == [2, 4]
    assert result["best_val_miou"] == max(scored.values())
    assert scored[result["best_step"]] == result["best_val_miou"]
    assert result["arch"]["text_hidden"] == 32 and result["arch"]["vision_hidden"] == 64  # override + recipe
    assert result["train_config"]["keep_best"] and result["train_config"]["group_token_dropout"] == 0.5
    assert 0.0 <= result["miou"]["miou"] <= 1.0 and result["miou"]["count"] == 4
    assert (out / "model" / "model.safetensors").is_file() and (out / tr.BEST_MODEL_DIR / "config.json").is_file()
    assert "kept the weights of step" in (out / "log.txt").read_text()


def test_train_synthetic_rejects_unknown_recipes_and_architecture_options(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        tr.train_synthetic(str(tmp_path), "no_such_recipe")
    with pytest.raises(ValueError, match="unknown architecture option.*hidden_size"):
        tr.train_synthetic(str(tmp_path), "unif_pool", arch={"hidden_size": 8})
    with pytest.raises(ValueError, match="image_size 96 differs .* image_size 64"):
        tr.train_synthetic(str(tmp_path), "unif_pool", arch={"image_size": 96})


def test_trainer_rejects_a_model_of_another_image_size(tokenizer, data):
    model = GroupViTModel(test_config("small"))  # 32 px
    cfg = tr.TrainConfig(steps=1, batch_size=4, image_size=64, pool_size=8, max_text_length=24)
    with pytest.raises(ValueError, match="model's image_size 32 differs from TrainConfig.image_size 64"):
        tr.Trainer(model, cfg, tokenizer=tokenizer, data=data, progress=False, log=lambda line: None)


def test_train_synthetic_at_another_image_size_builds_the_model_and_measures_at_that_size(tmp_path):
    out = tmp_path / "run"
    result = tr.train_synthetic(str(out), "owned_tokdrop", eval_count=2, progress=False, steps=1, pool_size=8,
                                batch_size=4, warmup_steps=1, eval_every=0, keep_best=False, image_size=80,
                                arch={"text_hidden": 32, "patch_size": 5})
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 80 and config["vision_config"]["patch_size"] == 5
    assert result["arch"]["image_size"] == 80 and result["train_config"]["image_size"] == 80
    assert result["miou"]["count"] == 2  # evaluated on 80 px scenes: the model's own size, no interpolation


def test_builtin_model_config_with_two_grouping_stages_trains_and_segments(tmp_path):
    one = tr.builtin_model_config(vision_hidden=64, depths=(2, 1)).vision_config
    assert (one.num_group_tokens, one.num_output_groups) == ([8, 0], [8, 8])
    assert one.intermediate_size == 128
    assert tr.builtin_model_config(vision_hidden=64, vision_mlp_ratio=4).vision_config.intermediate_size == 256
    two = tr.builtin_model_config(vision_hidden=32, depths=(1, 1, 1), groups=(6, 3))
    assert (two.vision_config.num_group_tokens, two.vision_config.num_output_groups) == ([6, 3, 0], [6, 3, 3])
    with pytest.raises(ValueError, match="2 grouping stage"):
        tr.builtin_model_config(depths=(2, 1), groups=(16, 8))
    torch.manual_seed(0)
    model = GroupViTModel(two)
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    groups, pooled, first, soft = tr.vision_forward(model.eval(), torch.randn(2, 3, 64, 64))
    assert groups.shape[1] == 3 and first.shape[1] == patches ** 2
    # the product of the two stages' assignments: each patch's weights over the 3 final groups sum to 1
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(2, patches ** 2))
    result = tr.evaluate_segmentation(model, count=2)
    assert 0.0 <= result["miou"] <= 1.0


def test_train_command_keep_best_and_its_errors(tmp_path, capsys):
    from groupvit_core.cli import main as cli_main

    out = tmp_path / "cli"
    # no --variant: the built-in's recipe, which keeps the best validation evaluation by itself
    assert cli_main(["train", "--output", str(out), "--steps", "2", "--pool-size", "8",
                     "--batch-size", "4", "--eval-every", "1", "--no-eval", "-q"]) == 0
    history = json.loads((out / "checkpoint" / tr.TRAIN_STATE_FILE).read_text())["history"]
    assert [record["step"] for record in history if "miou" in record] == [1, 2]
    assert (out / tr.BEST_MODEL_DIR / "model.safetensors").is_file()
    log = (out / "log.txt").read_text()
    assert "variant aff_mimetic" in log and "group_owned_only=True" in log and "keep_best=True" in log
    assert "attention_init='mimetic'" in log
    assert "affinity_weight=0.3" in log
    assert "kept the weights of step" in log
    # keep_best without evaluations: a clear error (exit status 1) before any data is made
    assert cli_main(["train", "--output", str(tmp_path / "bad"), "--variant", "unif_pool", "--keep-best",
                     "--eval-every", "0", "-q"]) == 1
    assert "keep_best needs eval_every" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_command_sets_any_training_option_and_rejects_bad_ones(tmp_path, capsys):
    from groupvit_core.cli import main as cli_main

    out = tmp_path / "set"
    assert cli_main(["train", "--output", str(out), "--steps", "2", "--pool-size", "8", "--batch-size", "4",
                     "--eval-every", "0", "--no-eval", "-q", "--variant", "unif_pool", "--set", "affinity_weight=1",
                     "--set", "group_owned_only=true", "--set", "position_init=sincos"]) == 0
    log = (out / "log.txt").read_text()
    assert "affinity_weight=1.0" in log and "group_owned_only=True" in log and "position_init='sincos'" in log
    history = json.loads((out / "checkpoint" / tr.TRAIN_STATE_FILE).read_text())["history"]
    assert all(record["affinity"] > 0 for record in history)
    for setting, message in (("steps=3", "use --steps"), ("stepz=3", "not a training option"),
                             ("affinity_weight=abc", "expected a number"),
                             ("gumbel=1", "expected true or false"), ("warmup_steps=1.5", "expected a whole number"), ("affinity_weight", "expected OPTION=VALUE")):
        assert cli_main(["train", "--output", str(tmp_path / "bad"), "--set", setting, "-q"]) == 2, setting
        assert message in capsys.readouterr().err, setting
    assert not (tmp_path / "bad").exists()
