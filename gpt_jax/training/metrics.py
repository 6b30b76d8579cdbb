"""What a run reports: the metrics.jsonl log (and TensorBoard), step timing, MFU and expected time."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from gpt_jax.config import ModelConfig, flops_per_token
from gpt_jax.errors import UserError

# Dense (no sparsity) peak TFLOP/s of one device from the vendors' datasheets, by the exact name JAX
# reports as `device_kind`: (bf16/fp16 tensor cores, tf32 tensor cores, plain fp32). Exact names,
# because substrings mislead: 'NVIDIA L4' is inside 'NVIDIA L40S', and the H100 PCIe and NVL are
# slower parts than the H100 SXM. V100 has no tf32 (its fp32 figure stands in), and fp16 instead of
# bf16. TPUs: bf16 only; at default precision XLA multiplies float32 there in one bf16 pass.
_PEAK_TFLOPS: dict[str, tuple[float, float, Optional[float]]] = {
    'NVIDIA A100-SXM4-40GB': (312, 156, 19.5), 'NVIDIA A100-SXM4-80GB': (312, 156, 19.5),
    'NVIDIA A100-PCIE-40GB': (312, 156, 19.5), 'NVIDIA A100 80GB PCIe': (312, 156, 19.5),
    'NVIDIA H100 80GB HBM3': (989, 495, 67), 'NVIDIA H100 PCIe': (756, 378, 51),
    'NVIDIA H100 NVL': (835, 418, 60), 'NVIDIA H200': (989, 495, 67), 'NVIDIA H200 NVL': (835, 418, 60),
    'NVIDIA GH200 480GB': (989, 495, 67),
    'NVIDIA L4': (121, 60, 30.3), 'NVIDIA L40': (181, 90.5, 90.5), 'NVIDIA L40S': (362, 183, 91.6),
    'NVIDIA A10': (125, 62.5, 31.2),
    'NVIDIA GeForce RTX 4090': (165, 82.6, 82.6), 'NVIDIA GeForce RTX 3090': (71, 35.6, 35.6),
    'Tesla V100-SXM2-16GB': (125, 15.7, 15.7), 'Tesla V100-SXM2-32GB': (125, 15.7, 15.7),
    'Tesla V100-PCIE-16GB': (112, 14, 14), 'Tesla V100-PCIE-32GB': (112, 14, 14),
    'TPU v4': (275, 275, None), 'TPU v5 lite': (197, 197, None), 'TPU v5': (459, 459, None),
    'TPU v5p': (459, 459, None), 'TPU v6 lite': (918, 918, None),
}
PRECISIONS = ('bf16', 'tf32', 'fp32')


def matmul_precision(dtype: str) -> str:
  """How the run's matmuls use the hardware: 'bf16' (bf16/fp16 compute), 'tf32' or 'fp32'.

  float32 matmuls at JAX's default precision run on tf32 tensor cores on NVIDIA GPUs from Ampere on;
  jax_default_matmul_precision='highest' (or 'float32'), or NVIDIA_TF32_OVERRIDE=0, makes them fp32.
  """
  if dtype in ('bfloat16', 'float16'):
    return 'bf16'
  setting = str(jax.config.jax_default_matmul_precision or '').lower()
  if setting in ('highest', 'float32') or os.environ.get('NVIDIA_TF32_OVERRIDE') == '0':
    return 'fp32'
  return 'tf32'


def _measure_matmul(dtype: str, device: Any) -> float:
  """FLOP/s of the best of 5 jitted (n, n) @ (n, n) GEMMs in `dtype` on `device`."""
  n = 1024
  a = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), device)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  best = math.inf
  for _ in range(5):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(configured: float, dtype: str = 'float32', devices: Optional[Sequence[Any]] = None,
               ) -> tuple[float, str]:
  """(peak FLOP/s of all the run's devices together, where the figure comes from), for MFU.

  Per device: `configured` if > 0; else the datasheet peak of the device's exact name at the run's
  matmul precision (`matmul_precision`); else a measured GEMM in the run's dtype. Every per-device
  figure is multiplied by the device count, except a GEMM measured on a CPU: it already uses every
  core, which simulated CPU devices (--xla_force_host_platform_device_count) share.
  """
  devices = list(devices) if devices is not None else jax.devices()
  n, dev = len(devices), devices[0]
  each = '' if n == 1 else f'{n} x '
  if configured > 0:
    return configured * n, f'{each}configured peak'
  precision = matmul_precision(dtype)
  known = _PEAK_TFLOPS.get(dev.device_kind)
  if known is not None and known[PRECISIONS.index(precision)] is not None:
    return known[PRECISIONS.index(precision)] * 1e12 * n, f'{each}{dev.device_kind} {precision} peak'
  # Unknown device (e.g. a CPU): MFU is then relative to what XLA itself reaches on a plain GEMM.
  measured = _measure_matmul(dtype, dev)
  if dev.platform == 'cpu':
    return measured, f'measured {dtype} matmul'
  return measured * n, f'{each}measured {dtype} matmul ({dev.device_kind})'


def peak_flops_later(configured: float, dtype: str = 'float32') -> Callable[[], tuple[float, str]]:
  """`peak_flops(configured, dtype)` on the first call, the same answer after: a GEMM to measure then
  runs at the first log line, not before the first step (which it would delay, competing with the
  train step's compilation running then)."""
  return functools.cache(functools.partial(peak_flops, configured, dtype))


def lr_at(schedule: Callable[[Any], Any], step: int) -> float:
  """The learning rate of `step`, for a log record: the schedule jitted as one small program (called
  as it is, op by op, it compiles a dozen programs before the first step's eval)."""
  return float(jax.jit(schedule)(step))


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


def step_record(step: int, loss: float, metrics: dict, dt: float, tokens_per_step: int,
                model_cfg: ModelConfig, peak: float, elapsed: float) -> dict:
  """The log record of a training step taking `dt` seconds, `elapsed` seconds into the run: its loss,
  lr, gradient norm, speed and MFU (model FLOPs per second, config.flops_per_token, over `peak`)."""
  return {'step': step, 'train_loss': loss, 'lr': float(metrics['lr']),
          'grad_norm': float(metrics['grad_norm']), 'ms_per_step': round(1e3 * dt, 3),
          'tokens_per_s': round(tokens_per_step / dt, 1),
          'mfu': round(flops_per_token(model_cfg) * tokens_per_step / dt / peak, 5),
          'time': round(elapsed, 3)}


def step_line(rec: dict, peak_src: str) -> str:
  """The printed line of a step's record."""
  return (f'step {rec["step"]}: loss {rec["train_loss"]:.4f}, lr {rec["lr"]:.2e}, {rec["ms_per_step"]:.1f} '
          f'ms/step, {rec["tokens_per_s"]:,.0f} tok/s, MFU {100 * rec["mfu"]:.2f}% of {peak_src}')


class StepTimer:
  """Wall time per step over a window of steps; evals and compilation are left out by `restart`."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.t0, self.steps = time.perf_counter(), 0

  def tick(self, steps: int = 1) -> None:
    self.steps += steps

  def seconds(self) -> float:
    return time.perf_counter() - self.t0

  def per_step(self) -> float:
    return self.seconds() / max(self.steps, 1)


def report_expected_time(say: Callable[[str], None], dt: float, cfg_t: ml_collections.ConfigDict,
                          step: int) -> None:
  remaining = (cfg_t.max_steps - step) * dt
  say(f'{1e3 * dt:.0f} ms/step: expect about {_human(remaining)} for the remaining '
      f'{cfg_t.max_steps - step} steps (plus evals)')
  # Two hours: the CPU presets themselves (`speedrun_gpt2` is about an hour) must not trigger it, and
  # the first steps after compilation run slower than the rest.
  if jax.default_backend() == 'cpu' and remaining > 7200:
    say(f'note: this preset would take about {_human(remaining)} on this CPU; it is sized for a GPU. '
        'On a CPU, configs/shakespeare.py:speedrun aims at the same val loss in 700 steps, and '
        ':cpu is a smaller model (python scripts/bench.py times a step on this machine)')


def _human(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.0f}s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.1f} h'
