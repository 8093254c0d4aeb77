"""jaxrlhf.memory: RSS readings against /proc and getrusage, a tracked block's peak, malloc_trim."""

import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrlhf.engine import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@linux
def test_rss_and_peak_match_the_kernel():
    now, peak = memory.rss_mb(), memory.peak_rss_mb()
    assert 1 < now <= peak
    # ru_maxrss can only be higher (it keeps a parent's peak across exec), never lower than VmHWM.
    assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1


@linux
def test_track_sees_a_block_that_raises_the_peak():
    mb = int(memory.peak_rss_mb() - memory.rss_mb()) + 200  # above the process's earlier peak
    with memory.track() as mem:
        block = np.ones(mb * 2**20 // 8)  # touched pages: resident
        del block
    assert mem.scope == "exact"
    assert mem.peak >= mem.start + mb * 0.9
    assert mem.end < mem.peak - mb * 0.5  # freed: a large NumPy array is unmapped at once
    s = mem.summary()
    assert s["rss_peak_mb"] == round(mem.peak, 1) and s["rss_peak_scope"] == "exact"
    assert s["rss_process_peak_mb"] >= s["rss_peak_mb"]


@linux
def test_track_samples_a_block_under_an_earlier_peak():
    earlier = np.ones((int(memory.peak_rss_mb() - memory.rss_mb()) + 200) * 2**20 // 8)  # an earlier peak,
    del earlier  # whichever worker runs this test and whatever ran before it
    with memory.track() as mem:
        block = np.ones(40 * 2**20 // 8)  # 40 MB, well under the previous test's peak
        time.sleep(0.2)  # several sampler ticks
        del block
    assert mem.scope == "sampled"
    assert mem.start + 30 <= mem.peak < mem.process_peak
    # RSS's parts, sampled at the same ticks: at the tick of the highest RSS they add up to it.
    assert mem.anon_peak >= 40 and mem.anon_peak + mem.file_peak >= mem.peak - 1


@linux
def test_track_tells_file_backed_pages_from_the_heap(tmp_path):
    """A mapped file's pages count as file-backed RSS (RssFile), not anonymous: the split that shows
    how much of a run's RSS is shared-library code."""
    path = tmp_path / "data.bin"
    np.ones(64 * 2**20 // 8).tofile(path)
    before = memory._status_fields_mb("RssAnon", "RssFile")
    with memory.track() as mem:
        mapped = np.memmap(path, dtype=np.float64, mode="r")
        assert float(mapped.sum()) == mapped.size  # every page read: resident
        time.sleep(0.2)
        del mapped
    assert mem.file_peak >= before["RssFile"] + 50
    assert mem.anon_peak < before["RssAnon"] + 20


def test_track_degrades_without_proc(monkeypatch):
    monkeypatch.setattr(memory, "_STATUS", "/nonexistent/status")
    assert memory.rss_mb() is None
    with memory.track() as mem:
        pass
    assert mem.start is None and mem.end is None and mem.scope == "process"
    assert mem.peak is None or mem.peak > 1  # ru_maxrss where there is `resource`


def test_malloc_trim_is_safe():
    assert memory.malloc_trim() in (True, False)


def test_tracker_stop_is_idempotent():
    tracker = memory.Tracker()
    first = tracker.stop()
    assert tracker.stop() is first
    assert set(first.summary()) == {
        "rss_start_mb", "rss_peak_mb", "rss_end_mb", "rss_process_peak_mb", "rss_peak_scope",
        "rss_anon_peak_mb", "rss_file_peak_mb",
    }  # fmt: skip


def test_trim_after_compiles_trims_once_per_compile_and_changes_no_result(monkeypatch):
    import jax
    import jax.numpy as jnp

    x = jnp.arange(12.0).reshape(3, 4)

    def fn(x, c):
        return jnp.tanh(x @ x.T + c).sum(0)

    expected = np.asarray(jax.jit(fn)(x, 0.5))
    same = jax.jit(lambda x, c: fn(x, c))  # another function: traced and compiled again
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append(1) or True)
    if memory._libc() is None:
        pytest.skip("no glibc: trim_after_compiles does nothing")
    with memory.trim_after_compiles():
        got = np.asarray(same(x, 0.5))
        n_compiled = len(calls)
        again = np.asarray(same(x, 0.5))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(again, expected)
    assert n_compiled >= 1  # at least this program's compile
    assert len(calls) == n_compiled + 1  # the cached call compiled nothing; one trim at the end
    jax.jit(lambda x: x * 3)(x).block_until_ready()  # after the block: the listener is gone
    assert len(calls) == n_compiled + 1


def _lean_in_fresh_process(code: str, xla_flags: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("|")


_LEAN = (
    "import os, jax, jax.numpy as jnp; from jaxrlhf.engine import memory; a = memory.lean_cpu_compiles(); "
    "x = float(jnp.ones(3).sum()); b = memory.lean_cpu_compiles(); "
    "print(a, b, x, sep='|', end='|'); print(os.environ.get('XLA_FLAGS', ''), end='')"
)


def test_lean_cpu_compiles_before_jax_starts_and_never_over_the_users_flag():
    # Before the first computation: the flag is set, XLA accepts it (an unknown one aborts the process)
    # and the computation runs; once JAX has started, a second call changes nothing.
    a, b, x, flags = _lean_in_fresh_process(_LEAN, "--xla_cpu_enable_fast_math=false")
    assert (a, b, x) == ("True", "False", "3.0")
    assert flags == "--xla_cpu_enable_fast_math=false --xla_cpu_use_fusion_emitters=false"
    # The user's own setting of the flag wins.
    a, _, _, flags = _lean_in_fresh_process(_LEAN, "--xla_cpu_use_fusion_emitters=true")
    assert a == "False" and flags == "--xla_cpu_use_fusion_emitters=true"
    # Too late: JAX already computed, so XLA would never read it.
    late = "import jax; jax.numpy.ones(1).block_until_ready(); from jaxrlhf.engine import memory; "
    late += "print(memory.lean_cpu_compiles(), end='|')"
    assert _lean_in_fresh_process(late, None)[0] == "False"


def test_lean_cpu_compiles_skips_a_flag_this_xla_lacks(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as if JAX had not started
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(memory, "_LEAN_FLAG", "xla_cpu_no_such_flag_in_any_build")
    assert not memory.lean_cpu_compiles()  # XLA would abort on it
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setattr(memory, "_LEAN_FLAG", "xla_cpu_use_fusion_emitters")
    assert memory.lean_cpu_compiles()  # the same call with the flag this XLA has
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=false"


def test_periodic_trim_keeps_its_interval_and_its_share_of_the_time(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append(time.perf_counter()) or True)
    trim = memory.PeriodicTrim(interval_s=0.05, max_share=1.0)
    assert not trim()  # the interval counts from its creation
    time.sleep(0.06)
    assert trim() and not trim()  # once, then not again within the interval
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:
        trim()
    assert 3 <= len(calls) <= 11  # at most every 0.05 s over 0.5 s, however often it is called

    # A slow trim (20 ms) spaced to stay under max_share of the time: 10% -> one every >= 0.2 s.
    calls.clear()
    monkeypatch.setattr(memory, "malloc_trim", lambda: time.sleep(0.02) or calls.append(1) or True)
    trim = memory.PeriodicTrim(interval_s=0.0, max_share=0.1)
    t_end = time.perf_counter() + 0.7
    while time.perf_counter() < t_end:
        trim()
    assert 1 <= len(calls) <= 4  # at most 0.7 s / (0.2 + 0.02) s; without the share: ~35
