"""Shared fixtures: 8 fake CPU devices, tiny configs, the shared data directory."""

import os
import pathlib

import jax

# Must run before any JAX computation: multi-device tests use 8 fake CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from jaxrlhf.models import ModelConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JAXRLHF_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set JAXRLHF_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    """A 2-layer, 2-head, width-16 GPT over a 37-token vocabulary."""
    return ModelConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16)
