"""What a run reports: the metrics.jsonl log (and TensorBoard), step timing, MFU and expected time."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax.errors import UserError

_PEAK_FLOPS = {  # Dense bf16/fp16 tensor-core peaks, per device (float32 runs will read low).
    'a100': 312e12, 'h100': 989e12, 'h200': 989e12, 'v100': 125e12, 'a10': 125e12, 'l4': 121e12,
    'rtx 4090': 165e12, 'rtx 3090': 71e12, 'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5': 459e12,
}


def peak_flops(configured: float) -> tuple[float, str]:
  """Peak FLOP/s of one device for MFU: configured, known by name, or a measured matmul (CPU)."""
  if configured > 0:
    return configured, 'configured'
  dev = jax.devices()[0]
  kind = dev.device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops, dev.device_kind
  # Unknown device (e.g. a CPU): time a large float32 matmul; MFU is then relative to what XLA
  # itself reaches on a plain GEMM on this machine.
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  best = math.inf
  for _ in range(5):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best, 'measured float32 matmul'


class MetricsLog:
  """Appends one JSON object per line to out_dir/metrics.jsonl (path None: writes nothing)."""

  def __init__(self, path: Optional[str], before_error: Callable[[], None] = lambda: None):
    self.path = path  # None on every process but 0, so that one process writes the file.
    self.before_error = before_error  # E.g. report a failed background checkpoint save, the cause.

  def write(self, record: dict) -> None:
    if self.path is None:
      return
    try:
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record, ensure_ascii=False) + '\n')
    except OSError as e:  # A full disk: say so, rather than a traceback.
      self.before_error()
      raise UserError(f'could not write {self.path} ({e.strerror}); training stopped. Free some space '
                      '(or fix the permissions), then continue from the last checkpoint with '
                      '--config.train.resume=True.') from None


def flatten(tree: Any, prefix: str = '') -> dict[str, float]:
  """{'a': {'b': 1, 'c': [2, 3]}} -> {'a/b': 1, 'a/c/0': 2, 'a/c/1': 3}; non-numbers are dropped."""
  out = {}
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    name = f'{prefix}{k}'
    if isinstance(v, (dict, list, tuple)):
      out.update(flatten(v, name + '/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[name] = float(v)
  return out


class TensorBoardLog:
  """Wraps a metrics.jsonl log: every record is also written as TensorBoard scalars.

  Tags: eval records under 'eval/' (train_loss, val_loss), per-step log records under 'train/',
  layer statistics under 'layer_stats/<metric>/<layer>' (attention entropy per head: '.../h_0/<head>'), eval
  samples as text. View with `tensorboard --logdir OUT_DIR/tensorboard`.
  """

  def __init__(self, log: Any, logdir: str):
    try:
      from tensorboardX import SummaryWriter  # Lazy: only runs with train.tensorboard=True need it.
    except ImportError:
      raise UserError('train.tensorboard=True needs the tensorboardX package: '
                      'pip install tensorboardX') from None
    self.log = log
    self.writer = SummaryWriter(logdir)

  def write(self, rec: dict) -> None:
    self.log.write(rec)
    if 'event' in rec or 'step' not in rec:
      return
    step = int(rec['step'])
    if 'layer_stats' in rec:
      scalars = flatten(rec['layer_stats'], 'layer_stats/')
    else:
      group = 'eval/' if 'val_loss' in rec else 'train/'
      scalars = flatten({k: v for k, v in rec.items() if k not in ('step', 'time')}, group)
      if 'sample' in rec:
        self.writer.add_text('sample', rec['sample'], step)
    for tag, value in scalars.items():
      self.writer.add_scalar(tag, value, step)
    self.writer.flush()  # Records are rare (log/eval intervals); keep the event file current.


class StepTimer:
  """Wall time per step over a window of steps; evals and compilation are left out by `restart`."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.t0, self.steps = time.perf_counter(), 0

  def tick(self) -> None:
    self.steps += 1

  def seconds(self) -> float:
    return time.perf_counter() - self.t0

  def per_step(self) -> float:
    return self.seconds() / max(self.steps, 1)


def report_expected_time(say: Callable[[str], None], dt: float, cfg_t: ml_collections.ConfigDict,
                          step: int) -> None:
  remaining = (cfg_t.max_steps - step) * dt
  say(f'{1e3 * dt:.0f} ms/step: expect about {_human(remaining)} for the remaining '
      f'{cfg_t.max_steps - step} steps (plus evals)')
  # Two hours, not one: the first steps after compilation run slower than the rest, so this estimate
  # of the hour-long `speedrun` preset can come out above an hour.
  if jax.default_backend() == 'cpu' and remaining > 7200:
    say(f'note: this preset would take about {_human(remaining)} on this CPU; it is sized for a GPU. '
        'On a CPU, configs/shakespeare.py:speedrun aims at the same val loss within an hour, and '
        ':cpu trains in minutes')


def _human(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.0f}s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.1f} h'
