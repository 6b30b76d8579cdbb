"""Device mesh and sharding rules: data parallelism and FSDP on JAX's own SPMD partitioner.

One code path from one device to many hosts. The devices form a 2-D mesh ('data', 'fsdp')
(`config.mesh.data` x `config.mesh.fsdp`, -1 = all remaining devices):

  batch       rows sharded over both axes: every device gets B / n_devices rows.
  parameters  replicated when fsdp = 1 (plain data parallelism); otherwise each array is sharded
  + Adam      over 'fsdp' along its largest axis that the fsdp size divides (replicated if none
  moments     does), so their memory between steps shrinks by the fsdp factor (ZeRO-3 / FSDP).
  step, key   replicated.

`jit` gets these shardings for its inputs and outputs; the batch drawn inside the step is pinned with
`with_sharding_constraint`; under FSDP the step asks for whole weights to compute with (one transient
full copy, `gather_for_compute`) and, on mixed meshes, whole gradients (`reduce_gradients`). XLA's
SPMD partitioner inserts the collectives. On one device every sharding is trivial: the same code runs.
Meshes use `AxisType.Auto` (GSPMD-style propagation) explicitly: under `jax.make_mesh`'s default
Explicit axes, sharding is part of every type and reshapes of sharded dimensions need annotations.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt_jax import config_checks
from gpt_jax.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The batch dimension is split over every device of the mesh.


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `mesh.{data, fsdp}`, -1 filling in the remaining devices."""
  sizes = {a: int(mesh_cfg[a]) if mesh_cfg is not None and a in mesh_cfg else d
           for a, d in zip(AXES, (-1, 1))}
  if problems := config_checks.check_mesh(sizes):  # The sizes alone, as validate checks them.
    raise UserError('invalid mesh: ' + '; '.join(problems))
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise UserError(f'mesh.{AXES[1 - AXES.index(free[0])]}={fixed} does not divide the '
                      f'{n_devices} devices; pick a divisor of {n_devices}.')
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise UserError(f'mesh data={sizes["data"]} x fsdp={sizes["fsdp"]} = '
                    f'{math.prod(sizes.values())} devices, but this run has {n_devices}; make the '
                    'product equal the device count (or set one axis to -1).')
  return sizes['data'], sizes['fsdp']


def make_mesh(mesh_cfg: Any = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The ('data', 'fsdp') mesh over all devices (of every process) as configured."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def describe(mesh: Mesh) -> str:
  return ' x '.join(f'{a}={mesh.shape[a]}' for a in AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Rows split over every device; `leading` unsharded axes first (e.g. the micro-batch axis)."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def n_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_spec(shape: Sequence[int], fsdp: int) -> P:
  """Shard the largest axis that `fsdp` divides over 'fsdp' (ties: the first); else replicate."""
  if fsdp <= 1:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  return P(*([None] * axis), 'fsdp')


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """FSDP rule for every array leaf of a params-like tree (params, optimizer moments)."""
  return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, param_spec(a.shape, mesh.shape['fsdp'])), tree)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a TrainState: FSDP rule for params and opt_state, step and key replicated."""
  rep = replicated(mesh)
  return abstract_state.replace(params=tree_shardings(abstract_state.params, mesh),
                                opt_state=tree_shardings(abstract_state.opt_state, mesh), step=rep, key=rep)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings: what Orbax restores into (resharding as needed)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def constrain_batch(x: jax.Array, sharding: Optional[NamedSharding]) -> jax.Array:
  """Pins a batch drawn inside jit to its sharding (no-op without one)."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def gather_for_compute(params: Any, mesh: Optional[Mesh]) -> Any:
  """FSDP: the whole weights for the forward/backward pass, all-gathered from their shards.

  Without it, XLA keeps matmuls sharded along the weights' fsdp axis while the activations are
  sharded along the batch, and falls back to "involuntary full rematerialization" of activations.
  With it, each device computes on its own rows with whole weights, as in data parallelism, and the
  transpose makes the gradients arrive reduce-scattered to the parameter shards, where the update runs
  on 1/fsdp of the state per device. Storage stays sharded between steps. A no-op without FSDP.
  """
  if mesh is None or mesh.shape['fsdp'] == 1:
    return params
  return jax.lax.with_sharding_constraint(params, replicated(mesh))


def reduce_gradients(grads: Any, mesh: Optional[Mesh]) -> Any:
  """Gradients whole on every device (an all-reduce) on meshes with both data > 1 and fsdp > 1.

  There XLA cannot turn the embedding's backward scatter-add (batch-sharded updates into a table
  sharded over 'fsdp' only) into a reduce-scatter, and replicates the (B, T, C) activations instead.
  All-reduced gradients avoid that; each device still updates only its own shards, so FSDP's memory
  saving is kept. On pure-FSDP and pure-DP meshes the gradients are left to XLA.
  """
  if mesh is None or mesh.shape['fsdp'] == 1 or mesh.shape['data'] == 1:
    return grads
  return jax.lax.with_sharding_constraint(grads, replicated(mesh))


def put_replicated(tokens: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array as one global array replicated on every device of the mesh. Across processes, each
  fills its own devices from its own copy, which must be the same on every host (as the token splits)."""
  tokens = np.asarray(tokens)
  return jax.make_array_from_callback(tokens.shape, replicated(mesh), lambda idx: tokens[idx])


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (identical on every process) placed as global arrays with the given shardings: each
  process fills only its own devices' slices (a plain `jax.device_put` would not work on many hosts)."""
  def put(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  return jax.tree_util.tree_map(put, tree, shardings)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  n = n_batch_shards(mesh)
  if batch_size % n:
    raise UserError(f'train.batch_size={batch_size} does not split evenly over the {n} devices of '
                    f'the mesh ({describe(mesh)}); use a multiple of {n} (the batch is per step '
                    'and global: each device gets batch_size / devices rows).')
