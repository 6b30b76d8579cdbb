"""The training loop: the jitted `train_step` (gpt_jax/training/step.py) wired to an evaluator, a
checkpointer, a logger and a timer. In the order a run uses them: `setup` and `restore_or_init`
(devices, mesh, data, model; the state to start from: run_setup.py), the `Evaluator` (losses and a
sample at every eval: evaluator.py), the `Trainer` (steps, evals that may save a checkpoint, logs, the
stop request), and `train_and_evaluate`, which runs a Trainer holding the run directory's lock;
SIGTERM/SIGINT stop it after the step (or call of steps) in flight with a checkpoint (preemption.py).
"""

from __future__ import annotations

import functools
import math
import os
import time

import ml_collections
from tqdm.auto import tqdm

from gpt_jax import checkpoint as checkpoint_lib, config_checks, optim, optim_variants
from gpt_jax.errors import Stopped, UserError
from gpt_jax.model import GPT
from gpt_jax.parallel import distributed, mesh as mesh_lib
from gpt_jax.training import evaluator, layer_stats, metrics as metrics_lib, preemption, run_setup, runlock
from gpt_jax.training.multi_step import Steps
from gpt_jax.training.startup import Startup, persistent_cache
from gpt_jax.training.step import train_step


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
  """Runs training as configured; returns a summary (final step, losses, wall time, best val loss).

  The run holds its out_dir's lock throughout (gpt_jax/training/runlock.py). SIGTERM or SIGINT stops
  it after the step (or call of steps) in flight with a checkpoint of that step, raising `Stopped`.
  """
  t_start = time.time()
  config_checks.validate(config)  # Every setting, before out_dir or anything else is made.
  out_dir, created = runlock.claim(config.out_dir)  # Refuses a folder that is not a gpt_jax run's.
  try:
    distributed.initialize(config.distributed)  # Multi-process runs: before any JAX call.
    with runlock.hold(out_dir), preemption.StopRequest() as stop, \
         persistent_cache(config.train.compilation_cache_dir):  # Before any checkpoint or compile.
      return Trainer(config, out_dir, stop, t_start).run()
  except BaseException:
    if created:  # A run refused before it wrote anything leaves no stray folder behind.
      runlock.release_unused(out_dir)
    raise


class Trainer:
  """One run: `run()` alternates evals (each may save a checkpoint) and jitted train steps until
  max_steps or a stop request."""

  def __init__(self, config: ml_collections.ConfigDict, out_dir: str, stop: preemption.StopRequest,
               t_start: float):
    self.config, self.out_dir, self.stop, self.t_start = config, out_dir, stop, t_start
    t, main = config.train, distributed.is_main()
    self.t, self.startup = t, Startup(t_start)
    self.s = s = run_setup.setup(config)
    self.ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), config.checkpoint,
                                            set_aside_damaged=t.resume and t.resume_from_last_good)
    abstract = run_setup.abstract_state(config, s, self.ckpt)  # Shapes and static fields only.
    state_sh, rep = mesh_lib.state_shardings(abstract, s.mesh), mesh_lib.replicated(s.mesh)
    self.schedule = optim.lr_schedule(t)
    step_fn = functools.partial(train_step, model=GPT(s.model_cfg), draw=s.source.draw,
                                batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                                schedule=self.schedule, mesh=s.mesh)
    # Jitted calls of train.steps_per_call steps each (multi_step.py; 1: jax.jit(step_fn) itself).
    self.steps = Steps(step_fn, t.steps_per_call, s.source, s.mesh, (state_sh, rep))
    # The first call (and any layer-stats variant) compiles in a background thread from the shapes
    # while the state is made and the first eval runs (startup.py).
    self.startup.compile(self.steps, abstract, t, first_step=self.ckpt.latest_step() or 0)
    self.state, self.best_val, resumed_meta = run_setup.restore_or_init(config, s, self.ckpt, abstract)
    self.startup.mark('state')
    # A resumed run's clock goes on from its checkpoint: every `time` it logs, its time to target and
    # its wall_seconds count the earlier segments up to that checkpoint (not the time it lay idle).
    self.t_start -= resumed_meta.get('elapsed_seconds', 0.0)
    self.evaluator = evaluator.Evaluator(config, s, state_sh.params)

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
    self.meta = run_setup.checkpoint_meta(config, s)
    self.tokens_per_step = t.batch_size * t.grad_accum_steps * s.model_cfg.block_size
    self.peak = metrics_lib.peak_flops_later(t.peak_flops, s.model_cfg.dtype)  # All devices.
    self.bar = tqdm(total=t.max_steps, initial=self.start_step, desc='train', unit='step',
                    dynamic_ncols=True, disable=None if main else True)
    self.say = self.bar.write if not self.bar.disable else s.say
    self.bounded_dispatch = run_setup.dispatch_is_bounded()
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
        if step >= t.max_steps or self.stop.should_stop(step, evaluated is not None, t.steps_per_call):
          break
        self.train_one_step()
    except KeyboardInterrupt:  # A second Ctrl-C: at once, without a checkpoint of this step.
      self.ckpt.close()
      raise UserError(preemption.interrupted_message(self.step, self.ckpt.latest_step())) from None
    finally:
      self.bar.close()
    if self.step < t.max_steps:  # Left on a signal.
      self.stop_with_checkpoint(evaluated)
    return self.finish()

  def save(self, val_loss: float) -> None:
    meta = dict(self.meta, best_val_loss=self.best_val, elapsed_seconds=round(time.time() - self.t_start, 3))
    if 'target_reached' in self.summary:
      meta['target_reached'] = self.summary['target_reached']
    self.ckpt.save(self.step, self.state, meta, val_loss, ema=optim_variants.ema_state(self.state.opt_state))

  def evaluate(self) -> float:
    """Evaluates at this step, logs it, notes the target and saves a checkpoint; returns val loss."""
    t, step, say = self.t, self.step, self.say
    # With train.ema_decay > 0 the evals (and so the best checkpoint) judge the averaged weights.
    rec = dict(self.evaluator(optim_variants.eval_params(self.state), step),
               lr=metrics_lib.lr_at(self.schedule, step), time=round(time.time() - self.t_start, 3))
    evaluator.check_finite(rec['val_loss'], 'the validation loss', step, self.ckpt)
    say(f'step {step}: train loss {rec["train_loss"]:.4f}, val loss {rec["val_loss"]:.4f} '
        f'({rec["eval_seconds"]:.1f}s)')
    if 'sample' in rec:
      say('  sample: ' + rec['sample'].replace('\n', '\n          ')[:1000])
    self.log.write(rec)
    improved = rec['val_loss'] < self.best_val
    self.best_val = min(self.best_val, rec['val_loss'])
    evaluator.note_target(rec, t.target_val_loss, self.summary, self.log.write, say)
    if step > self.start_step and (improved or self.config.checkpoint.save == 'always'):
      self.save(rec['val_loss'])
      say(f'  saved checkpoint {step} ({"best" if improved else "latest"})')
    self.summary.update(final_train_loss=rec['train_loss'], final_val_loss=rec['val_loss'])
    self.timer.restart()  # Evals don't count in step timing.
    return rec['val_loss']

  def train_one_step(self) -> None:
    """One jitted call of k steps (k = train.steps_per_call, but for a shorter call that ends at a
    multiple of it or at max_steps); syncs only where timing, logging or the CPU dispatch bound needs it."""
    t, timer, first = self.t, self.timer, self.step
    k = self.steps.call_length(first, t.max_steps)
    with_stats = t.layer_stats_interval > 0 and (first + k) % t.layer_stats_interval == 0
    self.state, metrics = self.steps(self.state, first, k, layer_stats=with_stats)  # The last step's.
    self.step = step = first + k
    timer.tick(k)
    self.bar.update(k)
    if self.bounded_dispatch and step % run_setup.CPU_MAX_STEPS_IN_FLIGHT < k:  # Passed a multiple of it.
      metrics['loss'].block_until_ready()
    if first == self.start_step:  # The first call includes compilation.
      metrics['loss'].block_until_ready()
      self.log.write(self.startup.record(step, time.time() - self.t_start))
      self.say(self.startup.line(f'{k} steps' if k > 1 else 'step', timer.seconds()))
      timer.restart()
    elif first < self.start_step + 6 * t.steps_per_call <= step:  # 5 compiled calls: the run's time.
      metrics['loss'].block_until_ready()
      metrics_lib.report_expected_time(self.say, timer.per_step(), t, step)
    if step % t.log_interval == 0 or step == t.max_steps:
      self.log_step(metrics)
    if with_stats:
      self.log.write(layer_stats.record(step, metrics, self.s.model_cfg, time.time() - self.t_start))

  def log_step(self, metrics: dict) -> None:
    loss = float(metrics['loss'])  # Syncs with the device.
    evaluator.check_finite(loss, 'the training loss', self.step, self.ckpt)
    rec = metrics_lib.step_record(self.step, loss, metrics, self.timer.per_step(), self.tokens_per_step,
                                  self.s.model_cfg, self.peak()[0], time.time() - self.t_start)
    self.log.write(rec)
    self.say(metrics_lib.step_line(rec, self.peak()[1]))
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
    raise Stopped(preemption.stopped_message(why, step, ckpt.latest_step(), ckpt.directory), step, why)

  def finish(self) -> dict:
    """Makes sure a checkpoint exists, finalises the writes, prints and returns the summary."""
    t, ckpt, summary = self.t, self.ckpt, self.summary
    if ckpt.latest_step() is None:
      # "best" mode only writes when val loss improves on an earlier eval; a run that never
      # evaluated twice would otherwise end with nothing to sample from.
      self.save(summary.get('final_val_loss', math.inf))
    ckpt.close()
    summary.update(final_step=self.step, best_val_loss=self.best_val,
                   wall_seconds=round(time.time() - self.t_start, 2), out_dir=self.out_dir)
    self.s.say(f'done: step {self.step}, best val loss {self.best_val:.4f}, '
               f'{summary["wall_seconds"]:.1f}s; checkpoints in {ckpt.directory}')
    if t.target_val_loss > 0:
      self.s.say(evaluator.time_to_target(t, summary.get('target_reached')))
    return summary
