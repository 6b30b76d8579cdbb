"""A run's setup: the devices and mesh, the data, the model config, and the state to start from.

  setup             devices and mesh, the data (one `BatchSource` for either format), the model.
  abstract_state    the state's shapes and static fields, before it exists (the train step compiles
                    from them while the state is made: startup.py).
  restore_or_init   the newest checkpoint of a resumed run (its shardings, any mesh), else a fresh
                    state born sharded, optionally with GPT-2 weights (`init_from`).
  checkpoint_meta   what every checkpoint of the run records besides its arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import jax
import ml_collections

from gpt_jax import attention as attention_lib, checkpoint as checkpoint_lib, checkpoint_damage, config_checks
from gpt_jax.config import ModelConfig, model_config_from, num_params
from gpt_jax.data import batches as batches_lib, shards as shards_lib, text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.parallel import distributed, mesh as mesh_lib
from gpt_jax.training.step import TrainState, init_train_state

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
  # Before anything compiles. Token shards check their windows themselves, with advice on shard sizes.
  config_checks.check_fits(model_cfg, t, {} if shards_dir else {'train': len(ds.train), 'val': len(ds.val)})
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
      f'{attention_lib.describe_attention(model_cfg)}')
  return Setup(mesh, source, ds, model_cfg, say)


def abstract_state(config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint_lib.Checkpointer,
                   ) -> TrainState:
  """The run's state as shapes and dtypes (jax.ShapeDtypeStructs) with its static fields (optimizer,
  apply_fn), computed from nothing; `restore_or_init` makes the state in this very tree.

  First refuses a fresh run in a directory that already holds checkpoints, and a resume without one.
  """
  latest = ckpt.latest_step()
  if not config.train.resume and latest is not None:
    raise UserError(f'{ckpt.directory} already holds checkpoints (latest step {latest}). Resume it '
                    'with --config.train.resume=True, or pick another --config.out_dir (nothing '
                    'was overwritten).')
  if config.train.resume and latest is None:
    raise UserError(f'train.resume is set but there is no checkpoint in {ckpt.directory}; '
                    'run without --config.train.resume=True to start a new run.')
  return jax.eval_shape(lambda: init_train_state(s.model_cfg, config.train))


def restore_or_init(config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint_lib.Checkpointer,
                    abstract: TrainState) -> tuple[TrainState, float, dict]:
  """(state, best val loss so far, checkpoint metadata): the newest checkpoint if train.resume (with
  its metadata), else a fresh state (and {}), in the tree of `abstract` (from `abstract_state`).

  A resumed run checks that the checkpoint is of this model and vocabulary before reading a byte of
  its arrays; it never materialises a fresh state it would drop.
  """
  t, tok = config.train, s.dataset.tokenizer
  shardings = mesh_lib.state_shardings(abstract, s.mesh)
  # The same static fields as `abstract` (one optimizer object, not an equal one built twice), so
  # that the state matches the shardings and the train step compiled from the abstract state.
  in_tree = functools.partial(jax.tree_util.tree_unflatten, jax.tree_util.tree_structure(abstract))
  if not t.resume:
    state = init_train_state(s.model_cfg, t, s.mesh)  # Born sharded.
    if config.init_from:
      # Fine-tuning: start from local GPT-2 weights instead of the random init (Adam moments stay 0).
      from gpt_jax import hf  # Lazily: only fine-tuning reads Hugging Face files.
      params = hf.init_params_from(config.init_from, s.model_cfg)
      state = state.replace(params=mesh_lib.put_global(params, shardings.params))
      s.say(f'initialised the parameters from {config.init_from}')
    return in_tree(jax.tree_util.tree_leaves(state)), math.inf, {}

  def check_meta(step: int, meta: dict) -> None:
    if meta.get('inference_only'):
      raise UserError(f'checkpoint {step} in {ckpt.directory} holds parameters only (e.g. converted '
                      'GPT-2 weights) and cannot be resumed; fine-tune from it with a fresh '
                      '--config.out_dir instead.')
    checkpoint_damage.check_model_matches(meta, s.model_cfg, ckpt.directory)
    if meta.get('tokenizer') != tok.to_dict():
      raise UserError(f'the checkpoint in {ckpt.directory} was trained with another vocabulary than '
                      f'the data in {s.dataset.directory}; point data.* at the original data.')

  # Target shardings in the abstract state: Orbax reads each device's slice straight into place,
  # whatever the mesh (or number of devices/hosts) the checkpoint was written with. A damaged
  # newest checkpoint is refused, naming the newest good one (train.resume_from_last_good).
  latest, state, meta = checkpoint_damage.resume_newest_good(
      ckpt, mesh_lib.abstract_with_shardings(abstract, shardings), check_meta, t.resume_from_last_good)
  if 'best_val_loss' in meta:  # The run's best so far, including evals that saved nothing.
    best_val = meta['best_val_loss']
  else:  # Written before checkpoints recorded it.
    best_step = ckpt.best_step()
    best_val = ckpt.meta(best_step)['val_loss'] if best_step is not None else math.inf
  s.say(f'resumed from step {latest} in {ckpt.directory} (best val loss so far {best_val:.4f})')
  return in_tree(jax.tree_util.tree_leaves(state)), best_val, meta


def checkpoint_meta(config: ml_collections.ConfigDict, s: Setup) -> dict:
  """The metadata every checkpoint of the run holds: the model, the vocabulary, where the data came
  from and the whole run config (so that sampling and evaluation need nothing else)."""
  return {'model': s.model_cfg.to_dict(), 'tokenizer': s.dataset.tokenizer.to_dict(),
          'data': {k: s.dataset.meta[k] for k in ('tokenizer', 'vocab_size', 'source_sha256',
                                                  'shards_dir') if k in s.dataset.meta},
          'config': json.loads(config.to_json_best_effort())}
