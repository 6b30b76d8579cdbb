"""Training: small pure functions (`init_train_state`, `train_step`, `eval_step`) and a thin loop.

Randomness is explicit and never reused. A run has one base key, PRNGKey(train.seed). Step s uses
`fold_in(base, s)`, split into a batch key and a dropout key, so a resumed run draws exactly the
batches and dropout masks an uninterrupted run would (the same idea as Flax's lm1b example). With
`data.shards_dir` the batch instead comes from token shards on disk, drawn for (train.seed, s) and fed
from the host (`train_step_on_batch`); the dropout key is the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import data as data_lib
from gpt_jax import distributed
from gpt_jax import instruments
from gpt_jax import optim
from gpt_jax import preemption
from gpt_jax import runlock
from gpt_jax import sample as sample_lib
from gpt_jax import sharding as sharding_lib
from gpt_jax import shards as shards_lib
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.errors import Stopped, UserError
from gpt_jax.model import GPT

EVAL_KEY_SALT = 0x5EED  # Eval batches come from their own key stream, fixed for the whole run.
# XLA:CPU with several devices (simulated with --xla_force_host_platform_device_count, or one process
# of many) deadlocks in a collective's rendezvous, and aborts after 40 s, once some 32-64 steps are
# queued without a sync (jax 0.10.2, 2 cores). There the loop waits for every 8th step: no cost on a
# CPU, whose dispatch cannot usefully run further ahead. GPUs and TPUs run ahead unbounded.
CPU_MAX_STEPS_IN_FLIGHT = 8


class TrainState(train_state.TrainState):
  """params, opt_state, step (from Flax's TrainState) plus the run's base PRNG key."""
  key: jax.Array


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run; `model.vocab_size = 0` means 'take it from the data'."""
  m = config.model.to_dict()
  if not m.get('vocab_size'):
    m['vocab_size'] = vocab_size
  elif m['vocab_size'] < vocab_size:
    raise UserError(f'model.vocab_size={m["vocab_size"]} is smaller than the tokenizer\'s vocabulary '
                    f'({vocab_size}); set it to 0 (automatic) or at least {vocab_size}.')
  return ModelConfig.from_dict(m)


def init_train_state(model_cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                     mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
  """Fresh parameters (GPT-2 init) and optimizer state; step 0.

  With a `mesh`, the state is born with its shardings (`sharding.state_shardings`): each device
  computes only its own slice, so a model too big for one device never exists whole anywhere.
  """
  model = GPT(model_cfg)
  tx = optim.make_optimizer(train_cfg)

  def init():  # No arguments: the keys are made inside, so nothing needs placing on devices first.
    base = jax.random.PRNGKey(train_cfg.seed)
    init_key = jax.random.fold_in(base, -1 & 0xFFFFFFFF)  # Distinct from every step's key.
    params = model.init(init_key, jnp.zeros((1, model_cfg.block_size), jnp.int32))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, key=base)

  if mesh is None:
    return jax.jit(init)()
  shardings = sharding_lib.state_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)()


def accurate_mean(v: jax.Array) -> jax.Array:
  """jnp.mean(v) to ~0.3 ulp instead of ~1.5.

  XLA's float32 mean of the B*T per-token losses is typically 1-2 ulp off (up to 5), about 7e-7 at a
  loss of 4, three times PyTorch's error; one pass over the residuals v - mean corrects it. The
  correction is under stop_gradient, so the gradient is exactly jnp.mean's (1/n per element).
  """
  m = jnp.mean(v)
  return m + jax.lax.stop_gradient(jnp.mean(v - m))


def loss_fn(params: Any, model: GPT, x: jax.Array, y: jax.Array, dropout_key: Optional[jax.Array],
            ) -> jax.Array:
  """Mean next-token cross-entropy (float32). Dropout is on iff a key is given."""
  logits = model.apply({'params': params}, x, deterministic=dropout_key is None,
                       rngs=None if dropout_key is None else {'dropout': dropout_key})
  return accurate_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def batch_gradients(params: Any, train_data: jax.Array, batch_key: jax.Array,
                    dropout_key: jax.Array, *, model: GPT, batch_size: int, grad_accum_steps: int,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    ) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
  """Draws one step's batch on device and returns (mean loss, mean gradients, x, y).

  All `batch_size * grad_accum_steps` rows are drawn at once and then split into micro-batches (see
  `gradients`), so accumulation computes the same gradients as one big batch.
  """
  T = model.config.block_size
  x, y = data_lib.get_batch(train_data, batch_key, batch_size * grad_accum_steps, T)
  loss, grads = gradients(params, x, y, dropout_key, model=model, batch_size=batch_size,
                          grad_accum_steps=grad_accum_steps, mesh=mesh)
  return loss, grads, x, y


def gradients(params: Any, x: jax.Array, y: jax.Array, dropout_key: jax.Array, *, model: GPT,
              batch_size: int, grad_accum_steps: int, mesh: Optional[jax.sharding.Mesh] = None,
              ) -> tuple[jax.Array, Any]:
  """(mean loss, mean gradients) of one step's batch x, y: (batch_size * grad_accum_steps, T).

  The rows are split into `grad_accum_steps` consecutive micro-batches of `batch_size`, so
  accumulation computes the same gradients as one big batch (up to float summation order).
  """
  T = model.config.block_size
  if mesh is not None and grad_accum_steps == 1:
    x, y = (sharding_lib.constrain_batch(a, sharding_lib.batch_sharding(mesh)) for a in (x, y))
  grad_fn = jax.value_and_grad(loss_fn)
  use_dropout = model.config.dropout > 0
  full_params = sharding_lib.gather_for_compute(params, mesh)  # FSDP: whole weights to compute.

  def micro(i, xb, yb):
    loss, grads = grad_fn(full_params, model, xb, yb,
                          jax.random.fold_in(dropout_key, i) if use_dropout else None)
    return loss, sharding_lib.reduce_gradients(grads, mesh)

  if grad_accum_steps == 1:
    return micro(0, x, y)
  xs = x.reshape(grad_accum_steps, batch_size, T)
  ys = y.reshape(grad_accum_steps, batch_size, T)
  if mesh is not None:  # Each micro-batch is split over all devices, not micro-batch i on device i.
    xs, ys = (sharding_lib.constrain_batch(a, sharding_lib.batch_sharding(mesh, leading=1))
              for a in (xs, ys))

  def body(acc, inp):
    loss, grads = micro(*inp)
    return jax.tree_util.tree_map(jnp.add, acc, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), xs, ys))
  return jax.tree_util.tree_map(lambda a: a / grad_accum_steps, (loss, grads))


def _apply(state: TrainState, loss: jax.Array, grads: Any, x: jax.Array, *, model: GPT,
           schedule: Callable[[Any], Any], dynamics: bool) -> tuple[TrainState, dict]:
  """The optimizer update and the step's metrics, shared by both step variants."""
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  new_state = state.apply_gradients(grads=grads)
  if dynamics:  # Python-level switch: the plain step's computation is exactly what it was without it.
    metrics['dynamics'] = instruments.dynamics(model.config, state.params, new_state.params, grads, x)
  return new_state, metrics


def train_step(state: TrainState, train_data: jax.Array, *, model: GPT, batch_size: int,
               grad_accum_steps: int, schedule: Callable[[Any], Any],
               dynamics: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
               ) -> tuple[TrainState, dict]:
  """One optimizer update: draw the batch on device, average gradients over micro-steps, apply.

  With `dynamics` (a separately compiled variant), metrics['dynamics'] also holds per-layer gradient,
  parameter and update norms and activation/attention statistics (gpt_jax/instruments.py).

  Accumulation computes the same update as one big batch (see `batch_gradients`). With a `mesh`,
  each (micro-)batch is pinned to the batch sharding: every device works on its own rows, and XLA turns the mean over rows into an all-reduce of the gradients. Under FSDP the weights
  are all-gathered for the computation and the gradients reduced onto their shards, where the
  update runs (gpt_jax/sharding.py).
  """
  batch_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  loss, grads, x, _ = batch_gradients(state.params, train_data, batch_key, dropout_key, model=model,
                                      batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                                      mesh=mesh)
  return _apply(state, loss, grads, x, model=model, schedule=schedule, dynamics=dynamics)


def train_step_on_batch(state: TrainState, x: jax.Array, y: jax.Array, *, model: GPT,
                        batch_size: int, grad_accum_steps: int, schedule: Callable[[Any], Any],
                        dynamics: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
                        ) -> tuple[TrainState, dict]:
  """`train_step` on a batch fed from the host (token shards, gpt_jax/shards.py) instead of one cut
  from a device-resident split: x, y are (batch_size * grad_accum_steps, T), batch-sharded.

  The dropout key is train_step's (the batch key goes unused), so dropout masks depend on the step
  alone, whatever feeds the batch.
  """
  _, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  loss, grads = gradients(state.params, x, y, dropout_key, model=model, batch_size=batch_size,
                          grad_accum_steps=grad_accum_steps, mesh=mesh)
  return _apply(state, loss, grads, x, model=model, schedule=schedule, dynamics=dynamics)


def eval_step(params: Any, data: jax.Array, key: jax.Array, *, model: GPT, batch_size: int,
              num_batches: int, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Mean loss over `num_batches` random batches of `data` (dropout off), in one jitted scan."""
  T = model.config.block_size
  full_params = sharding_lib.gather_for_compute(params, mesh)

  def body(total, i):
    x, y = data_lib.get_batch(data, jax.random.fold_in(key, i), batch_size, T)
    if mesh is not None:
      x, y = (sharding_lib.constrain_batch(a, sharding_lib.batch_sharding(mesh)) for a in (x, y))
    return total + loss_fn(full_params, model, x, y, None), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_batches))
  return total / num_batches


def eval_loss_on_batch(params: Any, x: jax.Array, y: jax.Array, *, model: GPT,
                       mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Mean loss of one host-fed batch (dropout off): `eval_step` for token shards."""
  return loss_fn(sharding_lib.gather_for_compute(params, mesh), model, x, y, None)


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT's estimate_mfu."""
  n = num_params(cfg, non_embedding=True)
  return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


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


def _check_finite(value: float, what: str, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  if not math.isfinite(value):
    latest = ckpt.latest_step()
    where = (f'the last good checkpoint (step {latest}) is untouched in {ckpt.directory}'
             if latest is not None else 'no checkpoint had been written yet')
    raise UserError(f'{what} is {value} at step {step}: training diverged and was stopped; {where}. '
                    'Try a lower train.learning_rate, a higher train.warmup_steps or train.grad_clip > 0.')


def train_and_evaluate(config: ml_collections.ConfigDict) -> dict:
  """Runs training as configured; returns a summary (final step, losses, wall time, best val loss).

  The run holds its out_dir's lock throughout (gpt_jax/runlock.py). SIGTERM or SIGINT stops it after
  the step in flight with a checkpoint of that step, raising `Stopped` (gpt_jax/preemption.py).
  """
  t_start = time.time()
  _validate(config)
  out_dir = os.path.abspath(os.path.expanduser(config.out_dir))
  os.makedirs(out_dir, exist_ok=True)
  distributed.initialize(config.get('distributed'))  # Multi-process runs: before any JAX call.
  with runlock.hold(out_dir), preemption.StopRequest() as stop:  # Before touching any checkpoint.
    return _train_and_evaluate(config, out_dir, stop, t_start)


def _train_and_evaluate(config: ml_collections.ConfigDict, out_dir: str,
                        stop: preemption.StopRequest, t_start: float) -> dict:
  cfg_t, cfg_c, cfg_s = config.train, config.checkpoint, config.sample
  main = distributed.is_main()  # Only process 0 prints and writes text files; all compute.
  say0 = print if main else (lambda *args, **kwargs: None)

  devices = jax.devices()  # Every process's devices: the mesh (and each step) spans them all.
  mesh = sharding_lib.make_mesh(config.get('mesh'), devices)
  sharding_lib.check_batch_divisible(cfg_t.batch_size, mesh)
  say0(f'JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) '
       f'[{", ".join(sorted({d.device_kind for d in devices}))}], {distributed.summary()}, '
       f'mesh {sharding_lib.describe(mesh)}')

  # Process 0 prepares the token files first; then the others find them ready (shared filesystem)
  # or prepare their own identical copy (a disk per host), without racing on the same files.
  # data.shards_dir set: token shards streamed from disk (gpt_jax/shards.py) instead of the
  # in-memory splits of data_dir.
  shards_dir = config.data.get('shards_dir', '')
  load = (functools.partial(shards_lib.load, seed=cfg_t.seed) if shards_dir else data_lib.load)
  if main:
    ds = load(config.data)
  distributed.barrier('gpt_jax: data prepared')
  if not main:
    ds = load(config.data, verbose=False)
  data_where = ds.directory if shards_dir else ds.data_dir
  tok = ds.tokenizer
  model_cfg = model_config_from(config, tok.vocab_size)
  if shards_dir:
    ds.check_block_size(model_cfg.block_size)
  model = GPT(model_cfg)
  say0(f'model: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, {model_cfg.n_embd} wide, '
       f'block {model_cfg.block_size}, vocab {model_cfg.vocab_size}: '
       f'{num_params(model_cfg) / 1e6:.2f}M parameters '
       f'({num_params(model_cfg, non_embedding=True) / 1e6:.2f}M without position embeddings)')

  ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), cfg_c,
                                    set_aside_damaged=cfg_t.resume and cfg_t.resume_from_last_good)
  # Shapes and target shardings only: a resumed run never materialises a fresh state it would drop.
  abstract_state = jax.eval_shape(lambda: init_train_state(model_cfg, cfg_t))
  state_sh = sharding_lib.state_shardings(abstract_state, mesh)
  best_val = math.inf
  latest = ckpt.latest_step()
  if cfg_t.resume:
    if latest is None:
      raise UserError(f'train.resume is set but there is no checkpoint in {ckpt.directory}; '
                      'run without --config.train.resume=True to start a new run.')

    def check_meta(step: int, meta: dict) -> None:
      if meta.get('inference_only'):
        raise UserError(f'checkpoint {step} in {ckpt.directory} holds parameters only (e.g. converted '
                        'GPT-2 weights) and cannot be resumed; fine-tune from it with a fresh '
                        '--config.out_dir instead.')
      checkpoint_lib.check_model_matches(meta, model_cfg, ckpt.directory)
      if meta.get('tokenizer') != tok.to_dict():
        raise UserError(f'the checkpoint in {ckpt.directory} was trained with another vocabulary than '
                        f'the data in {data_where}; point data.* at the original data.')

    # Target shardings in the abstract state: Orbax reads each device's slice straight into place,
    # whatever the mesh (or number of devices/hosts) the checkpoint was written with. A damaged
    # newest checkpoint is refused, naming the newest good one (train.resume_from_last_good).
    latest, state, resumed_meta = ckpt.resume_state(
        sharding_lib.abstract_with_shardings(abstract_state, state_sh), check_meta,
        cfg_t.resume_from_last_good)
    if 'best_val_loss' in resumed_meta:  # The run's best so far, including evals that saved nothing.
      best_val = resumed_meta['best_val_loss']
    else:  # Written before checkpoints recorded it.
      best_step = ckpt.best_step()
      best_val = ckpt.meta(best_step)['val_loss'] if best_step is not None else math.inf
    say0(f'resumed from step {latest} in {ckpt.directory} (best val loss so far {best_val:.4f})')
  elif latest is not None:
    raise UserError(f'{ckpt.directory} already holds checkpoints (latest step {latest}). Resume it with '
                    '--config.train.resume=True, or pick another --config.out_dir (nothing was '
                    'overwritten).')
  else:
    state = init_train_state(model_cfg, cfg_t, mesh)  # Born sharded.
    if config.get('init_from'):
      # Fine-tuning: start from local GPT-2 weights instead of the random init (Adam moments stay 0).
      from gpt_jax import hf  # Lazily: only fine-tuning reads Hugging Face files.
      params = hf.init_params_from(config.init_from, model_cfg)
      state = state.replace(params=sharding_lib.put_global(params, state_sh.params))
      say0(f'initialised the parameters from {config.init_from}')
  # The same shardings again, now on this state's own static fields (optimizer and apply_fn objects),
  # which jit's in/out_shardings must match exactly.
  state_sh = sharding_lib.state_shardings(state, mesh)

  if main:
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1))
  log = MetricsLog(os.path.join(out_dir, 'metrics.jsonl') if main else None, before_error=ckpt.wait)
  if main and cfg_t.get('tensorboard', False):  # Mirror every record as TensorBoard scalars too.
    log = instruments.TensorBoardLog(log, os.path.join(out_dir, 'tensorboard'))
  start_step = int(state.step)
  if start_step:
    log.write({'event': 'resume', 'step': start_step})

  rep = sharding_lib.replicated(mesh)
  schedule = optim.lr_schedule(cfg_t)
  step_kw = dict(model=model, batch_size=cfg_t.batch_size, grad_accum_steps=cfg_t.grad_accum_steps,
                 schedule=schedule, mesh=mesh)
  T = model_cfg.block_size
  if shards_dir:
    # Token shards: each step every process reads its own rows of the step's global batch (all
    # batch_size * grad_accum_steps of them, split into micro-batches inside the step) from disk and
    # feeds them to its devices. Dispatch is asynchronous, so the host reads step k + 1's rows while
    # the devices still compute step k. Batches depend on (train.seed, step) only: a resumed run
    # continues the same stream. Evals use fixed batches from a seed of their own.
    batch_sh = sharding_lib.batch_sharding(mesh)
    rows = cfg_t.batch_size * cfg_t.grad_accum_steps
    step_args = lambda step: ds.train.global_batch(step, rows, T, batch_sh)
    step_jit = dict(in_shardings=(state_sh, batch_sh, batch_sh), out_shardings=(state_sh, rep),
                    donate_argnums=0)
    step_impl = train_step_on_batch
    batch_spec = jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=batch_sh)
    example_args = (batch_spec, batch_spec)
    eval_seed = cfg_t.seed + (EVAL_KEY_SALT << 32)  # Never a (32-bit) training seed's stream.
    eval_sets = {'train': ds.train.with_seed(eval_seed), 'val': ds.val.with_seed(eval_seed)}
    eval_batch_fn = jax.jit(functools.partial(eval_loss_on_batch, model=model, mesh=mesh),
                            in_shardings=(state_sh.params, batch_sh, batch_sh), out_shardings=rep)

    def split_loss(split: str) -> float:  # Synced per batch: also bounds the CPU dispatch queue.
      return sum(float(eval_batch_fn(state.params, *eval_sets[split].global_batch(
          i, cfg_t.batch_size, T, batch_sh))) for i in range(cfg_t.eval_iters)) / cfg_t.eval_iters
  else:
    # The training split lives on the devices for the whole run; batches are cut from it in the step.
    # It is replicated on every device (2 bytes/token: 2 MB for TinyShakespeare), so each device cuts
    # its own rows locally and no host feeds anything per step, on one host or many. A corpus too
    # big to replicate streams from token shards instead (data.shards_dir, above).
    split_data = {'train': sharding_lib.put_replicated(ds.train, mesh),
                  'val': sharding_lib.put_replicated(ds.val, mesh)}
    step_args = lambda step: (split_data['train'],)
    step_jit = dict(in_shardings=(state_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)
    step_impl = train_step
    example_args = step_args(0)
    eval_fn = jax.jit(functools.partial(
        eval_step, model=model, batch_size=cfg_t.batch_size, num_batches=cfg_t.eval_iters, mesh=mesh),
        in_shardings=(state_sh.params, rep, rep), out_shardings=rep)

    def split_loss(split: str) -> float:
      return float(eval_fn(state.params, split_data[split], eval_key))

  step_fn = jax.jit(functools.partial(step_impl, **step_kw), **step_jit)
  dyn_every = cfg_t.get('dynamics_interval', 0)  # > 0: every N steps run the instrumented variant,
  if dyn_every > 0:  # compiled once up front so that no step timing includes its compilation.
    dyn_fn = jax.jit(functools.partial(step_impl, dynamics=True, **step_kw),
                     **step_jit).lower(state, *example_args).compile()
  # Small host values enter jitted code as replicated global arrays, valid on any number of hosts.
  eval_key = sharding_lib.put_replicated(
      np.asarray(jax.random.fold_in(jax.random.PRNGKey(cfg_t.seed), EVAL_KEY_SALT)), mesh)
  prompt = sharding_lib.put_replicated(np.array([data_lib.encode_text(tok, cfg_s.prompt or '\n')], np.int32), mesh)

  tokens_per_step = cfg_t.batch_size * cfg_t.grad_accum_steps * model_cfg.block_size
  flops_step = flops_per_token(model_cfg) * tokens_per_step
  peak, peak_src = peak_flops(cfg_t.peak_flops)
  if not peak_src.startswith('measured'):  # A per-device peak; a measured CPU matmul already uses
    peak *= len(devices)                   # every core, which simulated CPU devices share.
  meta = {'model': model_cfg.to_dict(), 'tokenizer': tok.to_dict(),
          'data': {k: ds.meta[k] for k in ('tokenizer', 'vocab_size', 'source_sha256', 'shards_dir')
                   if k in ds.meta},
          'config': json.loads(config.to_json_best_effort())}

  def evaluate(step: int) -> dict:
    t0 = time.perf_counter()
    losses = {split: split_loss(split) for split in ('train', 'val')}
    rec = {'step': step, 'train_loss': losses['train'], 'val_loss': losses['val'],
           'lr': float(schedule(step)), 'eval_seconds': round(time.perf_counter() - t0, 3),
           'time': round(time.time() - t_start, 3)}
    if cfg_s.eval_tokens > 0:
      key = sharding_lib.put_replicated(
          np.asarray(jax.random.fold_in(jax.random.PRNGKey(cfg_s.seed), step)), mesh)
      out = sample_lib.generate(state.params, model_cfg, prompt, cfg_s.eval_tokens, key,
                                cfg_s.temperature, cfg_s.top_k, cfg_s.window_shift, tok.vocab_size)
      rec['sample'] = tok.decode(distributed.to_host(out)[0, prompt.shape[1]:])
    return rec

  bar = tqdm(total=cfg_t.max_steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
             disable=None if main else True)
  say = bar.write if not bar.disable else say0
  summary = {'start_step': start_step}
  bounded_dispatch = jax.default_backend() == 'cpu' and len(devices) > 1
  last_loss = math.nan
  t_window, steps_in_window = time.perf_counter(), 0
  step = start_step
  try:
    while True:
      resumed_here = step == start_step > 0  # Already evaluated before the checkpoint was saved.
      evaluated = None  # This step's val loss, once evaluated.
      if (step % cfg_t.eval_interval == 0 or step == cfg_t.max_steps) and not resumed_here:
        rec = evaluate(step)
        _check_finite(rec['val_loss'], 'the validation loss', step, ckpt)
        say(f'step {step}: train loss {rec["train_loss"]:.4f}, val loss {rec["val_loss"]:.4f} '
            f'({rec["eval_seconds"]:.1f}s)')
        if 'sample' in rec:
          say('  sample: ' + rec['sample'].replace('\n', '\n          ')[:1000])
        log.write(rec)
        improved = rec['val_loss'] < best_val
        best_val = min(best_val, rec['val_loss'])
        evaluated = rec['val_loss']
        if step > start_step and (improved or cfg_c.save == 'always'):
          ckpt.save(step, state, dict(meta, best_val_loss=best_val), rec['val_loss'])
          say(f'  saved checkpoint {step} ({"best" if improved else "latest"})')
        summary.update(final_train_loss=rec['train_loss'], final_val_loss=rec['val_loss'])
        t_window, steps_in_window = time.perf_counter(), 0  # Don't count evals in step timing.
      if step >= cfg_t.max_steps:
        break
      if stop.should_stop(step, after_eval=evaluated is not None):
        break  # A signal: checkpoint this very step below.

      use_dyn = dyn_every > 0 and (step + 1) % dyn_every == 0
      state, metrics = (dyn_fn if use_dyn else step_fn)(state, *step_args(step))
      step += 1
      if bounded_dispatch and step % CPU_MAX_STEPS_IN_FLIGHT == 0:
        metrics['loss'].block_until_ready()
      steps_in_window += 1
      bar.update(1)
      if step == start_step + 1:
        metrics['loss'].block_until_ready()  # The first step includes compilation.
        say(f'compiled and ran the first step in {time.perf_counter() - t_window:.1f}s')
        t_window, steps_in_window = time.perf_counter(), 0
      elif step == start_step + 6:  # A few compiled steps tell how long the whole run will take.
        metrics['loss'].block_until_ready()
        _report_expected_time(say, (time.perf_counter() - t_window) / steps_in_window, cfg_t, step)
      if step % cfg_t.log_interval == 0 or step == cfg_t.max_steps:
        last_loss = float(metrics['loss'])  # Syncs with the device.
        _check_finite(last_loss, 'the training loss', step, ckpt)
        dt = (time.perf_counter() - t_window) / max(steps_in_window, 1)
        rec = {'step': step, 'train_loss': last_loss, 'lr': float(metrics['lr']),
               'grad_norm': float(metrics['grad_norm']), 'ms_per_step': round(1e3 * dt, 3),
               'tokens_per_s': round(tokens_per_step / dt, 1),
               'mfu': round(flops_step / dt / peak, 5), 'time': round(time.time() - t_start, 3)}
        log.write(rec)
        say(f'step {step}: loss {last_loss:.4f}, lr {rec["lr"]:.2e}, {rec["ms_per_step"]:.1f} '
            f'ms/step, {rec["tokens_per_s"]:,.0f} tok/s, MFU {100 * rec["mfu"]:.2f}% of {peak_src}')
        bar.set_postfix(loss=f'{last_loss:.3f}')
        t_window, steps_in_window = time.perf_counter(), 0
      if use_dyn:
        log.write(instruments.record(step, metrics, model_cfg, time.time() - t_start))
  except KeyboardInterrupt:  # A second Ctrl-C: at once, without a checkpoint of this step.
    ckpt.close()
    bar.close()
    latest = ckpt.latest_step()
    raise UserError(f'interrupted at step {step}. ' + (
        f'Continue from checkpoint {latest} with --config.train.resume=True.' if latest is not None
        else 'No checkpoint was written yet.')) from None
  finally:
    bar.close()
  if step < cfg_t.max_steps:  # Left on a signal: save this step (unless its eval just did), finalise.
    if step > start_step and step not in ckpt.steps():
      ckpt.save(step, state, dict(meta, best_val_loss=best_val),
                math.inf if evaluated is None else evaluated)  # Unevaluated: never the 'best'.
    ckpt.close()
    why = stop.signal_name or 'a signal to another process'
    log.write({'event': 'stopped', 'step': step, 'signal': why})
    latest = ckpt.latest_step()
    raise Stopped(f'{why}: stopped at step {step}; ' + (
        f'checkpoint {latest} is saved in {ckpt.directory}. Resume with: '
        f'{preemption.resume_command()}' if latest is not None else
        'no checkpoint was written yet: start the run again with the same command.'), step, why)
  ckpt.close()
  if ckpt.latest_step() is None:
    # "best" mode only writes when val loss improves on an earlier eval; a run that never evaluated
    # twice would otherwise end with nothing to sample from.
    ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), cfg_c)
    ckpt.save(step, state, dict(meta, best_val_loss=best_val), summary.get('final_val_loss', math.inf))
    ckpt.close()
  summary.update(final_step=step, best_val_loss=best_val, wall_seconds=round(time.time() - t_start, 2),
                 out_dir=out_dir)
  say0(f'done: step {step}, best val loss {best_val:.4f}, {summary["wall_seconds"]:.1f}s; '
       f'checkpoints in {ckpt.directory}')
  return summary


def _report_expected_time(say: Callable[[str], None], dt: float, cfg_t: ml_collections.ConfigDict,
                          step: int) -> None:
  remaining = (cfg_t.max_steps - step) * dt
  say(f'{1e3 * dt:.0f} ms/step: expect about {_human(remaining)} for the remaining '
      f'{cfg_t.max_steps - step} steps (plus evals)')
  if jax.default_backend() == 'cpu' and remaining > 3600:
    say(f'note: this preset would take about {_human(remaining)} on this CPU; it is sized for a GPU. '
        'For a CPU run use --config configs/shakespeare.py:cpu')


def _human(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.0f}s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.1f} h'


def _validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a typo-free config can still get wrong, with one message listing them all."""
  t, c = config.train, config.checkpoint
  problems = []
  for name in ('batch_size', 'max_steps', 'eval_interval', 'eval_iters', 'log_interval',
               'grad_accum_steps'):
    if int(t[name]) < 1:
      problems.append(f'train.{name} must be >= 1 (got {t[name]})')
  if t.learning_rate <= 0:
    problems.append(f'train.learning_rate must be > 0 (got {t.learning_rate})')
  if t.get('optimizer', 'optax') not in optim.OPTIMIZERS:
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
  if config.data.get('shards_dir') and int(t.seed) < 0:
    problems.append(f'train.seed must be >= 0 with data.shards_dir (got {t.seed})')
  if c.save not in ('best', 'always'):
    problems.append(f"checkpoint.save must be 'best' or 'always' (got {c.save!r})")
  if problems:
    raise UserError('invalid config: ' + '; '.join(problems))
