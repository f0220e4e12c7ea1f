"""Vision layers that a LLaVA-shaped model does not feed to its language model.

LLaVA (and the models configured like it) hands the language model the vision tower's hidden
state number `config.vision_feature_layer` (-2 by default). hidden_states[0] is the embeddings'
output and hidden_states[k] layer k-1's, so reading hidden_states[k] (k taken modulo L + 1 for L
layers; the largest k of a list) reads layers 0 .. k-1 only. Layers k .. L-1 still run, as the
model returns the tower's output too, but none reaches the logits: an adapter there gets no
gradient from a loss on the logits and stays as initialised. `warn_unread_layers` says so.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

_VISION_LAYER = re.compile(r"(?:^|\.)vision_tower\.(?:.*\.)?layers\.(\d+)\.")


def _unread_layers(config) -> list[int]:
    """Indices of the vision layers after the hidden state the language model reads."""
    layer = getattr(config, "vision_feature_layer", None)
    count = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if layer is None or not isinstance(count, int):
        return []
    layers = [layer] if isinstance(layer, int) else list(layer)
    read = max(index % (count + 1) for index in layers)
    return list(range(read, count))


def warn_unread_layers(model: nn.Module | None, targets: list[str]) -> None:
    """Warn when `targets` include vision layers the language model never reads (see above)."""
    config = getattr(model, "config", None)
    unread = set(_unread_layers(config))
    if not unread:
        return
    hits = [name for name in targets
            if (found := _VISION_LAYER.search(name)) is not None and int(found.group(1)) in unread]
    if hits:
        layers = "|".join(str(i) for i in sorted(unread))
        warnings.warn(
            f"{len(hits)} targets ({hits[0]}, ...) are in vision layer(s) {sorted(unread)}, after the hidden "
            "state the language model reads "
            f"(config.vision_feature_layer={getattr(config, 'vision_feature_layer', None)}): "
            "they do not reach the logits, so their adapters get no gradient and stay as initialised. "
            rf"Leave them out: Spec(..., exclude=['re:vision_tower\..*layers\.({layers})\.'])",
            stacklevel=3,
        )
