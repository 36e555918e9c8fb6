"""Output containers shared by groupvit_pt and groupvit_tf.

An output is an ordered mapping with attribute access (``out.logits_per_image`` or ``out["logits_per_image"]``),
holding whatever tensor type the framework produced. Fields left as None are not stored as keys, so the mapping
can be returned from ``tf.function`` and flattened by ``tf.nest``/``torch.utils._pytree`` like a plain dict; reading
such a field as an attribute gives None. The set of fields never depends on a flag.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Tuple


class ModelOutput(OrderedDict):
    """Ordered mapping of the non-None fields named in ``FIELDS``, readable as attributes."""

    FIELDS: Tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        values = dict(*args, **kwargs)
        unknown = [k for k in values if k not in self.FIELDS]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields are {self.FIELDS}")
        for key in self.FIELDS:
            if values.get(key) is not None:
                OrderedDict.__setitem__(self, key, values[key])

    def __getattr__(self, name: str) -> Any:
        if name in type(self).FIELDS:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.FIELDS:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        if value is None:
            self.pop(key, None)
        else:
            super().__setitem__(key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __reduce__(self):
        return (type(self), (dict(self),))

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self.values())


class BaseModelOutputWithPooling(ModelOutput):
    """One tower's output. For the vision tower ``attentions`` are the soft assignment maps, one per grouping
    stage: (batch, groups, tokens)."""

    FIELDS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class GroupViTModelOutput(ModelOutput):
    FIELDS = (
        "loss",
        "logits_per_image",
        "logits_per_text",
        "segmentation_logits",
        "text_embeds",
        "image_embeds",
        "text_model_output",
        "vision_model_output",
    )
