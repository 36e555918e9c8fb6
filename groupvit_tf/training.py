"""Training GroupViT in TensorFlow/Keras 3: the losses of groupvit_pt.training and a Keras ``fit`` step.

The same losses as PyTorch (image-text contrastive, the multi-label contrastive loss with soft targets, the
group-level term, the optional pixel-group, prompt-uniformity and colour-affinity terms, and group-token dropout;
see groupvit_pt/training.py for what each does), computed by ``compute_losses(model, batch, config, training)``
on a TFGroupViTModel. With Gumbel noise off (``model.set_gumbel(False)``) and the same canonical weights, loss and
gradients of a batch equal PyTorch's.

``GroupViTTrainingModel`` wraps a TFGroupViTModel in a keras.Model whose ``train_step`` computes these losses,
so that ``compile(optimizer=...)`` and ``fit(dataset)`` run; ``make_dataset`` turns the synthetic world
(groupvit_core.synthetic.TrainingData) into a tf.data pipeline of such batches, and ``make_optimizer`` gives
AdamW with linear warm-up and cosine decay (weight decay off for biases, norms, embeddings, group tokens).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from groupvit_core import losses as core_losses
from groupvit_core.weights import spec_table

from .modeling import TFGroupViTModel, _run_sequence

LOGIT_SCALE_MAX = 100.0
BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "prompt_ids", "prompt_mask", "targets")


def normalize(x: tf.Tensor) -> tf.Tensor:
    return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), 1e-12)


def contrastive_loss(image_embeds: tf.Tensor, text_embeds: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    logits = scale * tf.matmul(image_embeds, text_embeds, transpose_b=True)
    labels = tf.range(tf.shape(logits)[0])
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits
    return 0.5 * (tf.reduce_mean(ce(labels, logits)) + tf.reduce_mean(ce(labels, tf.transpose(logits))))


def soft_cross_entropy(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def multilabel_loss(image_embeds, prompt_embeds, targets, scale) -> tf.Tensor:
    logits = scale * tf.matmul(image_embeds, prompt_embeds, transpose_b=True)  # (images, classes)
    per_image = tf.reduce_sum(targets, axis=1, keepdims=True)
    image_term = tf.reduce_mean(soft_cross_entropy(logits, targets / tf.maximum(per_image, 1.0)))
    per_class = tf.reduce_sum(targets, axis=0)
    valid = per_class > 0
    text_targets = tf.boolean_mask(tf.transpose(targets) / tf.maximum(per_class, 1.0)[:, None], valid)
    text_term = tf.reduce_mean(soft_cross_entropy(tf.boolean_mask(tf.transpose(logits), valid), text_targets))
    return 0.5 * (image_term + text_term)


def group_loss(group_embeds, prompt_embeds, targets, scale, owned=None) -> tf.Tensor:
    """Mirror of groupvit_pt.training.group_loss (``owned``: (images, groups) bool, the groups counted)."""
    logits = scale * tf.einsum("bgd,cd->bgc", group_embeds, prompt_embeds)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    present = targets > 0
    presentf = tf.cast(present, log_p.dtype)
    ninf = tf.constant(-np.inf, log_p.dtype)
    in_caption = tf.reduce_logsumexp(tf.where(present[:, None, :], log_p, ninf), axis=-1)
    if owned is None:
        best = tf.reduce_max(log_p, axis=1)
        coverage = -tf.reduce_sum(best * presentf) / tf.maximum(tf.reduce_sum(presentf), 1.0)
        return 0.5 * (coverage - tf.reduce_mean(in_caption))
    ownedf = tf.cast(owned, log_p.dtype)
    best = tf.maximum(tf.reduce_max(tf.where(owned[..., None], log_p, ninf), axis=1), -30.0)
    coverage = -tf.reduce_sum(best * presentf) / tf.maximum(tf.reduce_sum(presentf), 1.0)
    purity = -tf.reduce_sum(in_caption * ownedf) / tf.maximum(tf.reduce_sum(ownedf), 1.0)
    return 0.5 * (coverage + purity)


def owned_groups(soft) -> tf.Tensor:
    """Mirror of groupvit_pt.training.owned_groups: (B, G, N) soft assignment -> (B, G) bool."""
    index = tf.argmax(soft, axis=1)  # ties to the lowest group, as torch.argmax
    return tf.reduce_max(tf.one_hot(index, tf.shape(soft)[1], dtype=soft.dtype), axis=1) > 0


def prompt_uniformity_loss(prompt_embeds, temperature: float) -> tf.Tensor:
    """Mirror of groupvit_pt.training.prompt_uniformity_loss: log-mean-exp of the prompts' pairwise cosines."""
    count = prompt_embeds.shape[0] or tf.shape(prompt_embeds)[0]
    sims = tf.matmul(prompt_embeds, prompt_embeds, transpose_b=True)
    off = tf.logical_not(tf.eye(count, dtype=tf.bool))
    pairs = tf.cast(count * (count - 1), sims.dtype)
    return (tf.reduce_logsumexp(temperature * tf.boolean_mask(sims, off)) - tf.math.log(pairs)) / temperature


def pixel_group_loss(pixel_embeds, group_embeds, prompt_embeds, targets, scale, nonempty) -> tf.Tensor:
    logits = scale * tf.einsum("bgd,cd->bgc", pixel_embeds, prompt_embeds)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    present = targets > 0
    presentf = tf.cast(present, log_p.dtype)
    nonemptyf = tf.cast(nonempty, log_p.dtype)
    ninf = tf.constant(-np.inf, log_p.dtype)
    best = tf.reduce_max(tf.where(nonempty[..., None], log_p, ninf), axis=1)
    coverage = -tf.reduce_sum(tf.maximum(best, -30.0) * presentf) / tf.maximum(tf.reduce_sum(presentf), 1.0)
    in_caption = tf.reduce_logsumexp(tf.where(present[:, None, :], log_p, ninf), axis=-1)
    purity = -tf.reduce_sum(in_caption * nonemptyf) / tf.maximum(tf.reduce_sum(nonemptyf), 1.0)
    group_log_p = tf.nn.log_softmax(scale * tf.einsum("bgd,cd->bgc", group_embeds, prompt_embeds), axis=-1)
    target = tf.stop_gradient(tf.exp(log_p))
    consistency = tf.reduce_sum(-tf.reduce_sum(target * group_log_p, -1) * nonemptyf) / \
        tf.maximum(tf.reduce_sum(nonemptyf), 1.0)
    return (coverage + purity + consistency) / 3.0


def affinity_loss(soft, weights, neighbours, valid) -> tf.Tensor:
    """Mirror of groupvit_pt.training.affinity_loss: attraction sum w (1 - a) / sum w plus repulsion
    sum e a / sum e over neighbouring patches (soft (B, G, N), weights (B, N, K), neighbours and valid (N, K))."""
    other = tf.gather(soft, neighbours, axis=2)  # (B, G, N, K)
    agreement = tf.reduce_sum(soft[..., None] * other, axis=1)
    weights = tf.convert_to_tensor(weights, soft.dtype)
    edges = tf.maximum(1.0 - weights, 0.0) ** core_losses.AFFINITY_EDGE_POWER * tf.cast(valid, soft.dtype)
    attract = tf.reduce_sum(weights * (1.0 - agreement)) / tf.maximum(tf.reduce_sum(weights), 1e-12)
    return attract + tf.reduce_sum(edges * agreement) / tf.maximum(tf.reduce_sum(edges), 1e-12)


def _assign_tokens(assign, image_tokens: tf.Tensor, group_tokens: tf.Tensor, token_dropout: float,
                   training: bool) -> Tuple[tf.Tensor, tf.Tensor]:
    """Mirror of groupvit_pt.training._assign_tokens: TFGroupViTTokenAssign.call with each group's own
    (projected) token dropped from its output with probability ``token_dropout`` (per image and group)."""
    if not token_dropout:
        return assign(image_tokens, group_tokens, training=training)
    group_tokens = assign.norm_tokens(group_tokens)
    image_tokens = assign.norm_x(image_tokens)
    projected = assign.norm_post_tokens(assign.mlp_inter(group_tokens, training=training))
    projected = assign.pre_assign_attn(projected, image_tokens, training=training)
    new_tokens, soft = assign.assign(projected, image_tokens, training=training)
    keep = tf.cast(tf.random.uniform(tf.shape(projected)[:2]) >= token_dropout, projected.dtype)
    new_tokens = new_tokens + projected * keep[..., None]
    new_tokens = assign.mlp_channels(assign.norm_new_x(new_tokens), residual=new_tokens, training=training)
    return new_tokens, soft


def vision_forward(model: TFGroupViTModel, pixel_values: tf.Tensor, training: bool = False,
                   token_dropout: float = 0.0
                   ) -> Tuple[tf.Tensor, tf.Tensor, Optional[tf.Tensor], Optional[tf.Tensor]]:
    """Mirror of groupvit_pt.training.vision_forward -> (last (B, G, C), pooled, first-stage patches, soft);
    ``token_dropout`` (training only): TrainConfig.group_token_dropout."""
    vision = model.vision_model
    hidden = vision.embeddings(pixel_values, training=training)
    prev_groups = None
    patches = soft_first = None
    for stage in vision.encoder.stages:
        if stage.group_token is None:
            tokens = hidden
        else:
            batch = tf.shape(hidden)[0]
            group_tokens = tf.broadcast_to(stage.group_token, [batch, stage.group_token.shape[1],
                                                               stage.group_token.shape[2]])
            if stage.group_projector is not None:
                group_tokens = group_tokens + _run_sequence(stage.group_projector, prev_groups, training)
            tokens = tf.concat([hidden, group_tokens], axis=1)
        for layer in stage.layers:
            tokens = layer(tokens, training=training)[0]
        if stage.group_token is None:
            hidden = tokens
            continue
        count = stage.group_token.shape[1]
        image_tokens, group_tokens = tokens[:, :-count], tokens[:, -count:]
        if stage.downsample is not None:
            if patches is None:
                patches = image_tokens
            image_tokens, soft = _assign_tokens(stage.downsample, image_tokens, group_tokens,
                                                token_dropout if training else 0.0, training)
            soft_first = soft if soft_first is None else tf.matmul(soft, soft_first)
        hidden, prev_groups = image_tokens, group_tokens
    last = vision.layernorm(hidden)
    return last, tf.reduce_mean(last, axis=1), patches, soft_first


def compute_losses(model: TFGroupViTModel, batch: Mapping[str, Any], config: Any,
                   training: bool = True) -> Dict[str, tf.Tensor]:
    """The training losses of one batch (keys of BATCH_KEYS) under ``config`` (a groupvit_pt-style TrainConfig
    or any object with contrastive_weight, multilabel_weight, group_weight; pixel_weight,
    prompt_uniformity_weight/_temperature, group_owned_only, group_token_dropout and affinity_weight are optional;
    affinity_weight needs the batch's patch_affinity)."""
    pixel_values = tf.convert_to_tensor(batch["pixel_values"], tf.float32)
    targets = tf.convert_to_tensor(batch["targets"], tf.float32)
    groups, pooled, patches, soft = vision_forward(model, pixel_values, training,
                                                   float(getattr(config, "group_token_dropout", 0.0)))
    batch_size = tf.shape(groups)[0]
    count, hidden = groups.shape[1], groups.shape[2]
    flat = [tf.reshape(groups, [-1, hidden]), pooled]
    pixel_weight = float(getattr(config, "pixel_weight", 0.0))
    if pixel_weight:
        index = tf.argmax(soft, axis=1)  # (B, N), ties to the lowest group as torch
        hard = tf.transpose(tf.one_hot(index, count, dtype=soft.dtype), [0, 2, 1])
        hard = hard - tf.stop_gradient(soft) + soft
        sizes = tf.reduce_sum(tf.stop_gradient(hard), axis=-1)
        pixel_groups = tf.matmul(hard, patches) / tf.maximum(sizes, 1.0)[..., None]
        flat.append(tf.reshape(model.vision_model.layernorm(pixel_groups), [-1, hidden]))
    projected = _run_sequence(model.visual_projection, tf.concat(flat, axis=0), training)
    n_groups = batch_size * count
    group_embeds = tf.reshape(normalize(projected[:n_groups]), [batch_size, count, -1])
    image_embeds = normalize(projected[n_groups:n_groups + batch_size])
    ids = tf.concat([tf.cast(batch["input_ids"], tf.int64), tf.cast(batch["prompt_ids"], tf.int64)], axis=0)
    mask = tf.concat([tf.cast(batch["attention_mask"], tf.int64), tf.cast(batch["prompt_mask"], tf.int64)], axis=0)
    text_out = model.text_model(ids, attention_mask=mask, training=training)
    text = normalize(_run_sequence(model.text_projection, text_out.pooler_output, training))
    caption_embeds, prompt_embeds = text[:batch_size], text[batch_size:]
    scale = tf.minimum(tf.exp(tf.reshape(model.logit_scale, [])), LOGIT_SCALE_MAX)
    zero = tf.zeros((), tf.float32)
    parts = {
        "contrastive": contrastive_loss(image_embeds, caption_embeds, scale) if config.contrastive_weight else zero,
        "multilabel": multilabel_loss(image_embeds, prompt_embeds, targets, scale)
        if config.multilabel_weight else zero,
        "group": group_loss(group_embeds, prompt_embeds, targets, scale,
                            owned=owned_groups(soft) if getattr(config, "group_owned_only", False) else None)
        if config.group_weight else zero,
        "pixel": zero,
        "uniformity": zero,
        "affinity": zero,
    }
    affinity_weight = float(getattr(config, "affinity_weight", 0.0))
    if affinity_weight:
        if "patch_affinity" not in batch:
            raise ValueError("affinity_weight needs the batch's patch_affinity (numpy_batch(..., "
                             "affinity_patch=PATCH_SIZE), make_dataset(..., affinity_patch=PATCH_SIZE))")
        patch = model.config.vision_config.patch_size
        index, valid = core_losses.patch_neighbours(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        parts["affinity"] = affinity_loss(soft, batch["patch_affinity"], tf.constant(index), tf.constant(valid))
    uniformity_weight = float(getattr(config, "prompt_uniformity_weight", 0.0))
    if uniformity_weight:
        parts["uniformity"] = prompt_uniformity_loss(prompt_embeds,
                                                     float(getattr(config, "prompt_uniformity_temperature", 5.0)))
    if pixel_weight:
        pixel_embeds = tf.reshape(normalize(projected[n_groups + batch_size:]), [batch_size, count, -1])
        parts["pixel"] = pixel_group_loss(pixel_embeds, group_embeds, prompt_embeds, targets, scale, sizes > 0)
    parts["loss"] = (config.contrastive_weight * parts["contrastive"] + config.multilabel_weight * parts["multilabel"]
                     + config.group_weight * parts["group"] + pixel_weight * parts["pixel"]
                     + uniformity_weight * parts["uniformity"] + affinity_weight * parts["affinity"])
    return parts


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps`` (as PyTorch's)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, steps: int) -> None:
        self.lr, self.min_lr, self.warmup_steps, self.steps = float(lr), float(min_lr), int(warmup_steps), int(steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.lr * (step + 1.0) / max(self.warmup_steps, 1)
        progress = tf.clip_by_value((step - self.warmup_steps) / max(1, self.steps - self.warmup_steps), 0.0, 1.0)
        cosine = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self) -> Dict[str, Any]:
        return dict(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, steps=self.steps)


def make_optimizer(model: TFGroupViTModel, config: Any) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.AdamW(
        learning_rate=WarmupCosine(config.lr, config.min_lr, config.warmup_steps, config.steps),
        weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.98, epsilon=1e-6,
        clipnorm=config.grad_clip or None)
    names = ["bias", "gamma", "beta", "embedding", "group_token", "logit_scale", "position"]
    optimizer.exclude_from_weight_decay(var_names=names)
    return optimizer


def init_model(model: TFGroupViTModel, config: Any) -> None:
    """Apply ``config.position_init`` and ``config.attention_init`` to a freshly built model, before training:
    the same values as groupvit_pt.training.init_model (``groupvit_core.losses.initial_weights``; the defaults
    change nothing)."""
    config.validate()
    weights = core_losses.initial_weights(model.config, config.position_init, config.attention_init, config.seed)
    if not weights:
        return
    table = spec_table(model.config)
    variables = model.canonical_variables()
    for name, value in weights.items():
        variables[name].assign(np.asarray(table[name].to_keras(value), dtype=table[name].dtype))


class GroupViTTrainingModel(keras.Model):
    """Wraps a TFGroupViTModel so that ``compile``/``fit`` train it with ``compute_losses``."""

    def __init__(self, model: TFGroupViTModel, config: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groupvit = model
        self.train_config = config
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in ("loss", "contrastive", "multilabel", "group", "pixel", "uniformity",
                                      "affinity")}

    def call(self, inputs, training: bool = False):
        return compute_losses(self.groupvit, inputs, self.train_config, training=training)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def train_step(self, data):
        batch, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.groupvit.trainable_variables
        with tf.GradientTape() as tape:
            parts = compute_losses(self.groupvit, batch, self.train_config, training=True)
        gradients = tape.gradient(parts["loss"], variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        scale = self.groupvit.logit_scale
        scale.assign(tf.minimum(scale, math.log(LOGIT_SCALE_MAX)))
        for name, tracker in self.trackers.items():
            tracker.update_state(parts[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}


def make_dataset(data: Any, config: Any, steps: Optional[int] = None, affinity_patch: int = 0) -> tf.data.Dataset:
    """tf.data of the batches ``data.numpy_batch(step, batch_size, seed)`` for steps 0..steps-1 (the same
    batches as the PyTorch trainer draws); ``affinity_patch`` (the model's patch size) adds the affinity term's
    patch_affinity, which ``config.affinity_weight`` needs."""
    steps = config.steps if steps is None else steps
    first = data.numpy_batch(0, config.batch_size, config.seed, affinity_patch=affinity_patch)
    signature = {k: tf.TensorSpec((None,) + v.shape[1:], tf.as_dtype(v.dtype)) for k, v in first.items()}
    signature["prompt_ids"] = tf.TensorSpec(first["prompt_ids"].shape, tf.int64)
    signature["prompt_mask"] = tf.TensorSpec(first["prompt_mask"].shape, tf.int64)

    def generate():
        for step in range(steps):
            yield data.numpy_batch(step, config.batch_size, config.seed, affinity_patch=affinity_patch)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # a known length, so that Keras' fit counts its steps instead of warning that the input ran out
    return dataset.apply(tf.data.experimental.assert_cardinality(steps))
