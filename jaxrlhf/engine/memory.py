"""Host memory of this process: resident set size (RSS) now and at its peak, per stage, and handing
freed heap back to the OS.

Linux first, and safe elsewhere: a reader returns None where its number is not available (no /proc),
and `malloc_trim` does nothing without glibc.

    with memory.track() as mem:          # a stage
        ...
    summary.update(mem.summary())        # rss_start_mb, rss_peak_mb, rss_end_mb, ...

Peaks come from the kernel's high-water mark (VmHWM in /proc/self/status), which is never reset here:
resetting it (`/proc/self/clear_refs`) also resets ru_maxrss and the "Maximum resident set size" that
`/usr/bin/time -v` reports for the whole run. VmHWM rather than ru_maxrss because on Linux ru_maxrss
keeps the parent's peak across fork + exec (a run started from pytest reports pytest's peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import os
import sys
import threading
import time

_STATUS = "/proc/self/status"


def _status_fields_mb(*fields: str) -> dict[str, float]:
    """The `kB` fields of /proc/self/status among `fields` ("VmRSS", "VmHWM", "RssAnon", ...) in MB;
    those it does not find (or no /proc) are missing."""
    out = {}
    try:
        with open(_STATUS) as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    out[name] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _status_mb(field: str) -> float | None:
    """A `kB` field of /proc/self/status ("VmRSS", "VmHWM") in MB, or None."""
    return _status_fields_mb(field).get(field)


def rss_mb() -> float | None:
    """Resident set size now, in MB (None where /proc is missing)."""
    return _status_mb("VmRSS")


def _ru_maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def peak_rss_mb() -> float | None:
    """The process's peak resident set size so far, in MB (None where unknown)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else _ru_maxrss_mb()


def snapshot() -> dict:
    """{"rss_mb": now, "peak_rss_mb": the process's peak so far}, rounded; None where unknown."""
    return {"rss_mb": _round(rss_mb()), "peak_rss_mb": _round(peak_rss_mb())}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@functools.cache
def _libc():
    """glibc's handle, or None (musl, macOS, Windows: no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def malloc_trim() -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`, every arena).

    glibc keeps memory that Python, NumPy or XLA freed in its arenas (one per thread that allocated,
    up to 8 per core), so RSS stays at a stage's peak after the stage's buffers are gone. Returns
    whether anything was released; False (and nothing done) without glibc.
    """
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


class PeriodicTrim:
    """`malloc_trim` between the steps of a loop: call it after every step; it trims at most once every
    `interval_s` seconds, and never more than `max_share` of the time since its last trim.

    A step frees what it allocated (outputs, host copies, the reward's text), but glibc keeps freed
    heap pages for reuse, and pieces still in use pin the pages around them, so a long stage's RSS
    creeps up between compiles. Measured on HappyGPT's PPO stage (resumed in a process that had restored
    pretraining and SFT): without it the stage's peak rose from 619 to 667 MB over 200 iterations; once a
    second, 651; every 10 iterations, 639; every iteration, 632. On HappyGPT's 64-row LM step (one
    process, alternated): once a second costs nothing measurable (95.2 vs 95.5 ms median), every step
    1.03x; one trim takes ~0.3 ms there.
    """

    def __init__(self, interval_s: float = 1.0, max_share: float = 0.01):
        self._interval_s = interval_s
        self._max_share = max_share
        self._last = time.perf_counter()
        self._cost = 0.0  # the last trim's duration

    def __call__(self) -> bool:
        """Trim if the interval has passed; returns whether it trimmed."""
        now = time.perf_counter()
        if now - self._last < max(self._interval_s, self._cost / self._max_share):
            return False
        malloc_trim()
        self._last = time.perf_counter()
        self._cost = self._last - now
        return True


def drop_programs() -> None:
    """Free every compiled program JAX caches, then the heap they held (`malloc_trim`). Between stages,
    each stage's compiles then start from the RSS of the params and data alone: held together, one
    stage's programs and the next one's set a run's peak on XLA:CPU (a program holds host memory roughly
    in proportion to its HLO). Programs compile to the same code again (or come back from the persistent
    compile cache), so no result changes."""
    import jax  # noqa: PLC0415  (the rest of this module does not need it)

    jax.clear_caches()
    malloc_trim()


_M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at `n` for the rest of the process (`mallopt(M_ARENA_MAX, n)`), unless
    $MALLOC_ARENA_MAX already sets it. Returns whether the cap was set.

    glibc gives each thread that allocates its own arena, up to 8 per core, and an arena's freed
    memory serves only that arena: XLA's compile and Eigen threads each keep their own high-water mark.
    Call it before the threads start (before the first JAX computation); arenas that exist stay.
    """
    libc = _libc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, n))


_LEAN_FLAG = "xla_cpu_use_fusion_emitters"


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has `flag` (its name is in one of jaxlib's libraries). XLA aborts the
    process on an unknown name in $XLA_FLAGS, so a flag is only set where this says yes."""
    import glob  # noqa: PLC0415
    import mmap  # noqa: PLC0415

    try:
        import jaxlib  # noqa: PLC0415
    except ImportError:
        return False
    for lib in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
        try:
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(flag.encode()) >= 0:
                    return True
        except (OSError, ValueError):  # unreadable, or empty (mmap refuses size 0)
            continue
    return False


def lean_cpu_compiles() -> bool:
    """Compile XLA:CPU fusions with XLA's classic emitters, not its newer MLIR fusion emitters:
    appends `--xla_cpu_use_fusion_emitters=false` to $XLA_FLAGS. Returns whether it did.

    It does nothing where $XLA_FLAGS already names that flag (yours wins), where JAX's backends have
    started (XLA reads the flags once, when the first computation starts the CPU client: call this
    before it), or where this jaxlib's XLA lacks the flag. Measured on HappyGPT's programs (README,
    `scripts/bench_memory_floor.py`): compiling takes 110-280 MB less memory (alone in a process, the
    pretraining step peaks at 449 MB instead of 585, the PPO update at 527 instead of 810), the compiled
    code runs as fast (0.99-1.02x in one process) and gives the same results up to rounding (the
    pretraining step's bit for bit). The PPO update compiles 20-45% slower. Only CPU programs are affected.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _LEAN_FLAG in flags:
        return False
    try:
        from jax._src import xla_bridge  # noqa: PLC0415  (no public "has JAX started" query)

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False  # a JAX without it: set the flag; it acts if no computation ran yet
    if started or not _xla_knows(_LEAN_FLAG):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{_LEAN_FLAG}=false".strip()
    return True


@dataclasses.dataclass
class StageMemory:
    """RSS of one tracked block, in MB; None where the platform does not say.

    Attributes:
      start: RSS when the block began.
      peak: peak RSS during the block: exact when the block raised the process's peak, else the
        highest RSS sampled during it (`scope` says which).
      end: RSS when it ended.
      process_peak: the process's peak RSS when the block ended.
      scope: "exact" (the kernel's high-water mark rose during the block), "sampled" (the block stayed
        under an earlier peak: the sampler's maximum, a lower bound) or "process" (no per-block
        number on this platform: `peak` is the process's peak so far).
      anon_peak, file_peak: the highest of RSS's two parts sampled during the block (lower bounds):
        anonymous memory (the heap, XLA's buffers and programs, Python's objects) and file-backed
        pages (mostly the shared libraries' code: jaxlib's alone is ~160 MB once JAX has run; clean
        pages the kernel can drop and re-read, shared with other processes that map the same files).
    """

    start: float | None = None
    peak: float | None = None
    end: float | None = None
    process_peak: float | None = None
    scope: str = "process"
    anon_peak: float | None = None
    file_peak: float | None = None

    def summary(self) -> dict:
        return {
            "rss_start_mb": _round(self.start),
            "rss_peak_mb": _round(self.peak),
            "rss_end_mb": _round(self.end),
            "rss_process_peak_mb": _round(self.process_peak),
            "rss_peak_scope": self.scope,
            "rss_anon_peak_mb": _round(self.anon_peak),
            "rss_file_peak_mb": _round(self.file_peak),
        }


class Tracker:
    """Host memory from its creation to `stop()`: RSS at both ends and the peak between.

    The kernel's high-water mark (VmHWM) is read at both ends: if it rose, the block set the process's
    peak and that is its exact peak. Below an earlier peak a daemon thread samples VmRSS every
    `interval_s` seconds (a lower bound: a spike between samples is missed), and at every sample (at
    any peak) RSS's anonymous and file-backed parts (RssAnon, RssFile). The high-water mark is
    never reset (`/proc/self/clear_refs`): that would also reset ru_maxrss and what `/usr/bin/time -v`
    reports for the whole run.
    """

    def __init__(self, interval_s: float = 0.05):
        self._mem = StageMemory(start=rss_mb())
        self._hwm_before = peak_rss_mb()
        self._sampled = self._mem.start or 0.0
        self._done = threading.Event()
        self._interval_s = interval_s
        self._sampler = None
        self._sample_once()
        if self._mem.start is not None:
            self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._sampler.start()

    def _sample_once(self) -> None:
        now = _status_fields_mb("VmRSS", "RssAnon", "RssFile")
        mem = self._mem
        if now.get("VmRSS", 0.0) > self._sampled:
            self._sampled = now["VmRSS"]
        for attr, field in (("anon_peak", "RssAnon"), ("file_peak", "RssFile")):
            if field in now and now[field] > (getattr(mem, attr) or 0.0):
                setattr(mem, attr, now[field])

    def _sample(self):
        while not self._done.wait(self._interval_s):
            self._sample_once()

    def stop(self) -> StageMemory:
        """Stop sampling; returns the block's StageMemory (the same one on a second call)."""
        if self._done.is_set():
            return self._mem
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        self._sample_once()
        mem = self._mem
        mem.end = rss_mb()
        mem.process_peak = peak_rss_mb()
        if mem.start is None or mem.process_peak is None or self._hwm_before is None:
            mem.peak, mem.scope = mem.process_peak, "process"
        elif mem.process_peak > self._hwm_before:
            mem.peak, mem.scope = mem.process_peak, "exact"
        else:
            mem.peak, mem.scope = max(self._sampled, mem.end or 0.0), "sampled"
        return mem


@contextlib.contextmanager
def track(interval_s: float = 0.05):
    """A `Tracker` over the block. Yields its StageMemory, filled in when the block exits."""
    tracker = Tracker(interval_s)
    try:
        yield tracker._mem
    finally:
        tracker.stop()


@contextlib.contextmanager
def trim_after_compiles():
    """`malloc_trim` after every XLA compilation inside the block (and once when it ends).

    Compiling a program (LLVM's passes on XLA's threads) allocates and frees a few hundred MB in small
    pieces; glibc keeps the freed pages, interleaved with live ones, so RSS stays where the compiler
    peaked and each compiled program raises it again. Trimming right after each compile gives them
    back: measured on HappyGPT's pretraining step, 675 -> 487 MB. It changes no result, only where
    freed memory goes; each trim walks the heap (a few ms), against compiles of 0.1 s to 10 s.
    """
    import jax  # noqa: PLC0415  (the rest of this module does not need it)

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            malloc_trim()

    if _libc() is None:  # nothing to trim with
        yield
        return
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        malloc_trim()


@contextlib.contextmanager
def lean_host_memory():
    """The XLA:CPU host-memory levers for a laptop run: glibc's malloc arenas capped at 2
    (`limit_malloc_arenas`), XLA:CPU's classic fusion emitters (`lean_cpu_compiles`), freed heap returned
    after every compile (`trim_after_compiles`). None changes a result. Enter it before JAX starts."""
    limit_malloc_arenas()
    lean_cpu_compiles()
    with trim_after_compiles():
        yield
