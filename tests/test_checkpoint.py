"""Checkpoints: bitwise round trips, pruning, cross-mesh restores, clear errors, SIGKILL safety."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.engine import checkpoint
from jaxrlhf.text import CharTokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"n_layer": 2, "n_embd": 128, "vocab_size": 37}


def make_state(seed: int = 0):
    """A train-state-like tree: f32 / bf16 / int32 params, a stepped adamw state, a step, a key."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "wte": jax.random.normal(k1, (16, 8), jnp.float32),
        "block": {
            "w": jax.random.normal(k2, (2, 8, 8)).astype(jnp.bfloat16),
            "b": jnp.arange(8, dtype=jnp.bfloat16) / 3,
        },
        "ids": jnp.arange(5, dtype=jnp.int32) * 7 - 3,
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    grads["ids"] = jnp.zeros_like(params["ids"])
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments, count = 1
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(41), "key": k3}


def host(x) -> np.ndarray:
    """Host copy, with typed PRNG keys as their raw key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert host(x).tobytes() == host(y).tobytes()


def test_relative_run_dir(tmp_path, monkeypatch):
    """A relative run directory (the pipelines' default `--out runs/...`) saves, lists and restores:
    orbax >= 0.12 refuses relative paths, so the checkpoint layer makes them absolute itself."""
    monkeypatch.chdir(tmp_path)
    state = make_state()
    tok = CharTokenizer.from_corpus(["abc"])
    tok.save(tmp_path / "tok.json")
    checkpoint.save("runs/rel", "sft", 3, state, meta={"k": 1}, tokenizer="tok.json")
    assert sorted(os.listdir(tmp_path / "runs" / "rel" / "sft")) == ["3"]
    assert checkpoint.all_steps("runs/rel", "sft") == [3] and checkpoint.has_stage("./runs/rel", "sft")
    restored, meta = checkpoint.restore("runs/rel", "sft", jax.eval_shape(lambda: state))
    assert_bitwise_equal(restored, state) and meta["k"] == 1
    assert checkpoint.restore_meta("runs/../runs/rel", "sft") == meta
    got = checkpoint.restore_tokenizer("runs/rel", "sft", "restored")
    assert load_tokenizer(got).encode("cab") == tok.encode("cab")
    # The same checkpoint through its absolute path, from elsewhere.
    monkeypatch.chdir(tmp_path / "runs")
    assert checkpoint.latest_step(tmp_path / "runs" / "rel", "sft") == 3
    assert checkpoint.latest_step("rel", "sft") == 3  # relative to the new working directory
    # URLs are left as they are (no local folder named "gs:" is ever made).
    assert os.fspath(checkpoint.resolve("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(checkpoint.resolve("runs/x")) == os.path.join(os.getcwd(), "runs", "x")


def test_round_trip_is_bitwise(tmp_path):
    state = make_state()
    meta = {"epoch": 2, "batch_index": 17, "prng": {"seed": 0, "step": 41}, "config": CONFIG}
    path = checkpoint.save(tmp_path, "sft", 41, state, meta={**meta, "shape": (3, 4)})
    assert os.fspath(path) == os.fspath(tmp_path / "sft" / "41")

    restored, restored_meta = checkpoint.restore(tmp_path, "sft", jax.eval_shape(lambda: state))
    assert_bitwise_equal(restored, state)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # ScaleByAdamState
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
    assert restored_meta == {**meta, "shape": [3, 4]}  # JSON: tuples come back as lists
    assert checkpoint.restore_meta(tmp_path, "sft") == restored_meta
    # A concrete target works too.
    assert_bitwise_equal(checkpoint.restore(tmp_path, "sft", make_state(seed=1))[0], state)


def test_keep_prunes_oldest_and_latest_step(tmp_path):
    assert checkpoint.latest_step(tmp_path, "rl") is None
    assert not checkpoint.has_stage(tmp_path, "rl")
    state = {"x": jnp.zeros(4)}
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, "rl", step, {"x": state["x"] + step}, keep=2)
    assert checkpoint.all_steps(tmp_path, "rl") == [30, 40]
    assert checkpoint.latest_step(tmp_path, "rl") == 40
    assert checkpoint.has_stage(tmp_path, "rl") and not checkpoint.has_stage(tmp_path, "sft")
    assert sorted(os.listdir(tmp_path / "rl")) == ["30", "40"]  # nothing left in .deleting
    old, _ = checkpoint.restore(tmp_path, "rl", state, step=30)
    np.testing.assert_array_equal(old["x"], np.full(4, 30.0))
    checkpoint.save(tmp_path, "rl", 50, state, keep=None)
    assert checkpoint.all_steps(tmp_path, "rl") == [30, 40, 50]


def test_restore_across_meshes(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    one_device = SingleDeviceSharding(jax.devices()[0])
    state = make_state()
    checkpoint.save(tmp_path, "sft", 1, state)  # every array on device 0

    # Onto 8 devices: [16, 8] wte split over 'data', everything else replicated.
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    shardings = {"params": {"wte": data, "block": replicated, "ids": replicated}}
    shardings |= {"opt_state": replicated, "step": replicated, "key": replicated}
    target = checkpoint.abstract_like(jax.eval_shape(lambda: state), shardings)
    sharded, _ = checkpoint.restore(tmp_path, "sft", target)
    assert_bitwise_equal(sharded, state)
    assert sharded["params"]["wte"].sharding == data
    assert len(sharded["params"]["wte"].addressable_shards) == 8
    assert sharded["params"]["wte"].addressable_shards[0].data.shape == (2, 8)
    assert sharded["opt_state"][0].mu["wte"].sharding == replicated
    assert sharded["key"].sharding == replicated

    # And back: saved from the 8-device mesh, restored onto one device.
    checkpoint.save(tmp_path, "sft", 2, sharded)
    back, _ = checkpoint.restore(tmp_path, "sft", checkpoint.abstract_like(state, one_device))
    assert_bitwise_equal(back, state)
    assert all(x.sharding == one_device for x in jax.tree.leaves(back))


def test_config_mismatch_names_keys(tmp_path):
    checkpoint.save(tmp_path, "sft", 40, make_state(), meta={"config": CONFIG, "seed": 1})
    state = make_state()
    good, _ = checkpoint.restore(tmp_path, "sft", state, meta_check={"config": dict(CONFIG)})
    assert_bitwise_equal(good, state)
    with pytest.raises(ValueError) as e:
        checkpoint.restore(tmp_path, "sft", state, meta_check={"config": {**CONFIG, "n_embd": 64}})
    assert str(e.value) == (
        f"checkpoint {tmp_path}/sft step 40 was written with config n_embd=128, this run has "
        "config n_embd=64: use a matching config or a fresh --out"
    )
    with pytest.raises(ValueError) as e:
        checkpoint.restore(
            tmp_path,
            "sft",
            state,
            meta_check={"config": {**CONFIG, "n_layer": 4, "x": 1}, "seed": 2},
        )
    assert str(e.value) == (
        f"checkpoint {tmp_path}/sft step 40 was written with config n_layer=2, x=<unset> and "
        "seed=1, this run has config n_layer=4, x=1 and seed=2: use a matching config or a "
        "fresh --out"
    )


def test_missing_stage_and_step(tmp_path):
    run_dir = tmp_path / "happy"
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.restore(run_dir, "sft", make_state())
    assert str(e.value) == (
        f"no checkpoint for stage 'sft' under {run_dir}: run the sft stage first (or check --out)"
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint for stage 'rl'"):
        checkpoint.restore_meta(run_dir, "rl")
    checkpoint.save(run_dir, "sft", 3, {"x": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"has no step 4 \(it has 3\)"):
        checkpoint.restore(run_dir, "sft", {"x": jnp.ones(2)}, step=4)


def test_tree_mismatch_is_one_clear_line(tmp_path):
    state = make_state()
    checkpoint.save(tmp_path, "sft", 5, state)
    where = f"checkpoint {tmp_path}/sft step 5 does not match the restore target: "
    fix = "; build the target from the config that wrote it (or use a fresh --out)"

    wider = jax.tree.map(lambda x: x, state)
    wider["params"]["wte"] = jnp.zeros((16, 4))
    with pytest.raises(ValueError) as e:
        checkpoint.restore(tmp_path, "sft", wider)
    assert str(e.value) == where + "params.wte is float32[16, 8] in it, float32[16, 4] here" + fix

    renamed = {**state, "params": {**state["params"], "wpe": state["params"]["ids"]}}
    del renamed["params"]["ids"]
    with pytest.raises(ValueError) as e:
        checkpoint.restore(tmp_path, "sft", renamed)
    assert str(e.value) == (
        where + "missing from the checkpoint: params.wpe; not in the target: params.ids" + fix
    )

    with pytest.raises(ValueError, match=r"step is int32\[\] in it, float32\[\] here"):
        checkpoint.restore(tmp_path, "sft", {**state, "step": jnp.float32(0)})
    mesh = jax.make_mesh((8,), ("data",))
    split = {"params": NamedSharding(mesh, P("data")), "opt_state": None, "step": None, "key": None}
    with pytest.raises(ValueError, match=r"over its sharding: params.block.w \[2, 8, 8\] over P"):
        checkpoint.restore(tmp_path, "sft", checkpoint.abstract_like(state, split))
    with pytest.raises(ValueError, match=r"abstract_like: leaf key: .* rank at least 1"):
        checkpoint.abstract_like(state, NamedSharding(mesh, P("data")))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_state_is_refused_and_nothing_written(tmp_path, bad):
    state = make_state()
    state["opt_state"][0].nu["block"]["b"] = state["opt_state"][0].nu["block"]["b"].at[3].set(bad)
    with pytest.raises(ValueError) as e:
        checkpoint.save(tmp_path, "rl", 7, state)
    assert str(e.value) == (
        f"refusing to save {tmp_path}/rl step 7: state leaf opt_state.0.nu.block.b holds NaN or "
        "inf, nothing was written; check the loss and learning rate, or resume from the last good "
        "step"
    )
    assert not (tmp_path / "rl").exists()
    with pytest.raises(ValueError, match="state leaf lr holds NaN or inf"):
        checkpoint.save(tmp_path, "rl", 7, {"x": jnp.ones(3), "lr": float(bad)})
    with pytest.raises(ValueError, match="meta must be plain JSON"):
        checkpoint.save(tmp_path, "rl", 7, {"x": jnp.ones(3)}, meta={"loss": float(bad)})
    assert checkpoint.latest_step(tmp_path, "rl") is None


def test_nonfinite_check_is_one_program_per_device_set_and_names_the_right_leaf():
    # Leaves of 8 shapes on 3 device sets: op by op (isfinite, then all) that is 16 compiled programs,
    # ~1 MB of host memory each on XLA:CPU; grouped, one per device set.
    mesh = jax.make_mesh((8,), ("data",))
    split = NamedSharding(mesh, P("data"))
    dev1 = SingleDeviceSharding(jax.devices()[1])
    tree = {
        "a": {f"w{n}": jnp.ones((8, n), jnp.float32) for n in range(1, 6)},
        "b": jax.device_put(jnp.ones((16, 3), jnp.bfloat16), split),
        "c": jax.device_put(jnp.ones((5,), jnp.float32), dev1),
        "d": jax.device_put(jnp.ones((2, 2), jnp.float32), dev1),
        "n": np.ones(3, np.float32),
        "key": jax.random.key(0),
    }
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.clear_caches()
        assert checkpoint._nonfinite_leaf(tree) is None
        device_sets = {
            frozenset(x.sharding.device_set)
            for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array) and x.ndim
        }
        assert len(device_sets) == 3 and len(compiles) <= 3
        # A NaN is found on whichever device set it lives, and named by its own path.
        for path, sharding in (("d", dev1), ("a.w4", None), ("b", split)):
            *parents, name = path.split(".")
            bad = jax.tree.map(lambda x: x, tree)  # new containers, the same leaves
            owner = bad[parents[0]] if parents else bad
            host = np.array(owner[name], np.float32)
            host[0, ...] = np.nan
            owner[name] = jax.device_put(host.astype(owner[name].dtype), sharding)
            assert checkpoint._nonfinite_leaf(bad) == path
        bad = {**tree, "n": np.array([1.0, np.inf], np.float32)}
        assert checkpoint._nonfinite_leaf(bad) == "n"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_existing_step_needs_overwrite(tmp_path):
    checkpoint.save(tmp_path, "sft", 3, {"x": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"sft/3 already exists: pass overwrite=True"):
        checkpoint.save(tmp_path, "sft", 3, {"x": jnp.ones(2)})
    checkpoint.save(tmp_path, "sft", 3, {"x": jnp.ones(2)}, meta={"v": 2}, overwrite=True)
    state, meta = checkpoint.restore(tmp_path, "sft", {"x": jnp.zeros(2)})
    np.testing.assert_array_equal(state["x"], np.ones(2))
    assert meta == {"v": 2} and checkpoint.all_steps(tmp_path, "sft") == [3]


def test_half_written_save_is_ignored(tmp_path):
    """What a kill mid-save leaves: a temporary step dir (newer), and a half-deleted pruned step."""
    checkpoint.save(tmp_path, "sft", 1, {"x": jnp.full(4, 1.0)}, meta={"step": 1})
    stage = tmp_path / "sft"
    partial = stage / "2.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
    (stage / ".deleting" / "0" / "state").mkdir(parents=True)
    assert checkpoint.latest_step(tmp_path, "sft") == 1
    state, meta = checkpoint.restore(tmp_path, "sft", {"x": jnp.zeros(4)})
    np.testing.assert_array_equal(state["x"], np.full(4, 1.0))
    assert meta == {"step": 1}
    assert partial.exists()  # a reader never removes a save that may still be in flight

    checkpoint.save(tmp_path, "sft", 2, {"x": jnp.full(4, 2.0)}, meta={"step": 2})
    assert sorted(os.listdir(stage)) == ["1", "2"]  # the leftovers are cleaned up
    state, meta = checkpoint.restore(tmp_path, "sft", {"x": jnp.zeros(4)})
    np.testing.assert_array_equal(state["x"], np.full(4, 2.0))


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    tokenizer = CharTokenizer.from_corpus(["hello world", "héllo ✓"])
    tokenizer.save(tmp_path / "tok")
    checkpoint.save(tmp_path, "pretrain", 1, {"x": jnp.ones(2)}, tokenizer=tmp_path / "tok")
    path = checkpoint.restore_tokenizer(tmp_path, "pretrain", tmp_path / "restored")
    assert load_tokenizer(os.fspath(path)).chars == tokenizer.chars
    checkpoint.save(tmp_path, "sft", 1, {"x": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        checkpoint.restore_tokenizer(tmp_path, "sft", tmp_path / "restored")


# Saves a 24 MB state (x = noise + step) as steps latest+1, latest+2, ... forever; prints each one.
_SAVER = """
import sys
import jax
import jax.numpy as jnp
from jaxrlhf.engine import checkpoint

run_dir = sys.argv[1]
noise = jax.random.normal(jax.random.key(0), (6_000_000,))
step = (checkpoint.latest_step(run_dir, "loop") or 0) + 1
while True:
    state = {"x": noise + step, "step": jnp.int32(step)}
    checkpoint.save(run_dir, "loop", step, state, meta={"step": step})
    print(step, flush=True)
    step += 1
"""


def test_sigkill_during_save_keeps_last_good_step(tmp_path):
    rng = random.Random(0)
    killed_mid_save = 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    noise = jax.random.normal(jax.random.key(0), (6_000_000,))
    target = {"x": jax.ShapeDtypeStruct(noise.shape, noise.dtype), "step": jnp.int32(0)}
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            finished = int(proc.stdout.readline())
            # The next save has just started and takes ~0.15-0.3 s here: kill inside it (mostly).
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed_mid_save += any(".orbax-checkpoint-tmp" in p for p in os.listdir(tmp_path / "loop"))
        step = checkpoint.latest_step(tmp_path, "loop")
        assert step is not None and step >= finished
        state, meta = checkpoint.restore(tmp_path, "loop", target)
        assert meta == {"step": step} and int(state["step"]) == step
        assert host(state["x"]).tobytes() == host(noise + step).tobytes()
    assert checkpoint.all_steps(tmp_path, "loop")[-1] >= 5
    assert killed_mid_save >= 1  # the case this test is about did happen


# One of two processes (4 CPU devices each, one 8-device mesh): saves, refusals, cross-mesh restore.
_PROCESS = """
import sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

process_id, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
from jaxrlhf.engine import checkpoint

mesh = jax.make_mesh((8,), ("data",))
split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
make = jax.jit(
    lambda s: {"w": jnp.arange(64.0).reshape(16, 4) + s, "step": jnp.int32(s)},
    static_argnums=0,
    out_shardings={"w": split, "step": replicated},
)
for step in (1, 2, 3):
    checkpoint.save(run_dir, "sft", step, make(step), meta={"step": step}, keep=2)
assert checkpoint.all_steps(run_dir, "sft") == [2, 3]
try:
    checkpoint.save(run_dir, "sft", 3, make(3))
    raise AssertionError("overwrote step 3")
except ValueError as e:
    assert "already exists" in str(e)
try:
    checkpoint.save(run_dir, "sft", 4, {"w": make(4)["w"] * jnp.nan})
    raise AssertionError("saved NaN")
except ValueError as e:
    assert "state leaf w holds NaN" in str(e)

mesh2 = jax.make_mesh((2, 4), ("a", "b"))
target = {
    "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh2, P("b", "a"))),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh2, P())),
}
state, meta = checkpoint.restore(run_dir, "sft", target)
assert meta == {"step": 3} and state["w"].sharding == target["w"].sharding
gathered = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh2, P()))(state["w"])
expected = np.arange(64.0).reshape(16, 4) + 3
np.testing.assert_array_equal(gathered.addressable_shards[0].data, expected)
print("ok", flush=True)
"""


def test_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(i), str(port), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and out.rstrip().endswith("ok"), out[-3000:]


def test_a_save_killed_before_its_checksums_is_not_a_checkpoint(tmp_path):
    """The window between orbax finalising a step and its checksums.json: that step is skipped by
    latest_step / restore(step=None) and replaced by the next save of the same step number."""
    for step in (1, 2):
        checkpoint.save(tmp_path, "s", step, {"x": jnp.full((3,), float(step))}, meta={"step": step})
    (tmp_path / "s" / "2" / "checksums.json").unlink()  # as if killed right after orbax's rename
    assert checkpoint.all_steps(tmp_path, "s") == [1, 2] and checkpoint.latest_step(tmp_path, "s") == 1
    state, meta = checkpoint.restore(tmp_path, "s", {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert meta["step"] == 1 and float(state["x"][0]) == 1.0
    checkpoint.save(tmp_path, "s", 2, {"x": jnp.full((3,), 7.0)}, meta={"step": 2})  # the rerun's save
    assert checkpoint.latest_step(tmp_path, "s") == 2
    assert (
        float(checkpoint.restore(tmp_path, "s", {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})[0]["x"][0])
        == 7.0
    )
    with pytest.raises(ValueError, match="already exists"):  # a finished step is still never replaced
        checkpoint.save(tmp_path, "s", 2, {"x": jnp.zeros((3,))}, meta={"step": 2})
