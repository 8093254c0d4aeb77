"""ArmoRM checkpoints (RLHFlow/ArmoRM-Llama3-8B-v0.1, config.json `architectures:
["LlamaForRewardModelWithGating"]`): the head's tensors and config fields, read and checked.

The trunk is a Llama (`model.*`, read through `llama.tensors` like any Llama reward model); the head
is, in the published modeling_custom.py's names and shapes (K = num_objectives, D = hidden_size,
G = gating_hidden_dim, n = gating_n_hidden):

    regression_layer.weight   [K, D]   no bias
    reward_transform_matrix   [K, K]
    gating.logit_scale        [1]
    gating.layers.{i}.weight  [G, D] (i = 0), [G, G] (0 < i < n), [K, G or D] (i = n); each with a bias

config.json's num_objectives, gating_temperature, gating_hidden_dim and gating_n_hidden default as the
published code's do (19, 10, 1024, 3). The gate's token pattern is the published code's constant (Llama 3's
ids of the assistant header) unless the caller or config.json (`gating_token_pattern`) gives others. The
maths is `jaxrlhf.models.armorm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.armorm import ASSISTANT_PATTERN

ARCHITECTURE = "LlamaForRewardModelWithGating"
REGRESSION, TRANSFORM, LOGIT_SCALE = (
    "regression_layer.weight",
    "reward_transform_matrix",
    "gating.logit_scale",
)
DEFAULTS = {"num_objectives": 19, "gating_temperature": 10, "gating_hidden_dim": 1024, "gating_n_hidden": 3}
PATTERN_KEY = "gating_token_pattern"  # optional config.json key: the gate's token ids


def is_head_tensor(name: str) -> bool:
    return name in (REGRESSION, TRANSFORM) or name.startswith("gating.")


def _int_field(hf_config: Mapping, name: str, low: int, where: str) -> int:
    value = hf_config.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}/config.json: {name}={value!r}; ArmoRM needs an integer >= {low}")
    return value


def head_shapes(hf_config: Mapping, where: str) -> tuple[dict[str, tuple], str]:
    """({tensor name: the shape config.json implies}, a description of those fields for messages)."""
    k = _int_field(hf_config, "num_objectives", 1, where)
    g = _int_field(hf_config, "gating_hidden_dim", 1, where)
    n = _int_field(hf_config, "gating_n_hidden", 0, where)
    d = int(hf_config["hidden_size"])
    shapes = {REGRESSION: (k, d), TRANSFORM: (k, k), LOGIT_SCALE: (1,)}
    for i in range(n + 1):
        out, inp = (g if i < n else k), (d if i == 0 else g)
        shapes[f"gating.layers.{i}.weight"] = (out, inp)
        shapes[f"gating.layers.{i}.bias"] = (out,)
    fields = f"num_objectives={k}, gating_n_hidden={n}, gating_hidden_dim={g}, hidden_size={d}"
    return shapes, fields


def gating_pattern(hf_config: Mapping, pattern: Sequence[int] | None, where: str) -> tuple[int, ...]:
    """The gate's token ids: `pattern`, else config.json's gating_token_pattern, else Llama 3's assistant
    header (the published constant); each a token id of the vocabulary."""
    source = "gating_pattern"
    if pattern is None:
        pattern, source = hf_config.get(PATTERN_KEY), f"config.json's {PATTERN_KEY}"
    if pattern is None:
        pattern, source = ASSISTANT_PATTERN, "ArmoRM's Llama 3 assistant header"
    vocab = int(hf_config["vocab_size"])
    ids = list(pattern) if isinstance(pattern, Sequence) and not isinstance(pattern, str) else [pattern]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < vocab]
    if not ids or bad:
        raise ValueError(
            f"{where}: the gating pattern {pattern!r} ({source}) is not a non-empty list of token ids below "
            f"vocab_size={vocab}; pass gating_pattern= the ids of its tokenizer's assistant header "
            "('<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n')"
        )
    return tuple(int(i) for i in ids)


def read_head(
    views: Mapping[str, Callable[[], np.ndarray]],
    hf_config: Mapping,
    where: str,
    pattern: Sequence[int] | None = None,
) -> dict:
    """The head's params (`models.armorm`) from a checkpoint's tensors; every head tensor checked against
    config.json.

    Raises:
      ValueError: one line naming the tensor (missing, of another shape than config.json implies, or not
        one config.json describes) or the config field.
    """
    temperature = hf_config.get("gating_temperature", DEFAULTS["gating_temperature"])
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(
            f"{where}/config.json: gating_temperature={temperature!r}; ArmoRM needs a number > 0"
        )
    shapes, fields = head_shapes(hf_config, where)
    unexpected = sorted(n for n in views if is_head_tensor(n) and n not in shapes)
    if unexpected:
        raise ValueError(
            f"{where} holds ArmoRM head tensors its config.json ({fields}) does not describe: unexpected "
            f"{unexpected[:5]}; the weights and config.json disagree"
        )

    def get(name: str) -> np.ndarray:
        if name not in views:
            raise ValueError(
                f"{where} has no tensor {name!r} (expected for the ArmoRM head of its config.json: "
                f"{fields}); copy the weights again"
            )
        x = views[name]()
        if x.shape != shapes[name]:
            raise ValueError(
                f"{where}: tensor {name!r} has shape {x.shape}; config.json expects {shapes[name]} ({fields})"
            )
        return np.asarray(x, np.float32)

    n_layers = sum(name.endswith(".weight") and name.startswith("gating.layers.") for name in shapes)
    regression, transform, logit_scale = get(REGRESSION), get(TRANSFORM), get(LOGIT_SCALE)
    layers = [
        {
            "kernel": jnp.asarray(get(f"gating.layers.{i}.weight").T),
            "bias": jnp.asarray(get(f"gating.layers.{i}.bias")),
        }
        for i in range(n_layers)
    ]
    return {
        "regression": jnp.asarray(regression.T),
        "transform": jnp.asarray(transform),
        "gating": {
            "layers": layers,
            "logit_scale": jnp.asarray(logit_scale[0]),
            "temperature": jnp.asarray(float(temperature), jnp.float32),
        },
        "pattern": jnp.asarray(gating_pattern(hf_config, pattern, where), jnp.int32),
    }
