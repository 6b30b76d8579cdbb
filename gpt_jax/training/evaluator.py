"""What the evals tell: train and val loss and a short sample at every eval (`Evaluator`), whether a
loss is still finite (`check_finite`) and when the target val loss was reached (`time_to_target`)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from gpt_jax import checkpoint as checkpoint_lib, sample_run, sampling, scoring
from gpt_jax.data import batches as batches_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.parallel import distributed, mesh as mesh_lib
from gpt_jax.training.run_setup import CPU_MAX_STEPS_IN_FLIGHT, Setup, dispatch_is_bounded
from gpt_jax.training.step import eval_step


class Evaluator:
  """Train and val loss on `eval_iters` fixed batches (the same at every eval), and a short sample.

  With train.val_full_pass the val loss is instead scripts/evaluate.py's figure: every val token
  scored once, in non-overlapping windows (gpt_jax/scoring.py), so the best checkpoint and the time
  to target are judged by the number a run is reported by, with no sampling noise.
  """

  def __init__(self, config: ml_collections.ConfigDict, s: Setup, params_sharding: Any):
    t, self.cfg_s = config.train, config.sample
    self.s, self.eval_iters = s, t.eval_iters
    rep = mesh_lib.replicated(s.mesh)
    self.step = jax.jit(
        functools.partial(eval_step, model=GPT(s.model_cfg), draw=s.source.draw,
                          batch_size=t.batch_size, mesh=s.mesh),
        in_shardings=(params_sharding, s.source.input_shardings(s.mesh), rep), out_shardings=rep)
    # Small host values enter jitted code as replicated global arrays, valid on any number of hosts.
    base = jax.random.fold_in(jax.random.PRNGKey(t.seed), batches_lib.EVAL_KEY_SALT)
    self.keys = [mesh_lib.put_replicated(np.asarray(jax.random.fold_in(base, i)), s.mesh)
                 for i in range(t.eval_iters)]
    self.prompt = mesh_lib.put_replicated(np.array([sample_run.encode_prompt(  # Only for a sample.
        s.dataset.tokenizer, self.cfg_s.prompt or '\n', '--config.sample.prompt')], np.int32), s.mesh
        ) if self.cfg_s.eval_tokens > 0 else None
    self.bounded_dispatch = dispatch_is_bounded()
    self.full_val = self._full_val_windows(t.batch_size) if t.val_full_pass else None

  def _full_val_windows(self, batch_size: int) -> tuple[list[tuple[jax.Array, ...]], int]:
    """([(x, y, mask) per batch of `batch_size` windows, replicated], number of scored targets).

    The windows are scripts/evaluate.py's: [train[-1]] + val cut into non-overlapping windows of
    block_size targets, the last batch padded with fully masked windows (one shape, one compile).
    """
    s = self.s
    host_batches, n = scoring.window_batches(scoring.val_tokens(s.dataset), s.model_cfg.block_size,
                                             batch_size)
    batches = [tuple(mesh_lib.put_replicated(a, s.mesh) for a in b) for b in host_batches]
    cfg, mesh, limit = s.model_cfg, s.mesh, s.dataset.tokenizer.vocab_size

    def nll_sum(params: Any, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
      x, y, mask = (mesh_lib.constrain_batch(a, mesh_lib.batch_sharding(mesh)) for a in (x, y, mask))
      params = mesh_lib.gather_for_compute(params, mesh)
      return scoring.window_nll(params, x, y, mask, cfg=cfg, vocab_limit=limit).sum()

    self.nll_step = jax.jit(nll_sum, out_shardings=mesh_lib.replicated(mesh))
    return batches, n

  def _device_sum(self, values: Iterable[jax.Array]) -> jax.Array:
    """Adds up the values as they are dispatched, on the device, in order (float32, as a host sum
    would): no host sync per batch, so the batches run back to back. CPU runs wait every
    CPU_MAX_STEPS_IN_FLIGHT batches (see there)."""
    total = None
    for i, value in enumerate(values):
      total = value if total is None else total + value
      if self.bounded_dispatch and (i + 1) % CPU_MAX_STEPS_IN_FLIGHT == 0:
        total.block_until_ready()
    return total

  def full_val_loss(self, params: Any) -> jax.Array:
    """Mean nats per val token over the whole split: summed on the device, one host sync later."""
    batches, n = self.full_val
    return self._device_sum(self.nll_step(params, *b) for b in batches) / n

  def split_loss(self, params: Any, split: str) -> jax.Array:
    """Sum of the loss over the split's eval batches (the same batches at every eval)."""
    return self._device_sum(self.step(params, self.s.source.eval_inputs(split, i), self.keys[i])
                            for i in range(self.eval_iters))

  def __call__(self, params: Any, step: int) -> dict:
    t0 = time.perf_counter()
    splits = ('train',) if self.full_val else ('train', 'val')
    totals = {split: self.split_loss(params, split) for split in splits}
    val_full = self.full_val_loss(params) if self.full_val else None
    # The one host sync of the eval; the mean is taken on the host, in float32.
    rec = {'step': step, **{f'{split}_loss': float(np.float32(total) / np.float32(self.eval_iters))
                            for split, total in totals.items()}}
    if val_full is not None:
      rec['val_loss'] = float(val_full)
    rec['eval_seconds'] = round(time.perf_counter() - t0, 3)
    c = self.cfg_s
    if c.eval_tokens > 0:
      key = mesh_lib.put_replicated(np.asarray(jax.random.fold_in(jax.random.PRNGKey(c.seed), step)),
                                    self.s.mesh)
      out = sampling.generate(params, self.s.model_cfg, self.prompt, c.eval_tokens, key,
                              c.temperature, c.top_k, c.window_shift, self.s.dataset.tokenizer.vocab_size)
      rec['sample'] = self.s.dataset.tokenizer.decode(
          distributed.to_host(out)[0, self.prompt.shape[1]:])
    return rec


def note_target(rec: dict, target: float, summary: dict, write: Callable[[dict], None],
                say: Callable[[str], None]) -> None:
  """The first eval record `rec` whose val loss reaches `target` (> 0) goes in `summary`, the log and
  the console; later ones change nothing."""
  if not (target > 0 and rec['val_loss'] <= target) or 'target_reached' in summary:
    return
  step = rec['step']
  summary['target_reached'] = {'step': step, 'time': rec['time'], 'val_loss': rec['val_loss']}
  write({'event': 'target_reached', 'step': step, 'time': rec['time'], 'target_val_loss': target})
  say(f'  reached the target val loss {target} at step {step}, {rec["time"] / 60:.1f} min after the start')


def time_to_target(t: ml_collections.ConfigDict, hit: dict | None) -> str:
  """The closing line of a run with train.target_val_loss: when an eval first reached it, if one did."""
  how = 'full pass over the val split at the evals' if t.val_full_pass else 'as estimated at the evals'
  return (f'time to target (val loss <= {t.target_val_loss}, {how}): ' + (
      f'{hit["time"] / 60:.1f} min, step {hit["step"]}' if hit else 'not reached') + (
      '' if t.val_full_pass else '; scripts/evaluate.py gives the full-pass figure of the best checkpoint'))


def check_finite(value: float, what: str, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  """Stops the run on a loss that is NaN or infinite, naming the last good checkpoint."""
  if not math.isfinite(value):
    # A background save still in flight is the last good checkpoint: finish it before naming it (an
    # exception would otherwise leave it as a temporary directory that no resume sees).
    ckpt.wait()
    latest = ckpt.latest_step()
    where = (f'the last good checkpoint (step {latest}) is untouched in {ckpt.directory}'
             if latest is not None else 'no checkpoint had been written yet')
    raise UserError(f'{what} is {value} at step {step}: training diverged and was stopped; {where}. '
                    'Try a lower train.learning_rate, a higher train.warmup_steps or train.grad_clip > 0.')
