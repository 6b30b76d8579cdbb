"""Every check of a run's settings, in one place, run before any work starts.

`validate(config)` goes through every section of a run config and raises one UserError listing every
problem it finds (a user fixes them all in one go). Each `check_*` returns a list of problems, so the
scripts reuse them for their own flags (scripts/sample.py: `check_sampling`). NaN and infinities
are problems wherever a float is read. `check_fits` runs once the data is loaded, before anything
compiles: block_size against the splits, and the step's memory against what the machine has.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import ml_collections

from gpt_jax import optim, optim_variants
from gpt_jax.config import ABLATIONS, ModelConfig
from gpt_jax.errors import UserError

TOKENIZERS = ('char', 'gpt2', 'bpe')
CHECKPOINT_SAVES = ('best', 'always')


def _number(value: Any) -> bool:
  """A finite real number (bools are not numbers here)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(name: str, value: Any, low: float, why: str = '') -> list[str]:
  """[problem] unless value is a finite number >= low."""
  if _number(value) and value >= low:
    return []
  return [f'{name} must be >= {low:g}{why} (got {value})']


def above(name: str, value: Any, low: float, why: str = '') -> list[str]:
  """[problem] unless value is a finite number > low."""
  if _number(value) and value > low:
    return []
  return [f'{name} must be > {low:g}{why} (got {value})']


def fraction(name: str, value: Any, why: str = '') -> list[str]:
  """[problem] unless 0 <= value < 1."""
  if _number(value) and 0.0 <= value < 1.0:
    return []
  return [f'{name} must be in [0, 1){why} (got {value})']


def one_of(name: str, value: Any, choices: tuple) -> list[str]:
  return [] if value in choices else [f'{name} must be one of {choices} (got {value!r})']


def raise_problems(problems: list[str], what: str = 'invalid config') -> None:
  """One UserError naming every problem, or nothing."""
  if problems:
    raise UserError(f'{what}: ' + '; '.join(problems))


ATTENTION_BACKENDS = ('manual', 'xla', 'cudnn', 'flash', 'auto')  # See attention.attention_implementation.
DTYPES = ('float32', 'bfloat16', 'float16')
POSITIONS = ('learned', 'rotary')
ACTIVATIONS = ('gelu', 'relu2')


def model_config_problems(m: ModelConfig) -> list[str]:
  """The problems of one ModelConfig (run by its __post_init__, so no invalid one is ever built)."""
  problems = []
  for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
    if int(getattr(m, name)) < 1:
      problems.append(f'model.{name} must be >= 1 (got {getattr(m, name)})')
  if m.n_head >= 1 and m.n_embd % m.n_head:
    problems.append(f'model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})')
  if not 0.0 <= m.dropout < 1.0:
    problems.append(f'model.dropout must be in [0, 1) (got {m.dropout})')
  if m.attention not in ATTENTION_BACKENDS:
    problems.append(f'model.attention must be one of {ATTENTION_BACKENDS} (got {m.attention!r})')
  if m.dtype not in DTYPES:
    problems.append(f'model.dtype must be one of {DTYPES} (got {m.dtype!r})')
  unknown = sorted(m.ablated - set(ABLATIONS))
  if unknown:
    problems.append(f'model.ablate: unknown piece(s) {unknown}; it takes a comma-separated subset of '
                    f'{ABLATIONS}, e.g. \'attention,mlp\' (\'\' = the whole model)')
  if m.position not in POSITIONS:
    problems.append(f'model.position must be one of {POSITIONS} (got {m.position!r})')
  elif m.position == 'rotary' and m.n_head >= 1 and m.head_size % 2:
    problems.append(f'model.position=\'rotary\' rotates pairs of head dimensions, so the head size '
                    f'n_embd // n_head must be even (got {m.head_size})')
  if not m.rope_base > 0:
    problems.append(f'model.rope_base must be > 0 (got {m.rope_base})')
  if m.activation not in ACTIVATIONS:
    problems.append(f'model.activation must be one of {ACTIVATIONS} (got {m.activation!r})')
  return problems


def check_model(m: Mapping[str, Any]) -> list[str]:
  """ModelConfig's own checks (vocab_size 0 = from the data), collected instead of raised."""
  fields = dict(m)
  problems = at_least('model.vocab_size', fields.get('vocab_size', 0), 0, ', 0 = from the data')
  problems += [f'model.{k} must be a finite number (got {v})' for k, v in fields.items()
               if isinstance(v, float) and not math.isfinite(v)]
  if not fields.get('vocab_size'):
    fields['vocab_size'] = 1  # Known only once the data is loaded; checked then.
  try:
    ModelConfig.from_dict(fields)
  except UserError as e:
    problems.append(str(e).removeprefix('invalid model config: '))
  return problems


def check_data(d: ml_collections.ConfigDict) -> list[str]:
  problems = one_of('data.tokenizer', d.tokenizer, TOKENIZERS)
  if not (_number(d.val_fraction) and 0.0 < d.val_fraction < 1.0):
    problems.append(f'data.val_fraction must be between 0 and 1 (got {d.val_fraction})')
  problems += at_least('data.bpe_vocab_size', d.bpe_vocab_size, 0)
  problems += at_least('data.shard_tokens', d.shard_tokens, 1)
  return problems


def optimizer_problems(t: ml_collections.ConfigDict) -> list[str]:
  try:
    optim.optimizer_name(t.optimizer)  # Today's names and the old ones ('optax', 'scratch').
  except UserError as e:
    return [str(e)]
  return []


def check_train(t: ml_collections.ConfigDict, shards: bool) -> list[str]:
  problems = []
  for name in ('batch_size', 'max_steps', 'eval_interval', 'eval_iters', 'log_interval',
               'grad_accum_steps'):
    problems += at_least(f'train.{name}', t[name], 1)
  problems += at_least('train.target_val_loss', t.target_val_loss, 0, ', 0 = none')
  problems += above('train.learning_rate', t.learning_rate, 0)
  problems += optimizer_problems(t)
  if t.optimizer == 'muon':
    problems += above('train.muon_learning_rate', t.muon_learning_rate, 0)
    problems += at_least('train.muon_ns_steps', t.muon_ns_steps, 1)
    problems += fraction('train.muon_momentum', t.muon_momentum)
    problems += at_least('train.muon_weight_decay', t.muon_weight_decay, 0)
  problems += fraction('train.ema_decay', t.ema_decay, ', 0 = off')
  problems += one_of('train.lr_schedule', t.lr_schedule, optim.LR_SCHEDULES)
  if t.lr_schedule == 'wsd':
    try:
      optim_variants.wsd_boundaries(t)
    except UserError as e:
      problems.append(str(e))
  problems += at_least('train.min_learning_rate', t.min_learning_rate, 0)
  if _number(t.learning_rate) and t.learning_rate > 0 and _number(t.min_learning_rate) and \
     t.min_learning_rate > t.learning_rate:
    problems.append(f'train.min_learning_rate ({t.min_learning_rate}) must be <= train.learning_rate '
                    f'({t.learning_rate}): the schedule decays to it')
  problems += at_least('train.warmup_steps', t.warmup_steps, 0)
  problems += at_least('train.lr_decay_steps', t.lr_decay_steps, 0)
  problems += fraction('train.beta1', t.beta1) + fraction('train.beta2', t.beta2)
  problems += at_least('train.weight_decay', t.weight_decay, 0)
  problems += at_least('train.grad_clip', t.grad_clip, 0, ', 0 = no clipping')
  problems += at_least('train.peak_flops', t.peak_flops, 0, ', 0 = look it up')
  problems += at_least('train.layer_stats_interval', t.layer_stats_interval, 0, ', 0 = off')
  problems += steps_per_call_problems(t)
  if t.val_full_pass and shards:
    problems.append('train.val_full_pass scores the in-memory val split; with data.shards_dir set '
                    'it is not loaded: set --config.train.val_full_pass=False')
  if shards and int(t.seed) < 0:
    problems.append(f'train.seed must be >= 0 with data.shards_dir (got {t.seed})')
  return problems + check_cache_dir(t.compilation_cache_dir)


def check_cache_dir(directory: Any) -> list[str]:
  """train.compilation_cache_dir: a string; a folder JAX can create or write to (checked, not made)."""
  name = 'train.compilation_cache_dir'
  if not isinstance(directory, str):
    return [f"{name} must be a folder's path, or '' for none (got {directory!r})"]
  path = os.path.abspath(os.path.expanduser(directory)) if directory else ''
  while path and not os.path.exists(path):  # The nearest part that exists must be a writable folder.
    path = os.path.dirname(path)
  if path and not (os.path.isdir(path) and os.access(path, os.W_OK)):
    return [f'{name} {directory!r}: {path} is not a folder this user can write to; pick another '
            "folder, or '' for no cache"]
  return []


def steps_per_call_problems(t: ml_collections.ConfigDict) -> list[str]:
  """train.steps_per_call = k runs k steps per jitted call, so the loop only stops at multiples of k:
  evals, log lines and layer statistics must fall on them (max_steps need not: a shorter call ends it)."""
  k = t.steps_per_call
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    return [f'train.steps_per_call must be an integer >= 1 (got {k!r})']
  off = [name for name in ('eval_interval', 'log_interval', 'layer_stats_interval')  # The last if on.
         if isinstance(t[name], int) and t[name] >= 1 and t[name] % k]
  if not off:
    return []
  return [f'train.steps_per_call={k} runs {k} steps per jitted call and the loop logs, evaluates and '
          f'saves only between calls, so ' + ', '.join(f'train.{n} ({t[n]})' for n in off)
          + f' must be multiples of {k} (e.g. ' + ', '.join(str(max(k, t[n] // k * k)) for n in off)
          + '), or lower train.steps_per_call']


def check_sampling(s: Mapping[str, Any], prefix: str = 'sample.') -> list[str]:
  """The sampling settings present in `s` (a config's sample section, or scripts/sample.py's flags)."""
  lows = {'num_samples': 1, 'max_new_tokens': 1, 'top_k': 0, 'temperature': 0, 'eval_tokens': 0,
          'window_shift': 0}
  problems = []
  for name, low in lows.items():
    if name in s and s[name] is not None:
      problems += at_least(prefix + name, s[name], low)
  return problems


def check_mesh(m: ml_collections.ConfigDict) -> list[str]:
  """The sizes alone; whether they fit the devices is checked when the mesh is built."""
  sizes = {a: m[a] for a in ('data', 'fsdp') if a in m}
  problems = [f'mesh.{a} must be >= 1, or -1 for "all remaining devices" (got {s})'
              for a, s in sizes.items() if s == 0 or s < -1]
  if list(sizes.values()).count(-1) > 1:
    problems.append('only one of mesh.data / mesh.fsdp may be -1 (all remaining devices)')
  return problems


def check_checkpoint(c: ml_collections.ConfigDict) -> list[str]:
  problems = [] if c.save in CHECKPOINT_SAVES else [
      f"checkpoint.save must be 'best' or 'always' (got {c.save!r})"]
  return problems + at_least('checkpoint.keep_last', c.keep_last, 1)


def problems_of(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of a run config, section by section."""
  return (check_model(config.model.to_dict()) + check_data(config.data)
          + check_train(config.train, bool(config.data.shards_dir)) + check_mesh(config.mesh)
          + check_checkpoint(config.checkpoint) + check_sampling(config.sample))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one UserError listing every problem of the run config; returns if there is none."""
  raise_problems(problems_of(config))


def step_memory_bytes(m: ModelConfig, batch_size: int) -> int:
  """A lower bound on one training step's memory: weights, gradients and two Adam moments (float32),
  the activations the backward pass keeps (at least 16 floats per position and channel in each
  block) and, where attention is written out, its B x H x T x T probabilities in each block."""
  from gpt_jax.config import num_params
  B, T, C, H = batch_size, m.block_size, m.n_embd, m.n_head
  layers = 1 if m.remat else m.n_layer  # Recomputed blocks keep one block's activations at a time.
  state = 4 * 4 * num_params(m)
  activations = 4 * 16 * B * T * C * layers
  attention = 0 if m.attention in ('cudnn', 'flash', 'auto') else 4 * B * H * T * T * layers
  return state + activations + attention


def available_memory() -> tuple[int, str]:
  """(bytes, what) the step can use: the devices' memory where JAX reports it, else the host's."""
  import jax  # Lazily: the rest of this module runs before JAX may be touched.
  devices = jax.local_devices()
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']) * len(devices), f'{len(devices)} x {devices[0].device_kind}'
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'the host memory'


def check_fits(model_cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
               splits: Mapping[str, int]) -> None:
  """Before compiling: every split holds a window of block_size + 1 tokens, and the step's memory
  (a lower bound) fits the machine. One UserError naming what to lower, else nothing."""
  T = model_cfg.block_size
  problems = [f'the {name} split has only {n:,} tokens in a row, fewer than model.block_size + 1 = '
              f'{T + 1:,}' for name, n in splits.items() if n < T + 1]
  need = step_memory_bytes(model_cfg, int(train_cfg.batch_size))
  have, what = available_memory()
  if need > have:
    problems.append(f'a training step needs at least {need / 2**30:,.1f} GiB (B={train_cfg.batch_size}, '
                    f'T={T}, {model_cfg.n_layer} layers x {model_cfg.n_embd} wide, '
                    f'{model_cfg.n_head} heads), more than {what} ({have / 2**30:,.1f} GiB)')
  if problems:
    raise UserError('; '.join(problems) + '. Lower model.block_size, train.batch_size or the model '
                    'size (for the memory: model.remat=True or train.grad_accum_steps with a '
                    'smaller batch_size help too).')
