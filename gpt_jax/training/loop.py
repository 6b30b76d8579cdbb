"""The training loop: set up, restore or initialise, then wire an evaluator, a checkpointer, a logger
and a timer around the jitted `train_step` (gpt_jax/training/step.py).

The pieces, in the order a run uses them:
  setup             devices and mesh, the data (one `BatchSource` for either format), the model.
  restore_or_init   the newest checkpoint of a resumed run (its shardings, any mesh), else a fresh
                    state born sharded, optionally with GPT-2 weights (`init_from`).
  Evaluator         train/val loss on fixed batches (or the val split's full pass), plus a short
                    sample, at every eval.
  Trainer           the loop itself: steps, evals that may save a checkpoint, logs, the stop request.
  train_and_evaluate  runs a Trainer while holding the run directory's lock; SIGTERM/SIGINT stop it
                    after the step in flight with a checkpoint of that step (gpt_jax/training/preemption.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gpt_jax import checkpoint as checkpoint_lib, model as model_lib, optim, sampling, scoring
from gpt_jax.config import ModelConfig, flops_per_token, model_config_from, num_params
from gpt_jax.data import batches as batches_lib, shards as shards_lib, text as text_lib
from gpt_jax.errors import Stopped, UserError
from gpt_jax.model import GPT
from gpt_jax.parallel import distributed, mesh as mesh_lib
from gpt_jax.training import layer_stats as layer_stats_lib, metrics as metrics_lib, preemption, runlock
from gpt_jax.training.step import TrainState, eval_step, init_train_state, train_step

# On a CPU the loop waits for every 8th step. Two reasons: XLA:CPU with several devices (simulated
# with --xla_force_host_platform_device_count, or one process of many) deadlocks in a collective's
# rendezvous once a few dozen steps are queued without a sync; and on one device Python would
# otherwise queue every step up to the next log line (up to log_interval steps of a second or more
# each), all of which a stop request must wait for before its checkpoint, past a scheduler's grace
# period. No cost: a CPU's dispatch cannot usefully run further ahead. GPUs and TPUs run ahead
# unbounded (their steps are short; a stop waits for the queue all the same).
CPU_MAX_STEPS_IN_FLIGHT = 8


def dispatch_is_bounded() -> bool:
  """True where the loops must wait every CPU_MAX_STEPS_IN_FLIGHT steps: on a CPU."""
  return jax.default_backend() == 'cpu'


@dataclasses.dataclass
class Setup:
  """What a run is made of, before any state exists."""
  mesh: jax.sharding.Mesh
  source: batches_lib.BatchSource
  dataset: Any          # text.Dataset or shards.ShardedSplits: tokenizer, meta, where it lives.
  model_cfg: ModelConfig
  say: Callable[..., None]  # print on process 0, nothing elsewhere.


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Devices and mesh, the data as a BatchSource, and the model config."""
  t = config.train
  main = distributed.is_main()  # Only process 0 prints and writes text files; all compute.
  say = print if main else (lambda *args, **kwargs: None)
  devices = jax.devices()  # Every process's devices: the mesh (and each step) spans them all.
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch_divisible(t.batch_size, mesh)
  say(f'JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) '
      f'[{", ".join(sorted({d.device_kind for d in devices}))}], {distributed.summary()}, '
      f'mesh {mesh_lib.describe(mesh)}')
  # Process 0 prepares the token files first; then the others find them ready (shared filesystem)
  # or prepare their own identical copy (a disk per host), without racing on the same files.
  shards_dir = config.data.shards_dir
  load = functools.partial(shards_lib.load, seed=t.seed) if shards_dir else text_lib.load
  ds = load(config.data) if main else None
  distributed.barrier('gpt_jax: data prepared')
  ds = ds or load(config.data, verbose=False)
  model_cfg = model_config_from(config, ds.tokenizer.vocab_size)
  if shards_dir:  # Token shards streamed from disk: corpora too big to replicate on every device.
    ds.check_block_size(model_cfg.block_size)
    source = batches_lib.ShardBatches(ds, model_cfg.block_size, t.batch_size, t.grad_accum_steps,
                                      t.seed, mesh)
  else:  # The in-memory splits, resident on every device for the whole run.
    source = batches_lib.ResidentBatches({'train': ds.train, 'val': ds.val}, model_cfg.block_size,
                                         t.batch_size, t.grad_accum_steps, mesh)
  say(f'model: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, '
      f'block {model_cfg.block_size}, vocab {model_cfg.vocab_size}: '
      f'{num_params(model_cfg) / 1e6:.2f}M parameters '
      f'({num_params(model_cfg, non_embedding=True) / 1e6:.2f}M without position embeddings)')
  say(f'compute: {model_cfg.dtype} matmuls, float32 parameters and residual stream; attention: '
      f'{model_lib.describe_attention(model_cfg)}')
  return Setup(mesh, source, ds, model_cfg, say)


def restore_or_init(config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint_lib.Checkpointer,
                    ) -> tuple[TrainState, float, dict]:
  """(state, best val loss so far, checkpoint metadata): the newest checkpoint if train.resume (with
  its metadata), else a fresh state (and {}).

  A fresh run refuses a directory that already holds checkpoints; a resumed one checks that the
  checkpoint is of this model and vocabulary before reading a byte of its arrays.
  """
  t, tok = config.train, s.dataset.tokenizer
  # Shapes and target shardings only: a resumed run never materialises a fresh state it would drop.
  abstract = jax.eval_shape(lambda: init_train_state(s.model_cfg, t))
  shardings = mesh_lib.state_shardings(abstract, s.mesh)
  latest = ckpt.latest_step()
  if not t.resume:
    if latest is not None:
      raise UserError(f'{ckpt.directory} already holds checkpoints (latest step {latest}). Resume it '
                      'with --config.train.resume=True, or pick another --config.out_dir (nothing '
                      'was overwritten).')
    state = init_train_state(s.model_cfg, t, s.mesh)  # Born sharded.
    if config.init_from:
      # Fine-tuning: start from local GPT-2 weights instead of the random init (Adam moments stay 0).
      from gpt_jax import hf  # Lazily: only fine-tuning reads Hugging Face files.
      params = hf.init_params_from(config.init_from, s.model_cfg)
      state = state.replace(params=mesh_lib.put_global(params, shardings.params))
      s.say(f'initialised the parameters from {config.init_from}')
    return state, math.inf, {}
  if latest is None:
    raise UserError(f'train.resume is set but there is no checkpoint in {ckpt.directory}; '
                    'run without --config.train.resume=True to start a new run.')

  def check_meta(step: int, meta: dict) -> None:
    if meta.get('inference_only'):
      raise UserError(f'checkpoint {step} in {ckpt.directory} holds parameters only (e.g. converted '
                      'GPT-2 weights) and cannot be resumed; fine-tune from it with a fresh '
                      '--config.out_dir instead.')
    checkpoint_lib.check_model_matches(meta, s.model_cfg, ckpt.directory)
    if meta.get('tokenizer') != tok.to_dict():
      raise UserError(f'the checkpoint in {ckpt.directory} was trained with another vocabulary than '
                      f'the data in {s.dataset.directory}; point data.* at the original data.')

  # Target shardings in the abstract state: Orbax reads each device's slice straight into place,
  # whatever the mesh (or number of devices/hosts) the checkpoint was written with. A damaged
  # newest checkpoint is refused, naming the newest good one (train.resume_from_last_good).
  latest, state, meta = ckpt.resume_state(mesh_lib.abstract_with_shardings(abstract, shardings),
                                          check_meta, t.resume_from_last_good)
  if 'best_val_loss' in meta:  # The run's best so far, including evals that saved nothing.
    best_val = meta['best_val_loss']
  else:  # Written before checkpoints recorded it.
    best_step = ckpt.best_step()
    best_val = ckpt.meta(best_step)['val_loss'] if best_step is not None else math.inf
  s.say(f'resumed from step {latest} in {ckpt.directory} (best val loss so far {best_val:.4f})')
  return state, best_val, meta


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
    self.prompt = mesh_lib.put_replicated(np.array([sampling.encode_prompt(  # Only for a sample.
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


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
  """Runs training as configured; returns a summary (final step, losses, wall time, best val loss).

  The run holds its out_dir's lock throughout (gpt_jax/training/runlock.py). SIGTERM or SIGINT stops
  it after the step in flight with a checkpoint of that step, raising `Stopped`.
  """
  t_start = time.time()
  _validate(config)
  out_dir, created = runlock.claim(config.out_dir)  # Refuses a folder that is not a gpt_jax run's.
  try:
    distributed.initialize(config.distributed)  # Multi-process runs: before any JAX call.
    with runlock.hold(out_dir), preemption.StopRequest() as stop:  # Before touching any checkpoint.
      return Trainer(config, out_dir, stop, t_start).run()
  except BaseException:
    if created:  # A run refused before it wrote anything leaves no stray folder behind.
      runlock.release_unused(out_dir)
    raise


class Trainer:
  """One run: the jitted train step, with an evaluator, a checkpointer, a logger and a timer around it.

  `run()` alternates evals (each may save a checkpoint) and steps until max_steps or a stop request.
  """

  def __init__(self, config: ml_collections.ConfigDict, out_dir: str, stop: preemption.StopRequest,
               t_start: float):
    self.config, self.out_dir, self.stop, self.t_start = config, out_dir, stop, t_start
    t, main = config.train, distributed.is_main()
    self.t = t
    self.s = s = setup(config)
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), config.checkpoint,
                                            set_aside_damaged=t.resume and t.resume_from_last_good)
    self.state, self.best_val, resumed_meta = restore_or_init(config, s, self.ckpt)
    # A resumed run's clock goes on from its checkpoint: every `time` it logs, its time to target and
    # its wall_seconds count the earlier segments up to that checkpoint (not the time it lay idle).
    self.t_start -= resumed_meta.get('elapsed_seconds', 0.0)
    # Shardings of this state's own static fields (optimizer and apply_fn objects), which jit's
    # in/out_shardings must match exactly.
    state_sh, rep = mesh_lib.state_shardings(self.state, s.mesh), mesh_lib.replicated(s.mesh)
    self.evaluator = Evaluator(config, s, state_sh.params)
    self.schedule = optim.lr_schedule(t)
    step_jit = dict(in_shardings=(state_sh, s.source.input_shardings(s.mesh)),
                    out_shardings=(state_sh, rep), donate_argnums=0)
    step_fn = functools.partial(train_step, model=GPT(s.model_cfg), draw=s.source.draw,
                                batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                                schedule=self.schedule, mesh=s.mesh)
    self.plain_step = jax.jit(step_fn, **step_jit)
    if t.layer_stats_interval > 0:  # Every N steps the variant with per-layer statistics, compiled
      # up front so that no step timing includes its compilation.
      self.stats_step = jax.jit(functools.partial(step_fn, layer_stats=True), **step_jit).lower(
          self.state, s.source.train_inputs(int(self.state.step))).compile()

    if main:
      with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        f.write(config.to_json_best_effort(indent=1))
    self.log = metrics_lib.MetricsLog(os.path.join(out_dir, 'metrics.jsonl') if main else None,
                                      before_error=self.ckpt.wait)
    if main and t.tensorboard:  # Mirror every record as TensorBoard scalars too.
      self.log = metrics_lib.TensorBoardLog(self.log, os.path.join(out_dir, 'tensorboard'))
    self.start_step = self.step = int(self.state.step)
    if self.start_step:
      # With the time of the clock that goes on from the checkpoint (plots read the times as they are).
      self.log.write({'event': 'resume', 'step': self.start_step,
                      'time': round(time.time() - self.t_start, 3)})
    self.meta = {'model': s.model_cfg.to_dict(), 'tokenizer': s.dataset.tokenizer.to_dict(),
                 'data': {k: s.dataset.meta[k] for k in ('tokenizer', 'vocab_size', 'source_sha256',
                                                         'shards_dir') if k in s.dataset.meta},
                 'config': json.loads(config.to_json_best_effort())}
    self.tokens_per_step = t.batch_size * t.grad_accum_steps * s.model_cfg.block_size
    self.peak, self.peak_src = metrics_lib.peak_flops(t.peak_flops, s.model_cfg.dtype)  # All devices.
    self.bar = tqdm(total=t.max_steps, initial=self.start_step, desc='train', unit='step',
                    dynamic_ncols=True, disable=None if main else True)
    self.say = self.bar.write if not self.bar.disable else s.say
    self.bounded_dispatch = dispatch_is_bounded()
    self.summary = {'start_step': self.start_step}
    if 'target_reached' in resumed_meta:  # Reached in an earlier segment: logged there, once.
      self.summary['target_reached'] = resumed_meta['target_reached']
    self.timer = metrics_lib.StepTimer()

  def run(self) -> dict:
    """Trains to max_steps; returns the summary. Raises `Stopped` after a stop request's checkpoint."""
    t, evaluated = self.t, None
    try:
      while True:
        evaluated = None  # This step's val loss, once evaluated; a resumed step was evaluated before.
        step = self.step
        due = step % t.eval_interval == 0 or step == t.max_steps
        # A resumed step was evaluated before it was saved; step 0 only with train.eval_at_start.
        if due and not step == self.start_step > 0 and (step > 0 or t.eval_at_start):
          evaluated = self.evaluate()
        if step >= t.max_steps or self.stop.should_stop(step, after_eval=evaluated is not None):
          break
        self.train_one_step()
    except KeyboardInterrupt:  # A second Ctrl-C: at once, without a checkpoint of this step.
      self.ckpt.close()
      latest = self.ckpt.latest_step()
      raise UserError(f'interrupted at step {self.step}. ' + (
          f'Continue from checkpoint {latest} with --config.train.resume=True.' if latest is not None
          else 'No checkpoint was written yet.')) from None
    finally:
      self.bar.close()
    if self.step < t.max_steps:  # Left on a signal.
      self.stop_with_checkpoint(evaluated)
    return self.finish()

  def save(self, val_loss: float) -> None:
    meta = dict(self.meta, best_val_loss=self.best_val,
                elapsed_seconds=round(time.time() - self.t_start, 3))
    if 'target_reached' in self.summary:
      meta['target_reached'] = self.summary['target_reached']
    self.ckpt.save(self.step, self.state, meta, val_loss, ema=optim.ema_state(self.state.opt_state))

  def evaluate(self) -> float:
    """Evaluates at this step, logs it, notes the target and saves a checkpoint; returns val loss."""
    t, step, say = self.t, self.step, self.say
    # With train.ema_decay > 0 the evals (and so the best checkpoint) judge the averaged weights.
    rec = dict(self.evaluator(optim.eval_params(self.state), step), lr=float(self.schedule(step)),
               time=round(time.time() - self.t_start, 3))
    _check_finite(rec['val_loss'], 'the validation loss', step, self.ckpt)
    say(f'step {step}: train loss {rec["train_loss"]:.4f}, val loss {rec["val_loss"]:.4f} '
        f'({rec["eval_seconds"]:.1f}s)')
    if 'sample' in rec:
      say('  sample: ' + rec['sample'].replace('\n', '\n          ')[:1000])
    self.log.write(rec)
    improved = rec['val_loss'] < self.best_val
    self.best_val = min(self.best_val, rec['val_loss'])
    reached = t.target_val_loss > 0 and rec['val_loss'] <= t.target_val_loss
    if reached and 'target_reached' not in self.summary:
      self.summary['target_reached'] = {'step': step, 'time': rec['time'], 'val_loss': rec['val_loss']}
      self.log.write({'event': 'target_reached', 'step': step, 'time': rec['time'],
                      'target_val_loss': t.target_val_loss})
      say(f'  reached the target val loss {t.target_val_loss} at step {step}, '
          f'{rec["time"] / 60:.1f} min after the start')
    if step > self.start_step and (improved or self.config.checkpoint.save == 'always'):
      self.save(rec['val_loss'])
      say(f'  saved checkpoint {step} ({"best" if improved else "latest"})')
    self.summary.update(final_train_loss=rec['train_loss'], final_val_loss=rec['val_loss'])
    self.timer.restart()  # Evals don't count in step timing.
    return rec['val_loss']

  def train_one_step(self) -> None:
    """One jitted step; syncs only where timing, logging or the CPU dispatch bound needs it."""
    t, timer = self.t, self.timer
    with_stats = t.layer_stats_interval > 0 and (self.step + 1) % t.layer_stats_interval == 0
    step_fn = self.stats_step if with_stats else self.plain_step
    self.state, metrics = step_fn(self.state, self.s.source.train_inputs(self.step))
    self.step = step = self.step + 1
    timer.tick()
    self.bar.update(1)
    if self.bounded_dispatch and step % CPU_MAX_STEPS_IN_FLIGHT == 0:
      metrics['loss'].block_until_ready()
    if step == self.start_step + 1:  # The first step includes compilation.
      metrics['loss'].block_until_ready()
      self.say(f'compiled and ran the first step in {timer.seconds():.1f}s')
      timer.restart()
    elif step == self.start_step + 6:  # A few compiled steps tell how long the whole run will take.
      metrics['loss'].block_until_ready()
      metrics_lib.report_expected_time(self.say, timer.per_step(), t, step)
    if step % t.log_interval == 0 or step == t.max_steps:
      self.log_step(metrics)
    if with_stats:
      self.log.write(layer_stats_lib.record(step, metrics, self.s.model_cfg,
                                            time.time() - self.t_start))

  def log_step(self, metrics: dict) -> None:
    step, model_cfg = self.step, self.s.model_cfg
    loss = float(metrics['loss'])  # Syncs with the device.
    _check_finite(loss, 'the training loss', step, self.ckpt)
    dt = self.timer.per_step()
    rec = {'step': step, 'train_loss': loss, 'lr': float(metrics['lr']),
           'grad_norm': float(metrics['grad_norm']), 'ms_per_step': round(1e3 * dt, 3),
           'tokens_per_s': round(self.tokens_per_step / dt, 1),
           'mfu': round(flops_per_token(model_cfg) * self.tokens_per_step / dt / self.peak, 5),
           'time': round(time.time() - self.t_start, 3)}
    self.log.write(rec)
    self.say(f'step {step}: loss {loss:.4f}, lr {rec["lr"]:.2e}, {rec["ms_per_step"]:.1f} '
             f'ms/step, {rec["tokens_per_s"]:,.0f} tok/s, MFU {100 * rec["mfu"]:.2f}% of {self.peak_src}')
    self.bar.set_postfix(loss=f'{loss:.3f}')
    self.timer.restart()

  def stop_with_checkpoint(self, evaluated: float | None) -> None:
    """After a stop request: saves this step (unless its eval just did), finalises, raises Stopped."""
    step, ckpt = self.step, self.ckpt
    if step > self.start_step and step not in ckpt.steps():
      self.save(math.inf if evaluated is None else evaluated)  # Unevaluated: never the 'best'.
    ckpt.close()
    why = self.stop.signal_name or 'a signal to another process'
    self.log.write({'event': 'stopped', 'step': step, 'signal': why})
    latest = ckpt.latest_step()
    raise Stopped(f'{why}: stopped at step {step}; ' + (
        f'checkpoint {latest} is saved in {ckpt.directory}. Resume with: '
        f'{preemption.resume_command()}' if latest is not None else
        'no checkpoint was written yet: start the run again with the same command.'), step, why)

  def finish(self) -> dict:
    """Makes sure a checkpoint exists, finalises the writes, prints and returns the summary."""
    t, ckpt, summary = self.t, self.ckpt, self.summary
    if ckpt.latest_step() is None:
      # "best" mode only writes when val loss improves on an earlier eval; a run that never
      # evaluated twice would otherwise end with nothing to sample from.
      self.save(summary.get('final_val_loss', math.inf))
    ckpt.close()
    summary.update(final_step=self.step, best_val_loss=self.best_val,
                   wall_seconds=round(time.time() - self.t_start, 2),
                   out_dir=self.out_dir)
    self.s.say(f'done: step {self.step}, best val loss {self.best_val:.4f}, '
               f'{summary["wall_seconds"]:.1f}s; checkpoints in {ckpt.directory}')
    if t.target_val_loss > 0:
      hit = summary.get('target_reached')
      how = ('full pass over the val split at the evals' if t.val_full_pass else
             'as estimated at the evals')
      self.s.say(f'time to target (val loss <= {t.target_val_loss}, {how}): ' + (
          f'{hit["time"] / 60:.1f} min, step {hit["step"]}' if hit else 'not reached') + (
          '' if t.val_full_pass else
          '; scripts/evaluate.py gives the full-pass figure of the best checkpoint'))
    return summary


def _check_finite(value: float, what: str, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  if not math.isfinite(value):
    # A background save still in flight is the last good checkpoint: finish it before naming it (an
    # exception would otherwise leave it as a temporary directory that no resume sees).
    ckpt.wait()
    latest = ckpt.latest_step()
    where = (f'the last good checkpoint (step {latest}) is untouched in {ckpt.directory}'
             if latest is not None else 'no checkpoint had been written yet')
    raise UserError(f'{what} is {value} at step {step}: training diverged and was stopped; {where}. '
                    'Try a lower train.learning_rate, a higher train.warmup_steps or train.grad_clip > 0.')



def _validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a typo-free config can still get wrong, with one message listing them all."""
  t, c = config.train, config.checkpoint
  problems = []
  for name in ('batch_size', 'max_steps', 'eval_interval', 'eval_iters', 'log_interval',
               'grad_accum_steps'):
    if int(t[name]) < 1:
      problems.append(f'train.{name} must be >= 1 (got {t[name]})')
  if t.target_val_loss < 0:
    problems.append(f'train.target_val_loss must be >= 0, 0 = none (got {t.target_val_loss})')
  if t.learning_rate <= 0:
    problems.append(f'train.learning_rate must be > 0 (got {t.learning_rate})')
  if t.optimizer not in optim.OPTIMIZERS:
    problems.append(f'train.optimizer must be one of {optim.OPTIMIZERS} (got {t.optimizer!r})')
  if t.optimizer == 'muon' and t.muon_learning_rate <= 0:
    problems.append(f'train.muon_learning_rate must be > 0 (got {t.muon_learning_rate})')
  if t.optimizer == 'muon' and t.muon_ns_steps < 1:
    problems.append(f'train.muon_ns_steps must be >= 1 (got {t.muon_ns_steps})')
  if not 0.0 <= t.ema_decay < 1.0:
    problems.append(f'train.ema_decay must be in [0, 1), 0 = off (got {t.ema_decay})')
  if t.lr_schedule not in optim.LR_SCHEDULES:
    problems.append(f'train.lr_schedule must be one of {optim.LR_SCHEDULES} (got {t.lr_schedule!r})')
  elif t.lr_schedule == 'wsd':
    try:
      optim.wsd_boundaries(t)
    except UserError as e:
      problems.append(str(e))
  if t.val_full_pass and config.data.shards_dir:
    problems.append('train.val_full_pass scores the in-memory val split; with data.shards_dir set '
                    'it is not loaded: set --config.train.val_full_pass=False')
  if config.data.shards_dir and int(t.seed) < 0:
    problems.append(f'train.seed must be >= 0 with data.shards_dir (got {t.seed})')
  if c.save not in ('best', 'always'):
    problems.append(f"checkpoint.save must be 'best' or 'always' (got {c.save!r})")
  if problems:
    raise UserError('invalid config: ' + '; '.join(problems))
