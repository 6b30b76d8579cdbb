"""The training loop: set up, restore or initialise, then wire an evaluator, a checkpointer, a logger
and a timer around the jitted `train_step` (gpt_jax/training/step.py).

The pieces, in the order a run uses them:
  setup             devices and mesh, the data (one `BatchSource` for either format), the model.
  restore_or_init   the newest checkpoint of a resumed run (its shardings, any mesh), else a fresh
                    state born sharded, optionally with GPT-2 weights (`init_from`).
  Evaluator         train/val loss on fixed batches, plus a short sample, at every eval.
  train_and_evaluate  the loop itself, holding the run directory's lock; SIGTERM/SIGINT stop it after
                    the step in flight with a checkpoint of that step (gpt_jax/training/preemption.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import optim
from gpt_jax import sampling
from gpt_jax.config import ModelConfig, flops_per_token, model_config_from, num_params
from gpt_jax.data import batches as batches_lib
from gpt_jax.data import shards as shards_lib
from gpt_jax.data import text as text_lib
from gpt_jax.errors import Stopped, UserError
from gpt_jax.model import GPT
from gpt_jax.parallel import distributed
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import layer_stats as layer_stats_lib
from gpt_jax.training import metrics as metrics_lib
from gpt_jax.training import preemption, runlock
from gpt_jax.training.step import TrainState, eval_step, init_train_state, train_step

# XLA:CPU with several devices (simulated with --xla_force_host_platform_device_count, or one process
# of many) deadlocks in a collective's rendezvous once a few dozen steps are queued without a sync.
# There the loop waits for every 8th step: no cost on a CPU, whose dispatch cannot usefully run
# further ahead. GPUs and TPUs run ahead unbounded.
CPU_MAX_STEPS_IN_FLIGHT = 8


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
  return Setup(mesh, source, ds, model_cfg, say)


def restore_or_init(config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint_lib.Checkpointer,
                    ) -> tuple[TrainState, float]:
  """(state, best val loss so far): the newest checkpoint if train.resume, else a fresh state.

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
    return state, math.inf
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
  return state, best_val


class Evaluator:
  """Train and val loss on `eval_iters` fixed batches (the same at every eval), and a short sample."""

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
    self.prompt = mesh_lib.put_replicated(np.array(
        [text_lib.encode_text(s.dataset.tokenizer, self.cfg_s.prompt or '\n')], np.int32), s.mesh)

  def split_loss(self, params: Any, split: str) -> float:
    """Mean loss over the split's eval batches, summed in float32 (synced per batch, which also bounds
    the CPU dispatch queue)."""
    total = np.float32(0)
    for i in range(self.eval_iters):
      total += np.float32(self.step(params, self.s.source.eval_inputs(split, i), self.keys[i]))
    return float(total / np.float32(self.eval_iters))

  def __call__(self, params: Any, step: int) -> dict:
    t0 = time.perf_counter()
    rec = {'step': step, **{f'{split}_loss': self.split_loss(params, split)
                            for split in ('train', 'val')}}
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
  out_dir = os.path.abspath(os.path.expanduser(config.out_dir))
  os.makedirs(out_dir, exist_ok=True)
  distributed.initialize(config.distributed)  # Multi-process runs: before any JAX call.
  with runlock.hold(out_dir), preemption.StopRequest() as stop:  # Before touching any checkpoint.
    return _run(config, out_dir, stop, t_start)


def _run(config: ml_collections.ConfigDict, out_dir: str, stop: preemption.StopRequest,
         t_start: float) -> dict:
  t, main = config.train, distributed.is_main()
  s = setup(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), config.checkpoint,
                                    set_aside_damaged=t.resume and t.resume_from_last_good)
  state, best_val = restore_or_init(config, s, ckpt)
  # Shardings of this state's own static fields (optimizer and apply_fn objects), which jit's
  # in/out_shardings must match exactly.
  state_sh, rep = mesh_lib.state_shardings(state, s.mesh), mesh_lib.replicated(s.mesh)
  evaluator = Evaluator(config, s, state_sh.params)
  schedule = optim.lr_schedule(t)
  step_jit = dict(in_shardings=(state_sh, s.source.input_shardings(s.mesh)),
                  out_shardings=(state_sh, rep), donate_argnums=0)
  step_fn = functools.partial(train_step, model=GPT(s.model_cfg), draw=s.source.draw,
                              batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                              schedule=schedule, mesh=s.mesh)
  plain_step = jax.jit(step_fn, **step_jit)
  stats_every = t.layer_stats_interval  # > 0: every N steps the variant with per-layer statistics,
  if stats_every > 0:  # compiled up front so that no step timing includes its compilation.
    stats_step = jax.jit(functools.partial(step_fn, layer_stats=True), **step_jit).lower(
        state, s.source.train_inputs(int(state.step))).compile()

  if main:
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1))
  log = metrics_lib.MetricsLog(os.path.join(out_dir, 'metrics.jsonl') if main else None,
                               before_error=ckpt.wait)
  if main and t.tensorboard:  # Mirror every record as TensorBoard scalars too.
    log = metrics_lib.TensorBoardLog(log, os.path.join(out_dir, 'tensorboard'))
  start_step = step = int(state.step)
  if start_step:
    log.write({'event': 'resume', 'step': start_step})
  tok = s.dataset.tokenizer
  meta = {'model': s.model_cfg.to_dict(), 'tokenizer': tok.to_dict(),
          'data': {k: s.dataset.meta[k] for k in ('tokenizer', 'vocab_size', 'source_sha256',
                                                   'shards_dir') if k in s.dataset.meta},
          'config': json.loads(config.to_json_best_effort())}
  tokens_per_step = t.batch_size * t.grad_accum_steps * s.model_cfg.block_size
  peak, peak_src = metrics_lib.peak_flops(t.peak_flops)
  if not peak_src.startswith('measured'):  # A per-device peak; a measured CPU matmul already uses
    peak *= len(jax.devices())             # every core, which simulated CPU devices share.
  bar = tqdm(total=t.max_steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
             disable=None if main else True)
  say = bar.write if not bar.disable else s.say
  bounded_dispatch = jax.default_backend() == 'cpu' and len(jax.devices()) > 1
  summary, timer, evaluated = {'start_step': start_step}, metrics_lib.StepTimer(), None

  def save(step: int, val_loss: float) -> None:
    ckpt.save(step, state, dict(meta, best_val_loss=best_val), val_loss)

  try:
    while True:
      evaluated = None  # This step's val loss, once evaluated; a resumed step was evaluated before.
      if (step % t.eval_interval == 0 or step == t.max_steps) and not step == start_step > 0:
        rec = dict(evaluator(state.params, step), lr=float(schedule(step)),
                   time=round(time.time() - t_start, 3))
        _check_finite(rec['val_loss'], 'the validation loss', step, ckpt)
        say(f'step {step}: train loss {rec["train_loss"]:.4f}, val loss {rec["val_loss"]:.4f} '
            f'({rec["eval_seconds"]:.1f}s)')
        if 'sample' in rec:
          say('  sample: ' + rec['sample'].replace('\n', '\n          ')[:1000])
        log.write(rec)
        improved, best_val, evaluated = rec['val_loss'] < best_val, min(best_val, rec['val_loss']), rec['val_loss']
        reached = t.target_val_loss > 0 and rec['val_loss'] <= t.target_val_loss
        if reached and 'target_reached' not in summary:
          summary['target_reached'] = {'step': step, 'time': rec['time'], 'val_loss': rec['val_loss']}
          log.write({'event': 'target_reached', 'step': step, 'time': rec['time'],
                     'target_val_loss': t.target_val_loss})
          say(f'  reached the target val loss {t.target_val_loss} at step {step}, '
              f'{rec["time"] / 60:.1f} min after the start')
        if step > start_step and (improved or config.checkpoint.save == 'always'):
          save(step, rec['val_loss'])
          say(f'  saved checkpoint {step} ({"best" if improved else "latest"})')
        summary.update(final_train_loss=rec['train_loss'], final_val_loss=rec['val_loss'])
        timer.restart()  # Evals don't count in step timing.
      if step >= t.max_steps or stop.should_stop(step, after_eval=evaluated is not None):
        break

      with_stats = stats_every > 0 and (step + 1) % stats_every == 0
      state, metrics = (stats_step if with_stats else plain_step)(state, s.source.train_inputs(step))
      step += 1
      timer.tick()
      bar.update(1)
      if bounded_dispatch and step % CPU_MAX_STEPS_IN_FLIGHT == 0:
        metrics['loss'].block_until_ready()
      if step == start_step + 1:  # The first step includes compilation.
        metrics['loss'].block_until_ready()
        say(f'compiled and ran the first step in {timer.seconds():.1f}s')
        timer.restart()
      elif step == start_step + 6:  # A few compiled steps tell how long the whole run will take.
        metrics['loss'].block_until_ready()
        metrics_lib.report_expected_time(say, timer.per_step(), t, step)
      if step % t.log_interval == 0 or step == t.max_steps:
        loss = float(metrics['loss'])  # Syncs with the device.
        _check_finite(loss, 'the training loss', step, ckpt)
        dt = timer.per_step()
        rec = {'step': step, 'train_loss': loss, 'lr': float(metrics['lr']),
               'grad_norm': float(metrics['grad_norm']), 'ms_per_step': round(1e3 * dt, 3),
               'tokens_per_s': round(tokens_per_step / dt, 1),
               'mfu': round(flops_per_token(s.model_cfg) * tokens_per_step / dt / peak, 5),
               'time': round(time.time() - t_start, 3)}
        log.write(rec)
        say(f'step {step}: loss {loss:.4f}, lr {rec["lr"]:.2e}, {rec["ms_per_step"]:.1f} '
            f'ms/step, {rec["tokens_per_s"]:,.0f} tok/s, MFU {100 * rec["mfu"]:.2f}% of {peak_src}')
        bar.set_postfix(loss=f'{loss:.3f}')
        timer.restart()
      if with_stats:
        log.write(layer_stats_lib.record(step, metrics, s.model_cfg, time.time() - t_start))
  except KeyboardInterrupt:  # A second Ctrl-C: at once, without a checkpoint of this step.
    ckpt.close()
    latest = ckpt.latest_step()
    raise UserError(f'interrupted at step {step}. ' + (
        f'Continue from checkpoint {latest} with --config.train.resume=True.' if latest is not None
        else 'No checkpoint was written yet.')) from None
  finally:
    bar.close()
  if step < t.max_steps:  # Left on a signal: save this step (unless its eval just did), finalise.
    if step > start_step and step not in ckpt.steps():
      save(step, math.inf if evaluated is None else evaluated)  # Unevaluated: never the 'best'.
    ckpt.close()
    why = stop.signal_name or 'a signal to another process'
    log.write({'event': 'stopped', 'step': step, 'signal': why})
    latest = ckpt.latest_step()
    raise Stopped(f'{why}: stopped at step {step}; ' + (
        f'checkpoint {latest} is saved in {ckpt.directory}. Resume with: '
        f'{preemption.resume_command()}' if latest is not None else
        'no checkpoint was written yet: start the run again with the same command.'), step, why)
  if ckpt.latest_step() is None:
    # "best" mode only writes when val loss improves on an earlier eval; a run that never evaluated
    # twice would otherwise end with nothing to sample from.
    save(step, summary.get('final_val_loss', math.inf))
  ckpt.close()
  summary.update(final_step=step, best_val_loss=best_val, wall_seconds=round(time.time() - t_start, 2),
                 out_dir=out_dir)
  s.say(f'done: step {step}, best val loss {best_val:.4f}, {summary["wall_seconds"]:.1f}s; '
        f'checkpoints in {ckpt.directory}')
  if t.target_val_loss > 0:
    hit = summary.get('target_reached')
    s.say(f'time to target (val loss <= {t.target_val_loss}, as estimated at the evals): ' + (
        f'{hit["time"] / 60:.1f} min, step {hit["step"]}' if hit else 'not reached') +
        '; scripts/evaluate.py gives the full-pass figure of the best checkpoint')
  return summary


def _check_finite(value: float, what: str, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  if not math.isfinite(value):
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
  if t.lr_schedule not in optim.LR_SCHEDULES:
    problems.append(f'train.lr_schedule must be one of {optim.LR_SCHEDULES} (got {t.lr_schedule!r})')
  elif t.lr_schedule == 'wsd':
    try:
      optim.wsd_boundaries(t)
    except UserError as e:
      problems.append(str(e))
  if config.data.shards_dir and int(t.seed) < 0:
    problems.append(f'train.seed must be >= 0 with data.shards_dir (got {t.seed})')
  if c.save not in ('best', 'always'):
    problems.append(f"checkpoint.save must be 'best' or 'always' (got {c.save!r})")
  if problems:
    raise UserError('invalid config: ' + '; '.join(problems))
