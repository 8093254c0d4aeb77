"""Helpers several test files share (tests/ is on sys.path: `import _helpers`)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.engine import flags


def random_params(cfg, seed, std=0.2):
    """GPT params drawn with NumPy in the shapes of models.init_params (no PRNG compile: fast tests)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: models.init_params(key, cfg), jax.random.key(0))

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + std * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def parse_recipe(recipe, argv):
    """The config of `argv`, parsed and checked as the recipe's command does."""
    r = recipe
    return flags.parse_checked(
        r.defaults, argv, check=r.check, inactive=r.inactive, renamed=r.renamed, adjust=r.adjust
    )


def read_events(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (its purge rules applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    acc = EventAccumulator(os.fspath(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_series(got: list[tuple[int, float]], want: list[tuple[int, float]]):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, atol=0)
