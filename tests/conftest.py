"""Shared fixtures: 8 fake CPU devices, tiny configs, the shared data directory."""

import contextlib
import os
import pathlib
import sys

import jax

# Must run before any JAX computation: multi-device tests use 8 fake CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402
from etils.epath import testing as epath_testing  # noqa: E402

from jaxrlhf.models import ModelConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # experiments/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))
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

@pytest.fixture
def gcs():
    """`with gcs(root):` etils epath with gs://BUCKET/... mapped onto root/BUCKET/... (nothing leaves this
    machine)."""
    return _fake_gcs


@contextlib.contextmanager
def _fake_gcs(root: pathlib.Path):
    """etils epath with gs://BUCKET/... mapped onto root/BUCKET/... (nothing leaves this machine)."""

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://") :]) if text.startswith("gs://") else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    names = (
        "exists",
        "glob",
        "isdir",
        "listdir",
        "makedirs",
        "mkdir",
        "open",
        "remove",
        "rmtree",
        "stat",
        "walk",
    )
    with epath_testing.mock_epath(**dict.fromkeys(names, one), copy=two, rename=two, replace=two):
        yield
