"""Multi-process (multi-host) start-up and process-0-only helpers.

JAX runs one Python process per host (or per GPU); all of them execute the same program and every
jitted step is one SPMD computation over the devices of all processes. `initialize` connects them
with `jax.distributed.initialize`, which must run before anything touches a JAX backend.

Where the settings come from, first match wins for each of them:
  1. `config.distributed.{coordinator_address, num_processes, process_id}` ('' / 0 / -1 = unset);
  2. the environment: JAX_COORDINATOR_ADDRESS (read by JAX itself), and JAX_NUM_PROCESSES /
     JAX_PROCESS_ID (read here, mirroring it);
  3. JAX's own cluster auto-detection (Slurm, Open MPI, Cloud TPU pods, ...) for whatever is still
     unset, when a launcher is visible in the environment.
With none of these, the run is a single process and nothing is initialised.
`distributed.local_device_ids` (or JAX_LOCAL_DEVICE_IDS) gives a process its own GPUs: several
processes on one host, one per GPU, without a launcher, each claim only theirs.

On CPU, cross-process collectives use gloo over TCP (JAX's default in this version; set explicitly
below so that an older default of 'none' cannot silently break a CPU multi-process run).

Only process 0 prints, logs and writes text files (`is_main`); every process must still call every
collective operation: jitted steps, evals, sampling, and Orbax's save/restore, which writes
checkpoints collectively (each process its own shards; process 0 the metadata).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

from gpt_jax.errors import UserError

# Launchers whose presence means "this is one process of many" for JAX's cluster auto-detection.
# Slurm: tasks of an `srun` step (a batch script's own step, or one task, stays a single process).
_LAUNCHER_HINTS = {
    'Slurm': lambda e: int(e.get('SLURM_STEP_NUM_TASKS', 1) or 1) > 1 and 'SLURM_PROCID' in e,
    'Open MPI': lambda e: 'OMPI_MCA_orte_hnp_uri' in e and int(e.get('OMPI_COMM_WORLD_SIZE', 1)) > 1,
    'Cloud TPU pod': lambda e: ',' in e.get('TPU_WORKER_HOSTNAMES', e.get('TPU_PROCESS_ADDRESSES', '')),
}


def _settings(dist_cfg: Any, environ: dict[str, str]) -> tuple[Optional[str], Optional[int],
                                                                 Optional[int]]:
  """(coordinator_address, num_processes, process_id) from config, else environment; None = unset."""
  get = (lambda k, d: dist_cfg[k] if dist_cfg is not None and k in dist_cfg else d)
  address = str(get('coordinator_address', '') or '') or environ.get('JAX_COORDINATOR_ADDRESS') or None
  try:
    num = int(get('num_processes', 0) or 0) or int(environ.get('JAX_NUM_PROCESSES', 0) or 0) or None
    pid = int(get('process_id', -1))
    if pid < 0 and environ.get('JAX_PROCESS_ID', '') != '':
      pid = int(environ['JAX_PROCESS_ID'])
  except ValueError as e:
    raise UserError(f'distributed settings: {e} (JAX_NUM_PROCESSES / JAX_PROCESS_ID must be '
                    'integers)') from None
  return address, num, (pid if pid >= 0 else None)


def initialize(dist_cfg: Any = None, environ: Optional[dict[str, str]] = None) -> bool:
  """Connects this process to the others if the config or environment asks for it.

  Returns True when running multi-process. Safe to call more than once (and from tests that run
  many trainings in one process): an already initialised runtime is kept.
  """
  environ = dict(os.environ) if environ is None else environ
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  address, num, pid = _settings(dist_cfg, environ)
  launcher = next((name for name, seen in _LAUNCHER_HINTS.items() if seen(environ)), None)
  if address is None and num is None and pid is None and launcher is None:
    return False  # A single process: nothing to connect.
  if num == 1:
    return False
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                               local_device_ids=_local_device_ids(dist_cfg))
  except RuntimeError as e:
    # JAX refuses once a backend exists (there is no public query for that beforehand).
    if 'must be called before' in str(e):
      raise UserError('multi-process settings were given (distributed.* or JAX_COORDINATOR_ADDRESS / '
                      'JAX_NUM_PROCESSES / JAX_PROCESS_ID), but JAX was already used in this process; '
                      'start the run in a fresh process.') from None
    raise _init_error(e, launcher) from None
  except (ValueError, TypeError) as e:
    raise _init_error(e, launcher) from None
  return jax.process_count() > 1


def _local_device_ids(dist_cfg: Any) -> Optional[list[int]]:
  """distributed.local_device_ids ('0' or '0,1'): this process's GPUs. '' = JAX's choice:
  JAX_LOCAL_DEVICE_IDS, or one GPU per process under Slurm / Open MPI, or else every GPU of the host."""
  ids = str(dist_cfg['local_device_ids'] if dist_cfg is not None and 'local_device_ids' in dist_cfg
            else '').strip()
  if not ids:
    return None
  try:
    return [int(i) for i in ids.split(',')]
  except ValueError:
    raise UserError(f'distributed.local_device_ids={ids!r}: give this process\'s device numbers, '
                    'e.g. 0 or 0,1 (one process per GPU: process i takes GPU i).') from None


def _init_error(e: Exception, launcher: Optional[str]) -> UserError:
  return UserError(
      f'could not start the multi-process runtime ({str(e).strip().splitlines()[0]}). Give every '
      'process the same --config.distributed.coordinator_address=HOST:PORT (process 0\'s host and a '
      'free port) and --config.distributed.num_processes=N, and each its own '
      '--config.distributed.process_id (0 .. N-1), or the JAX_COORDINATOR_ADDRESS / '
      'JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables'
      + (f' (or let {launcher} provide them)' if launcher else '') + '.')


def is_main() -> bool:
  """True on process 0, the only one that prints, logs and writes text files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op for a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_count() -> int:
  """How many processes run this program (1 unless `initialize` connected several)."""
  return jax.process_count()


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any of them: a collective, so all must call it."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array on this host, for printing or decoding."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def summary() -> str:
  """'N process(es)' plus this process's index when there are several."""
  n = jax.process_count()
  return f'{n} process' if n == 1 else f'{n} processes (this is process {jax.process_index()})'
