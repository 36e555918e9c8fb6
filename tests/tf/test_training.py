"""TensorFlow training: loss and gradients of one batch equal PyTorch's (Gumbel off, same canonical weights),
and a Keras ``fit`` with the custom train_step runs."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from groupvit_core.losses import TrainConfig  # noqa: E402
from groupvit_core.synthetic import TrainingData  # noqa: E402
from groupvit_core.testing import random_weights, test_config  # noqa: E402
from groupvit_core.weights import weight_specs  # noqa: E402
from groupvit_tf import TFGroupViTModel  # noqa: E402
from groupvit_tf import training as tft  # noqa: E402


@pytest.fixture(scope="module")
def data():
    from groupvit_core.tokenizer import GroupViTTokenizer

    # the packaged CLIP vocabulary
    return TrainingData(GroupViTTokenizer(), pool_size=8, image_size=32, max_text_length=24)


def _config(**kw):
    return TrainConfig(steps=2, batch_size=4, image_size=32, pool_size=8, max_text_length=24, warmup_steps=1, **kw)


def _tf_model(state):
    model = TFGroupViTModel(test_config("small"))
    model.load_canonical_state(state)
    model.set_gumbel(False)
    return model


@pytest.mark.parametrize("owned_only", [False, True], ids=["all-groups", "owned-groups"])
def test_loss_and_gradients_equal_pytorch(data, owned_only):
    torch = pytest.importorskip("torch")
    from groupvit_pt import GroupViTModel
    from groupvit_pt.training import TrainingModule, owned_groups, vision_forward

    config = test_config("small")
    state = random_weights(config, seed=3)
    cfg = _config(pixel_weight=0.5, prompt_uniformity_weight=0.7, prompt_uniformity_temperature=6.0,
                  group_owned_only=owned_only, affinity_weight=0.4)
    batch = data.numpy_batch(0, 4, seed=0, affinity_patch=config.vision_config.patch_size)

    pt_model = GroupViTModel(config)
    pt_model.load_canonical_state(state)
    pt_model.set_gumbel(False)
    if owned_only:  # the mask must leave some group out, or this case would test nothing new
        with torch.no_grad():
            owned = owned_groups(vision_forward(pt_model, torch.from_numpy(batch["pixel_values"]))[3])
        assert 0 < int(owned.sum()) < owned.numel()
        tf_owned = tft.owned_groups(tft.vision_forward(_tf_model(state), batch["pixel_values"])[3])
        assert np.array_equal(np.asarray(tf_owned), owned.numpy())
    module = TrainingModule(pt_model, cfg).train()
    pt_parts = module(**{k: torch.from_numpy(v) for k, v in batch.items()})
    pt_parts["loss"].backward()
    pt_grads = {name: p.grad.numpy() for name, p in pt_model.named_parameters() if p.grad is not None}

    tf_model = _tf_model(state)
    variables = tf_model.canonical_variables()
    trainable = {name: v for name, v in variables.items() if v.trainable}
    with tf.GradientTape() as tape:
        tf_parts = tft.compute_losses(tf_model, batch, cfg, training=True)
    grads = tape.gradient(tf_parts["loss"], list(trainable.values()))

    assert float(pt_parts["affinity"].detach()) > 0
    for key in ("contrastive", "multilabel", "group", "pixel", "uniformity", "affinity", "loss"):
        np.testing.assert_allclose(float(tf_parts[key]), float(pt_parts[key].detach()), rtol=2e-5, atol=2e-5, err_msg=key)
    specs = {spec.name: spec for spec in weight_specs(config)}
    largest = max(float(np.abs(g).max()) for g in pt_grads.values())
    compared = 0
    for (name, _), grad in zip(trainable.items(), grads):
        expected = pt_grads.get(name)
        if expected is None:
            assert grad is None or not np.any(np.asarray(tf.convert_to_tensor(grad))), name
            continue
        got = specs[name].from_keras(np.asarray(tf.convert_to_tensor(grad)))
        if np.abs(expected).max() < 1e-3 * largest:
            # gradients that vanish in exact arithmetic (attention key biases, the token-mixing bias before a
            # LayerNorm over channels): both sides hold rounding noise only
            assert np.abs(got).max() < 1e-3 * largest and np.abs(expected).max() < 1e-3 * largest, name
            compared += 1
            continue
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=0, atol=2e-4 * scale, err_msg=name)
        compared += 1
    assert compared == len(pt_grads) and compared > 50


def test_group_token_dropout_matches_pytorch(data):
    """With every group's own token dropped (dropout 1 - 1e-9) both frameworks compute the same loss, and it
    differs from the loss with nothing dropped: the dropout is live in the TensorFlow step too."""
    torch = pytest.importorskip("torch")
    from groupvit_pt import GroupViTModel
    from groupvit_pt.training import TrainingModule

    config = test_config("small")
    state = random_weights(config, seed=5)
    batch = data.numpy_batch(0, 4, seed=0)
    losses = {}
    for dropout in (0.0, 1.0 - 1e-9):
        cfg = _config(group_token_dropout=dropout)
        pt_model = GroupViTModel(config)
        pt_model.load_canonical_state(state)
        pt_model.set_gumbel(False)
        with torch.no_grad():
            pt_loss = float(TrainingModule(pt_model, cfg).train()(**{k: torch.from_numpy(v)
                                                                     for k, v in batch.items()})["loss"])
        tf_loss = float(tft.compute_losses(_tf_model(state), batch, cfg, training=True)["loss"])
        assert tf_loss == pytest.approx(pt_loss, rel=2e-5, abs=2e-5)
        losses[dropout] = tf_loss
    assert abs(losses[0.0] - losses[1.0 - 1e-9]) > 1e-3


def test_keras_fit_runs_and_changes_weights(data):
    # the built-in's recipe terms included: group-token dropout and the affinity term (its batches carry
    # patch_affinity when make_dataset is given the patch size)
    cfg = _config(group_token_dropout=0.5, affinity_weight=0.3, group_owned_only=True)
    model = _tf_model(random_weights(test_config("small"), seed=4))
    before = {k: np.array(v) for k, v in model.canonical_state().items()}
    trainer = tft.GroupViTTrainingModel(model, cfg)
    trainer.compile(optimizer=tft.make_optimizer(model, cfg))
    with pytest.raises(ValueError, match="patch_affinity"):
        tft.compute_losses(model, data.numpy_batch(0, 4, seed=0), cfg)
    dataset = tft.make_dataset(data, cfg, affinity_patch=model.config.vision_config.patch_size)
    assert int(dataset.cardinality()) == cfg.steps  # fit knows its length (no "ran out of data" warning)
    history = trainer.fit(dataset, epochs=1, shuffle=False, verbose=0)
    assert all(np.isfinite(history.history["loss"])) and all(v > 0 for v in history.history["affinity"])
    after = model.canonical_state()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert "logit_scale" in changed and len(changed) > 50


def test_init_model_matches_pytorch():
    pytest.importorskip("torch")
    from groupvit_core.losses import initial_weights
    from groupvit_pt import GroupViTModel
    from groupvit_pt import training as tr

    config = test_config("small")
    state = random_weights(config, seed=4)
    cfg = TrainConfig(position_init="sincos", attention_init="mimetic", seed=3)
    tf_model = _tf_model(state)
    tft.init_model(tf_model, cfg)
    pt_model = GroupViTModel(config)
    pt_model.load_canonical_state(state)
    tr.init_model(pt_model, cfg)
    changed = initial_weights(config, "sincos", "mimetic", seed=3)
    assert "vision_model.embeddings.position_embeddings" in changed
    assert any(name.endswith("self_attn.q_proj.weight") for name in changed)
    tf_state, pt_state = tf_model.canonical_state(), pt_model.canonical_state()
    for name, before in state.items():
        expected = changed.get(name, before)
        np.testing.assert_array_equal(tf_state[name], expected, err_msg=name)
        np.testing.assert_array_equal(pt_state[name], expected, err_msg=name)
    # the defaults change nothing
    tft.init_model(tf_model, TrainConfig())
    assert all(np.array_equal(tf_model.canonical_state()[name], tf_state[name]) for name in state)
    with pytest.raises(ValueError, match="attention_init"):
        tft.init_model(tf_model, TrainConfig(attention_init="xavier"))


def test_schedule_matches_pytorch_formula():
    schedule = tft.WarmupCosine(1.0, 0.0, 10, 110)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)
