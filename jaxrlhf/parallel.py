"""Device meshes, shardings and the one `jit` per entry point.

A mesh has two axes: 'data' (batch rows) and 'fsdp' (batch rows too, and the largest dimension of each
param / optimizer leaf). The batch is split over both axes; with fsdp = 1 params are replicated (plain data
parallelism). The same step function runs on 1 CPU, 8 fake CPU devices, a GPU or a multi-host TPU slice.

Why `jit` with shardings for the library's train steps: every loss reduces with a masked mean over the
real tokens of the *global* batch. Writing the step on the global batch and letting XLA partition it
(GSPMD) gives the single-device result exactly (up to reduction order), for data and FSDP sharding alike,
with no collective written by hand. A researcher who writes a data-parallel `jax.shard_map` step instead
passes `axis_name=` to the losses and masked reductions (jaxrlhf.losses, jaxrlhf.ops): they then return the
global statistics (psum of sums and counts), where `pmean` of per-device means would weigh a shard of short
responses like a shard of long ones; tests/test_losses_shard_map.py checks shard_map == GSPMD == 1 device.

FSDP gathers weights, not activations: a step is traced `on_mesh`, and the model pins every block's input
and output to the batch split (`constrain_batch`); otherwise XLA may follow the weights' split and
replicate the activations (for an 8B model, every row's attention on every device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch is split over (`make_mesh`)


def constrain_batch(x: jax.Array) -> jax.Array:
    """x with its batch axis 0 split over the mesh axes ('data', 'fsdp') when traced under such a mesh
    (`jax.sharding.use_abstract_mesh`, as `parallel.jit_step` traces a step) and B divides over them;
    else x as it is (no mesh, one device, inside `shard_map`, or a batch that does not divide).

    Why: FSDP splits each weight's largest dimension over 'fsdp' (`parallel.leaf_sharding`), and left
    alone XLA's sharding propagation may follow the weights instead of the batch. For one REBEL step of
    Llama-3.1-8B on 8 CPU devices it gathered the activations and ran every row's attention on every
    device: XLA:CPU planned 38 GiB of temporaries per device, 19 with this constraint.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or mesh.manual_axes:
        return x
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
) -> None:
    """Start multi-process JAX: `--multihost` in the pipelines, and the multi-process tests.

    Without arguments the coordinator and the processes are found by `jax.distributed.initialize()` itself
    (TPU VMs, SLURM / GPU clusters); its error, when there is nothing to find, is raised. On CPU (tests, a
    cluster of CPU hosts) pass them and gloo collectives are used. Must run before any JAX computation:
    `initialize()` refuses to run once a backend has started.
    """
    if coordinator_address is None and num_processes is None:
        jax.distributed.initialize()
        return
    if local_device_count is not None or (coordinator_address or "").startswith("127.0.0.1"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(data: int | None = None, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices (every process's, in multi-host runs).

    Args:
      data: size of the 'data' axis; None = number of devices / fsdp.
      fsdp: size of the 'fsdp' axis.
      devices: optional explicit device list (default `jax.devices()`).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data is None:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices; pick a divisor of {n}.")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but {n} are present.")
    auto = (jax.sharding.AxisType.Auto,) * 2
    if devices == list(jax.devices()):
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


EMBEDDING_TABLES = ("wte", "wpe")  # [rows, D] tables read by a gather: split over rows only


def leaf_sharding(
    shape: tuple[int, ...], mesh: Mesh, min_size: int = 2**12, *, table: bool = False
) -> NamedSharding:
    """FSDP rule: split the largest dimension divisible by the 'fsdp' size; small leaves replicated. An
    embedding `table` is split over its rows (vocabulary or positions) or replicated, never over D: the
    gather from a D-split table gives D-split activations, which XLA cannot move to the batch split without
    replicating them first ("Involuntary full rematerialization")."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < min_size:
        return replicated(mesh)
    dims = [0] if table else sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in dims:
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for params, optimizer state or a whole TrainState (Adam moments follow their params: the
    rule depends on the shape and on whether the leaf's path ends in an embedding table's name)."""

    def rule(path, x):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return leaf_sharding(np.shape(x), mesh, table=name in EMBEDDING_TABLES)

    return jax.tree_util.tree_map_with_path(rule, tree)


def put(tree: Any, mesh: Mesh) -> Any:
    """Place a (host or device) pytree on the mesh with `tree_shardings`, as a copy: the result may be
    donated to a step without deleting the arrays it came from."""
    # An explicit copy first: device_put(may_alias=False) may still hand device 0 the source buffer, and a
    # donated state sharing it with e.g. a frozen reference would free the reference's memory.
    tree = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    return jax.device_put(tree, tree_shardings(tree, mesh))


def batch_size_multiple(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a batch (pytree of [B, ...] arrays) split over the mesh.

    In a multi-process run each process passes its own rows (B / process_count of them).
    """
    n = batch_size_multiple(mesh)
    sharding = batch_sharding(mesh)
    leaves = jax.tree.leaves(batch)
    local = leaves[0].shape[0] if leaves else 0
    total = local * jax.process_count()
    if total % n:
        raise ValueError(
            f"batch size {total} is not divisible by the {n} devices of the mesh; "
            f"use a batch size that is a multiple of {n}."
        )
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def tracing_on(mesh: Mesh):
    """A context under which a function is traced with `mesh` as the abstract mesh, so that the model keeps
    its activations split over the batch axes (`constrain_batch`) whatever the weights' FSDP sharding: the
    body of a function given to `jax.jit` (`on_mesh` wraps one)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced `tracing_on(mesh)`; for `jax.jit`."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with tracing_on(mesh):
            return fn(*args, **kwargs)

    return traced


def jit_step(step: Callable, mesh: Mesh, state: Any, *, donate: bool = True) -> Callable:
    """Compile `step(state, batch, *, key) -> (state, metrics)` once for `mesh`.

    Returns `f(state, batch, key) -> (state, metrics)` with the state sharded by `tree_shardings`, the
    batch split over the mesh, the key and metrics replicated, and the input state donated. The step is
    traced `tracing_on(mesh)`: activations stay split over the batch, the weights are gathered (FSDP).
    """
    state_sh = tree_shardings(state, mesh)

    def fn(state, batch, key):
        with tracing_on(mesh):
            return step(state, batch, key=key)

    return jax.jit(
        fn,
        in_shardings=(state_sh, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


def to_host(tree: Any) -> Any:
    """Fetch a (possibly sharded, multi-process) pytree to host numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
