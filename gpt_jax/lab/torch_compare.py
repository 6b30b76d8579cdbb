"""JAX vs PyTorch training dynamics, side by side.

`run_comparison` trains the Flax GPT (gpt_jax.model + gpt_jax.optim, the production loss and optimizer)
and the PyTorch reference (gpt_jax.torch_ref) from identical float32 weights on identical batches with
identical learning rates, and records per step and per side: loss, learning rate, global and per-layer
gradient norm (before clipping), parameter norm and update-to-parameter ratio ||dtheta|| / ||theta||;
at evals the validation loss on the same eval batches. It writes

  dynamics.jsonl   one object per step per side (kind 'train'), per eval per side (kind 'eval'), per
                   eval the distance between the two sides' parameters (side 'both'), and per step
                   the loss of each rounding reference below (kind 'reference')
  summary.json     max |loss difference|, first step over the tolerance, tokens/s of each side, ...
  dynamics.png     the curves overlaid, plus the differences on a log scale

With dropout 0 two more runs say how much of the difference is plain float32 rounding: JAX again
from weights one ulp away (`float32_sensitivity`: how far rounding-level perturbations carry in this
very run), and PyTorch in float64 on the same weights and batches (`float64_reference`: how far
each float32 side is from exact arithmetic).

With dropout > 0 the two sides draw different masks by nature, so each side is run with several
dropout seeds (same init, same batches) and the verdict says whether each side's mean curve lies
within the other's seed spread.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt_jax import config as config_lib, optim
from gpt_jax.data import batches as batches_lib, text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.lab import torch_ref
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

LOSS_TOL = 1e-4  # |loss_jax - loss_torch| above this counts as "the runs have come apart".
SIDES = ('jax', 'torch')


# ---------------------------------------------------------------------------------------------------
# The JAX side: train.train_step plus the gradients and updates it would otherwise throw away.

def _group_norms(tree: Any) -> dict[str, jax.Array]:
  """Per-layer norm: one entry per top-level parameter (wte, wpe, h_0, ..., ln_f)."""
  return {k: optax.tree.norm(v) for k, v in tree.items()}


def jax_step(state: step_lib.TrainState, train_data: jax.Array, dropout_stream: jax.Array, *,
             model: GPT, batch_size: int, grad_accum_steps: int,
             schedule: Callable[[Any], Any]) -> tuple[step_lib.TrainState, dict, jax.Array, jax.Array]:
  """training.step.train_step (same batch keys, same loss_fn, same optimizer), also returning metrics computed
  from the gradients and the update, and the batch itself so the PyTorch side can train on it.

  Dropout keys come from `dropout_stream` (pass `state.key` for exactly train_step's masks); the batch
  keys always come from `state.key`, so runs with different dropout streams see the same batches.
  """
  batch_key, _ = jax.random.split(jax.random.fold_in(state.key, state.step))
  _, dropout_key = jax.random.split(jax.random.fold_in(dropout_stream, state.step))
  x, y = batches_lib.get_batch(train_data, batch_key, batch_size * grad_accum_steps,
                               model.config.block_size)
  loss, grads = step_lib.gradients(state.params, x, y, dropout_key, model=model,
                                   batch_size=batch_size, grad_accum_steps=grad_accum_steps)
  new_state = state.apply_gradients(grads=grads)
  # The update actually applied (new - old), measured the same way as on the PyTorch side.
  delta = jax.tree_util.tree_map(jnp.subtract, new_state.params, state.params)
  old_norms, delta_norms = _group_norms(state.params), _group_norms(delta)
  metrics = {
      'loss': loss, 'lr': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(new_state.params),
      'update_ratio': optax.tree.norm(delta) / optax.tree.norm(state.params),
      'grad_norm_layers': _group_norms(grads),
      'update_ratio_layers': {k: delta_norms[k] / old_norms[k] for k in old_norms},
  }
  return new_state, metrics, x, y


# ---------------------------------------------------------------------------------------------------
# Running both sides.

@dataclasses.dataclass
class Run:
  """Everything one side recorded for one seed."""
  side: str
  seed: int
  train: list[dict] = dataclasses.field(default_factory=list)  # One metrics dict per step.
  val: dict[int, float] = dataclasses.field(default_factory=dict)  # Eval step -> val loss.
  seconds: float = 0.0      # Time in timed steps (the first step of a run, compile/warm-up, excluded).
  timed_steps: int = 0


def _to_py(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda a: float(a), jax.device_get(tree))


def _rel_param_diff(a: Any, b: Any) -> float:
  """||a - b|| / ||a|| over whole parameter trees (float64 on the host)."""
  la = [np.asarray(t, np.float64) for t in jax.tree_util.tree_leaves(a)]
  lb = [np.asarray(t, np.float64) for t in jax.tree_util.tree_leaves(b)]
  num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb)))
  return num / math.sqrt(sum(float(np.sum(x ** 2)) for x in la))


def nudge_one_ulp(params: Any, seed: int = 0) -> Any:
  """The float32 parameters with every element moved by one ulp, up or down at random."""
  rng = np.random.default_rng(seed)

  def nudge(p):
    a = np.asarray(p, np.float32)
    return np.nextafter(a, np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(np.float32))
  return jax.tree_util.tree_map(nudge, params)


def run_comparison(config: ml_collections.ConfigDict, steps: int, out_dir: str, seeds: int = 3,
                   eval_interval: int = 0, print_fn: Callable[[str], None] = print,
                   check_init: bool = True, float64_reference: bool = True) -> dict:
  """Trains both sides for `steps` updates; writes dynamics.jsonl, summary.json, dynamics.png.

  `seeds` only matters with dropout > 0 (without dropout every seed would give the same run).
  `eval_interval` 0 means config.train.eval_interval. `check_init` also compares logits and
  gradients at initialisation on the first batch (torch_ref.compare_at_init). `float64_reference`
  (dropout 0 only) also trains PyTorch in float64 on the same batches. Returns the summary.
  """
  t_start = time.time()
  torch = torch_ref.require_torch()
  cfg_t = config.train
  steps = int(steps) if steps else int(cfg_t.max_steps)
  eval_interval = int(eval_interval) if eval_interval else int(cfg_t.eval_interval)
  if steps < 1 or eval_interval < 1 or seeds < 1:  # 0 from the config (train.max_steps, eval_interval).
    raise UserError(f'steps, eval_interval and seeds must be >= 1 (got {steps}, {eval_interval}, {seeds}); '
                    'set --steps, --eval_interval and --seeds (or config.train.max_steps and '
                    'config.train.eval_interval) to at least 1.')
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot make the output folder --out_dir {out_dir} ({e.strerror}); pick another '
                    'folder.') from None

  ds = text_lib.load(config.data, verbose=False)
  model_cfg = config_lib.model_config_from(config, ds.tokenizer.vocab_size)
  if model_cfg.dtype != 'float32':
    print_fn(f'note: comparing in float32 (the config says model.dtype={model_cfg.dtype!r})')
    model_cfg = dataclasses.replace(model_cfg, dtype='float32')
  n_seeds = seeds if model_cfg.dropout > 0 else 1
  model = GPT(model_cfg)
  B, T, accum = int(cfg_t.batch_size), model_cfg.block_size, int(cfg_t.grad_accum_steps)
  tokens_per_step = B * accum * T
  eval_steps = sorted({0, steps} | set(range(0, steps + 1, eval_interval)))
  print_fn(f'JAX {jax.__version__} vs PyTorch {torch.__version__} ({torch.get_num_threads()} threads), '
           f'float32: {model_cfg.n_layer} layers, {model_cfg.n_embd} wide, block {T}, batch '
           f'{B}x{accum}, dropout {model_cfg.dropout}; {steps} steps x {n_seeds} seed(s) per side')

  train_data, val_data = batches_lib.to_device(ds.train), batches_lib.to_device(ds.val)
  state0 = step_lib.init_train_state(model_cfg, cfg_t)
  params0 = jax.device_get(state0.params)
  schedule = optim.lr_schedule(cfg_t)
  step_fn = jax.jit(functools.partial(jax_step, model=model, batch_size=B, grad_accum_steps=accum,
                                      schedule=schedule))  # No donation: state0 is reused per seed.
  eval_one = jax.jit(functools.partial(step_lib.eval_step, model=model, batch_size=B))
  eval_key = jax.random.fold_in(jax.random.PRNGKey(cfg_t.seed), batches_lib.EVAL_KEY_SALT)
  eval_keys = [jax.random.fold_in(eval_key, i) for i in range(cfg_t.eval_iters)]

  def eval_fn(params: Any, data: jax.Array) -> float:  # As the training loop's Evaluator.
    total = np.float32(0)
    for k in eval_keys:
      total += np.float32(eval_one(params, data, k))
    return float(total / np.float32(len(eval_keys)))

  # The very batches eval_step draws (same keys), for the PyTorch side.
  eval_x, eval_y = jax.device_get(jax.jit(lambda d: jax.vmap(
      lambda i: batches_lib.get_batch(d, jax.random.fold_in(eval_key, i), B, T))(
          jnp.arange(cfg_t.eval_iters)))(val_data))

  # --- JAX side. Batches and learning rates of every step are kept for the PyTorch side.
  runs: dict[str, list[Run]] = {'jax': [], 'torch': []}
  batches: list[tuple[np.ndarray, np.ndarray]] = []
  lrs: list[float] = []
  jax_params_at: dict[int, Any] = {}  # Seed 0's parameters at each eval, to measure the drift.
  for j in range(n_seeds):
    run = Run('jax', j)
    state = state0
    # Seed 0 draws exactly train_step's dropout masks; seed j those a run with train.seed + j would.
    stream = state0.key if j == 0 else jax.random.PRNGKey(cfg_t.seed + j)
    for s in range(steps + 1):
      if s in eval_steps:
        run.val[s] = eval_fn(state.params, val_data)
        if j == 0:
          jax_params_at[s] = jax.device_get(state.params)
      if s == steps:
        break
      t0 = time.perf_counter()
      state, metrics, x, y = step_fn(state, train_data, stream)
      jax.block_until_ready((state, metrics))
      if s > 0:
        run.seconds += time.perf_counter() - t0
        run.timed_steps += 1
      run.train.append(_to_py(metrics))
      x, y = np.asarray(x), np.asarray(y)
      if j == 0:
        batches.append((x, y))
        lrs.append(run.train[-1]['lr'])
      elif not (np.array_equal(x, batches[s][0]) and np.array_equal(y, batches[s][1])):
        raise AssertionError(f'seed {j} drew another batch at step {s}')  # Would be a bug here.
    runs['jax'].append(run)
    print_fn(f'jax  seed {j}: final loss {run.train[-1]["loss"]:.4f}, val {run.val[steps]:.4f} '
             f'({_tokens_per_s(run, tokens_per_step):,.0f} tok/s)')

  # The float32 sensitivity of this very run: JAX again, from weights one ulp away from the same
  # initial weights (same batches, same masks). Rounding-level differences in the weights alone then
  # move the loss by this much; the steps where it peaks are where any two float32 implementations
  # drift apart most. (With dropout, the seed spread plays this part.)
  nudged_losses = None
  if n_seeds == 1:
    state = state0.replace(params=jax.tree_util.tree_map(jnp.asarray, nudge_one_ulp(params0, cfg_t.seed)))
    nudged_losses = []
    for _ in range(steps):
      state, metrics, _, _ = step_fn(state, train_data, state0.key)
      nudged_losses.append(float(metrics['loss']))

  init = {'logits_max_abs_diff': None, 'grad_max_rel_diff': None}
  if check_init:
    init = torch_ref.compare_at_init(params0, model_cfg, *batches[0])
    print_fn(f'at init: max |logits diff| {init["logits_max_abs_diff"]:.2e}, max relative gradient '
             f'diff {init["grad_max_rel_diff"]:.2e}')

  # --- PyTorch side, from the same initial weights, on the same batches, with the same lrs.
  drift: dict[int, float] = {}
  for j in range(n_seeds):
    run = Run('torch', j)
    trainer = torch_ref.TorchTrainer(model_cfg, cfg_t, params0, seed=cfg_t.seed + j)
    for s in range(steps + 1):
      if s in eval_steps:
        run.val[s] = trainer.eval_loss(eval_x, eval_y)
        if j == 0:
          drift[s] = _rel_param_diff(jax_params_at[s], trainer.params())
      if s == steps:
        break
      metrics, seconds = trainer.step(*batches[s], lrs[s])
      if s > 0:
        run.seconds += seconds
        run.timed_steps += 1
      run.train.append(metrics)
    runs['torch'].append(run)
    print_fn(f'torch seed {j}: final loss {run.train[-1]["loss"]:.4f}, val {run.val[steps]:.4f} '
             f'({_tokens_per_s(run, tokens_per_step):,.0f} tok/s)')

  # The float64 reference: PyTorch in double precision from the same float32 weights, on the same
  # batches with the same learning rates. Each float32 side's distance to it is its own rounding.
  f64_losses = None
  if float64_reference and n_seeds == 1:
    trainer = torch_ref.TorchTrainer(model_cfg, cfg_t, params0, seed=cfg_t.seed, float64=True)
    f64_losses = [trainer.step(*batches[s], lrs[s])[0]['loss'] for s in range(steps)]

  summary = summarize(runs, drift, steps, tokens_per_step, nudged_losses, f64_losses)
  summary.update(
      init=init, init_logits_max_abs_diff=init['logits_max_abs_diff'],
      init_grad_max_rel_diff=init['grad_max_rel_diff'],
      seeds=n_seeds, eval_steps=eval_steps, model=model_cfg.to_dict(),
      train={k: cfg_t[k] for k in ('batch_size', 'grad_accum_steps', 'learning_rate',
                                   'min_learning_rate', 'warmup_steps', 'lr_decay_steps', 'beta1',
                                   'beta2', 'weight_decay', 'grad_clip', 'seed', 'eval_iters')}
      | {'optimizer': cfg_t.optimizer},
      versions={'jax': jax.__version__, 'torch': torch.__version__, 'optax': optax.__version__},
      torch_threads=torch.get_num_threads(), wall_seconds=round(time.time() - t_start, 2),
      out_dir=os.path.abspath(out_dir))
  write_jsonl(os.path.join(out_dir, 'dynamics.jsonl'), runs, drift,
              {'jax_1ulp': nudged_losses, 'torch_float64': f64_losses})
  with open(os.path.join(out_dir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  plot(runs, drift, summary, os.path.join(out_dir, 'dynamics.png'), nudged_losses, f64_losses)
  print_fn(format_table(runs, eval_steps, steps))
  print_fn(format_summary(summary))
  return summary


def _tokens_per_s(run: Run, tokens_per_step: int) -> float:
  if run.timed_steps == 0:
    return math.nan
  return tokens_per_step * run.timed_steps / run.seconds


# ---------------------------------------------------------------------------------------------------
# Analysis (pure numpy; works on what run_comparison recorded).

def _curve(runs: list[Run], key: str) -> np.ndarray:
  """(seeds, steps) array of one scalar metric."""
  return np.array([[m[key] for m in r.train] for r in runs], np.float64)


def _first_over(diff: np.ndarray, tol: float) -> Optional[int]:
  over = np.nonzero(diff > tol)[0]
  return int(over[0]) + 1 if over.size else None  # Steps are numbered from 1 (after update 1).


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
  with np.errstate(divide='ignore', invalid='ignore'):
    rel = np.abs(a - b) / np.abs(a)
  rel = rel[np.isfinite(rel)]  # e.g. update ratio 0 / 0 at the zero-lr first step.
  return float(rel.max()) if rel.size else 0.0


def _null_band_rate(k: int, samples: int = 200_000) -> float:
  """P(mean of k draws lies within [min, max] of k other draws from the same distribution)."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(samples, k)), rng.normal(size=(samples, k))
  m = b.mean(1)
  return float(np.mean((m >= a.min(1)) & (m <= a.max(1))))


def seed_spread_verdict(jax_losses: np.ndarray, torch_losses: np.ndarray) -> dict:
  """Do the two sides' mean curves lie within each other's seed spread? Inputs: (seeds, steps).

  Two numbers, both calibrated against what two sets of runs of the *same* implementation would
  give (dropout noise only):
    * band fractions: on how many steps each side's mean lies in the other's [min, max] over seeds,
      next to the rate expected for identically distributed runs (with 3 seeds about 0.6, not 1.0);
    * noise ratio: mean |mean_jax - mean_torch| over steps divided by the value expected from the
      pooled seed-to-seed spread alone (about 1 for the same distribution, >> 1 for a real bias).
  The verdict is True when both band fractions reach 3/4 of the expected rate and the noise ratio is
  at most 1.5.
  """
  k = jax_losses.shape[0]
  mj, mt = jax_losses.mean(0), torch_losses.mean(0)
  torch_in_jax = float(np.mean((mt >= jax_losses.min(0)) & (mt <= jax_losses.max(0))))
  jax_in_torch = float(np.mean((mj >= torch_losses.min(0)) & (mj <= torch_losses.max(0))))
  expected = _null_band_rate(k)
  # Pooled per-seed std (ddof 1) over all steps and both sides, then the expected mean |difference
  # of two k-run means| for normal noise: sigma * sqrt(2 / k) * sqrt(2 / pi).
  sigma = math.sqrt(float(np.mean((jax_losses.var(0, ddof=1) + torch_losses.var(0, ddof=1)) / 2)))
  expected_diff = sigma * math.sqrt(2 / k) * math.sqrt(2 / math.pi)
  mean_diff = float(np.mean(np.abs(mj - mt)))
  if expected_diff > 0:
    ratio = mean_diff / expected_diff
  else:  # No seed spread at all: only an exact match is 'within'.
    ratio = 0.0 if mean_diff == 0 else math.inf
  within = min(torch_in_jax, jax_in_torch) >= 0.75 * expected and ratio <= 1.5
  return {
      'within_spread': bool(within), 'seeds_per_side': k,
      'torch_mean_in_jax_band': torch_in_jax, 'jax_mean_in_torch_band': jax_in_torch,
      'expected_band_rate_same_distribution': expected,
      'mean_abs_diff_of_means': mean_diff, 'seed_std': sigma, 'noise_ratio': ratio,
      'mean_diff_jax_minus_torch': float(np.mean(mj - mt)),
      'text': (f'{"WITHIN" if within else "NOT within"} each other\'s seed spread: torch mean in jax '
               f'band on {100 * torch_in_jax:.0f}% of steps, jax mean in torch band on '
               f'{100 * jax_in_torch:.0f}% (expected ~{100 * expected:.0f}% for identical '
               f'implementations); mean |diff of means| is {ratio:.2f}x what seed noise alone gives.'),
  }


def summarize(runs: dict[str, list[Run]], drift: dict[int, float], steps: int,
              tokens_per_step: int, nudged_losses: Optional[list[float]] = None,
              f64_losses: Optional[list[float]] = None) -> dict:
  """The headline numbers. With several seeds, differences are between the mean curves.

  `nudged_losses`: JAX's losses from weights one ulp away (run_comparison), for the float32
  sensitivity of the run. `f64_losses`: PyTorch's losses in float64, the reference both float32
  sides are measured against.
  """
  lj, lt = _curve(runs['jax'], 'loss'), _curve(runs['torch'], 'loss')
  diff = np.abs(lj.mean(0) - lt.mean(0))
  eval_steps = sorted(runs['jax'][0].val)
  vj = np.array([[r.val[s] for s in eval_steps] for r in runs['jax']]).mean(0)
  vt = np.array([[r.val[s] for s in eval_steps] for r in runs['torch']]).mean(0)
  mean = lambda side, key: _curve(runs[side], key).mean(0)  # noqa: E731
  timed = {side: (sum(r.timed_steps for r in rs), sum(r.seconds for r in rs))
           for side, rs in runs.items()}
  summary = {
      'steps': steps, 'tol': LOSS_TOL,
      'max_abs_loss_diff': float(diff.max()),
      'first_step_over_tol': _first_over(diff, LOSS_TOL),
      'max_abs_loss_diff_first_100': float(diff[:100].max()),
      'first_100_within_tol': bool(diff[:100].max() <= LOSS_TOL),
      'loss_diff_at': {str(s): float(diff[s - 1]) for s in (1, 10, 50, 100, 200, 300, 500, 1000)
                       if s <= steps},
      'final_loss': {'jax': float(lj.mean(0)[-1]), 'torch': float(lt.mean(0)[-1])},
      'val_loss': {'steps': eval_steps, 'jax': vj.tolist(), 'torch': vt.tolist()},
      'max_abs_val_loss_diff': float(np.max(np.abs(vj - vt))),
      'max_rel_diff': {k: _max_rel(mean('jax', k), mean('torch', k))
                       for k in ('lr', 'grad_norm', 'param_norm', 'update_ratio')},
      'param_rel_diff_at_evals': {str(s): d for s, d in sorted(drift.items())},
      'jax_tokens_per_s': (tokens_per_step * timed['jax'][0] / timed['jax'][1]
                           if timed['jax'][0] else None),
      'torch_tokens_per_s': (tokens_per_step * timed['torch'][0] / timed['torch'][1]
                             if timed['torch'][0] else None),
  }
  if nudged_losses is not None:
    nd = np.abs(np.asarray(nudged_losses) - lj[0])
    summary['float32_sensitivity'] = {
        'what': 'max |loss diff| between JAX runs whose initial weights are one ulp apart',
        'max_abs_loss_diff': float(nd.max()), 'step': int(nd.argmax()) + 1,
        'max_abs_loss_diff_first_100': float(nd[:100].max())}
  if f64_losses is not None:
    ref = np.asarray(f64_losses, np.float64)
    f64 = {'what': 'max |loss diff| of each float32 side from PyTorch in float64 (same weights, '
                   'same batches)'}
    for side, curve in (('jax', lj[0]), ('torch', lt[0])):
      d = np.abs(curve - ref)
      f64[side] = {'max_abs_loss_diff': float(d.max()), 'step': int(d.argmax()) + 1,
                   'mean_abs_loss_diff': float(d.mean())}
    summary['float64_reference'] = f64
  if len(runs['jax']) > 1:
    summary['loss_diff_of'] = 'mean curves over seeds (dropout masks differ between the sides)'
    summary['dropout_verdict'] = seed_spread_verdict(lj, lt)
    # Step 0 is left out: both sides evaluate the very same initial weights there.
    later = [s for s in eval_steps if s > 0]
    summary['dropout_verdict_val'] = seed_spread_verdict(
        np.array([[r.val[s] for s in later] for r in runs['jax']]),
        np.array([[r.val[s] for s in later] for r in runs['torch']]))
  else:
    summary['loss_diff_of'] = 'the single deterministic run of each side (dropout 0)'
  return summary


# ---------------------------------------------------------------------------------------------------
# Output.

def write_jsonl(path: str, runs: dict[str, list[Run]], drift: dict[int, float],
                references: Optional[dict[str, Optional[list[float]]]] = None) -> None:
  """`references`: name -> per-step losses (e.g. 'torch_float64'); None entries are skipped."""
  with open(path, 'w', encoding='utf-8') as f:
    for side in SIDES:
      for r in runs[side]:
        for s in sorted(r.val):
          f.write(json.dumps({'kind': 'eval', 'step': s, 'side': side, 'seed': r.seed,
                              'val_loss': r.val[s]}) + '\n')
        for i, m in enumerate(r.train):
          f.write(json.dumps({'kind': 'train', 'step': i + 1, 'side': side, 'seed': r.seed, **m})
                  + '\n')
    for s, d in sorted(drift.items()):
      f.write(json.dumps({'kind': 'eval', 'step': s, 'side': 'both', 'seed': 0,
                          'param_rel_diff': d}) + '\n')
    for name, losses in (references or {}).items():
      for i, loss in enumerate(losses or []):
        f.write(json.dumps({'kind': 'reference', 'step': i + 1, 'side': name, 'loss': loss}) + '\n')


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def plot(runs: dict[str, list[Run]], drift: dict[int, float], summary: dict, path: str,
         nudged_losses: Optional[list[float]] = None, f64_losses: Optional[list[float]] = None,
         ) -> None:
  """Curves of both sides overlaid (bands = min..max over seeds) and their differences (log)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  colors = {'jax': 'tab:blue', 'torch': 'tab:orange'}
  styles = {'jax': '-', 'torch': '--'}
  n = len(runs['jax'][0].train)
  x = np.arange(1, n + 1)
  fig, axes = plt.subplots(2, 4, figsize=(21, 9))

  def overlay(ax, key, title, log=False):
    for side in SIDES:
      c = _curve(runs[side], key)
      ax.plot(x, c.mean(0), styles[side], color=colors[side], lw=1.2, label=side)
      if c.shape[0] > 1:
        ax.fill_between(x, c.min(0), c.max(0), color=colors[side], alpha=0.2, lw=0)
    ax.set_title(title)
    ax.set_xlabel('step')
    if log:
      ax.set_yscale('log')

  ax = axes[0, 0]
  overlay(ax, 'loss', 'train loss (bands: min..max over seeds)')
  for side in SIDES:
    ev = sorted(runs[side][0].val)
    vals = np.array([[r.val[s] for s in ev] for r in runs[side]]).mean(0)
    ax.plot(ev, vals, 'o' if side == 'jax' else 'x', color=colors[side], ms=7, label=f'{side} val')
  ax.legend()

  mean = lambda side, key: _curve(runs[side], key).mean(0)  # noqa: E731
  layer_mean = lambda side, key, g: np.array(  # noqa: E731  (one layer group's curve, mean over seeds)
      [[m[key][g] for m in r.train] for r in runs[side]]).mean(0)
  positive = lambda a: np.where(a > 0, a, np.nan)  # noqa: E731  (exact ties: gaps, not log(0) spikes)
  ev = sorted(runs['jax'][0].val)
  vj = np.array([[r.val[s] for s in ev] for r in runs['jax']]).mean(0)
  vt = np.array([[r.val[s] for s in ev] for r in runs['torch']]).mean(0)

  ax = axes[0, 1]  # The loss differences, next to what float32 rounding alone produces.
  with np.errstate(divide='ignore', invalid='ignore'):
    ax.plot(x, positive(np.abs(mean('jax', 'loss') - mean('torch', 'loss'))), color='k', lw=1,
            label='JAX vs PyTorch')
    if nudged_losses is not None:
      ax.plot(x, positive(np.abs(np.asarray(nudged_losses) - mean('jax', 'loss'))), color='gray',
              lw=1, alpha=0.8, label='JAX vs JAX from weights 1 ulp apart')
    if f64_losses is not None:
      for side in SIDES:
        ax.plot(x, positive(np.abs(mean(side, 'loss') - np.asarray(f64_losses))), styles[side],
                color=colors[side], lw=0.8, alpha=0.9, label=f'{side} vs PyTorch float64')
  ax.plot(ev, positive(np.abs(vj - vt)), 'ks', ms=5, label='val loss, JAX vs PyTorch')
  ax.axhline(summary['tol'], color='gray', ls=':', lw=1, label=f'tol {summary["tol"]:g}')
  ax.set_yscale('log')
  ax.set_title('|loss difference|, log scale; gaps = exactly equal')
  ax.set_xlabel('step')
  ax.legend(fontsize=7)

  ax = axes[0, 2]  # The other metrics, relative, and the distance between the parameters.
  with np.errstate(divide='ignore', invalid='ignore'):
    for key, color in (('grad_norm', 'tab:red'), ('param_norm', 'tab:green'),
                       ('update_ratio', 'tab:purple')):
      a, b = mean('jax', key), mean('torch', key)
      ax.plot(x, positive(np.abs(a - b) / np.abs(a)), color=color, lw=0.8, alpha=0.8,
              label=key.replace('_', ' '))
  if drift:
    ds = sorted(drift)
    ax.plot(ds, positive(np.array([drift[s] for s in ds])), 'D-', color='tab:brown', ms=4, lw=1,
            label='||theta_jax - theta_torch|| / ||theta||')
  ax.set_yscale('log')
  ax.set_title('relative differences, JAX vs PyTorch, log scale')
  ax.set_xlabel('step')
  ax.legend(fontsize=7)

  overlay(axes[0, 3], 'lr', 'learning rate (same schedule function)')
  axes[0, 3].legend()

  ax = axes[1, 0]
  overlay(ax, 'grad_norm', 'grad norm before clipping: global (thick), per layer (thin)', log=True)
  groups = list(runs['jax'][0].train[0]['grad_norm_layers'])
  cmap = plt.get_cmap('viridis', max(len(groups), 2))
  for gi, g in enumerate(groups):
    for side in SIDES:
      ax.plot(x, layer_mean(side, 'grad_norm_layers', g), styles[side], color=cmap(gi), lw=0.6,
              label=g if side == 'jax' else None)
  ax.legend(fontsize=7, ncol=2)

  overlay(axes[1, 1], 'update_ratio', 'update / parameter ratio ||dtheta|| / ||theta||', log=True)
  axes[1, 1].legend()

  ax = axes[1, 2]
  ax.set_title('update / parameter ratio per layer')
  with np.errstate(divide='ignore', invalid='ignore'):
    for gi, g in enumerate(groups):
      for side in SIDES:
        ax.plot(x, positive(layer_mean(side, 'update_ratio_layers', g)), styles[side], color=cmap(gi),
                lw=0.7, label=g if side == 'jax' else None)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.legend(fontsize=7, ncol=2)

  overlay(axes[1, 3], 'param_norm', 'parameter norm')
  axes[1, 3].legend()
  fig.suptitle(f'JAX vs PyTorch, float32, {summary["steps"]} steps, {len(runs["jax"])} seed(s)/side: '
               f'max |loss diff| {summary["max_abs_loss_diff"]:.2e}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_table(runs: dict[str, list[Run]], eval_steps: list[int], steps: int, rows: int = 10) -> str:
  """A short side-by-side table at ~`rows` steps (always including the evals and the last step)."""
  marks = sorted({1, steps} | {s for s in eval_steps if s > 0}
                 | {int(round(v)) for v in np.linspace(1, steps, rows)})
  mean = {(side, key): _curve(runs[side], key).mean(0) for side in SIDES
          for key in ('loss', 'lr', 'grad_norm', 'update_ratio')}
  val = {side: {s: float(np.mean([r.val[s] for r in runs[side]])) for s in eval_steps}
         for side in SIDES}
  head = (f'{"step":>6} {"lr":>9} {"loss jax":>9} {"loss torch":>10} {"|diff|":>8} '
          f'{"gnorm jax":>9} {"gnorm pt":>9} {"upd/p jax":>9} {"upd/p pt":>9} {"val jax":>8} '
          f'{"val torch":>9}')
  lines = [head, '-' * len(head)]
  for s in marks:
    i = s - 1
    lj, lt = mean['jax', 'loss'][i], mean['torch', 'loss'][i]
    v = (f'{val["jax"][s]:8.4f} {val["torch"][s]:9.4f}' if s in val['jax'] else f'{"":8} {"":9}')
    lines.append(f'{s:6d} {mean["jax", "lr"][i]:9.2e} {lj:9.5f} {lt:10.5f} {abs(lj - lt):8.1e} '
                 f'{mean["jax", "grad_norm"][i]:9.4f} {mean["torch", "grad_norm"][i]:9.4f} '
                 f'{mean["jax", "update_ratio"][i]:9.2e} {mean["torch", "update_ratio"][i]:9.2e} {v}')
  return '\n'.join(lines)


def format_summary(summary: dict) -> str:
  first = summary['first_step_over_tol']
  lines = [
      f'max |loss diff| {summary["max_abs_loss_diff"]:.2e} over {summary["steps"]} steps '
      f'(first 100: {summary["max_abs_loss_diff_first_100"]:.2e}); first step over '
      f'{summary["tol"]:g}: {first if first is not None else "never"}',
      f'max |val loss diff| {summary["max_abs_val_loss_diff"]:.2e}; parameter drift '
      f'||theta_jax - theta_torch|| / ||theta|| at the last eval '
      f'{list(summary["param_rel_diff_at_evals"].values())[-1]:.2e}',
      f'tokens/s: jax {summary["jax_tokens_per_s"] or float("nan"):,.0f}, torch '
      f'{summary["torch_tokens_per_s"] or float("nan"):,.0f}',
  ]
  if 'float32_sensitivity' in summary:
    f = summary['float32_sensitivity']
    lines.append(f'float32 sensitivity: JAX vs JAX from weights 1 ulp apart: max |loss diff| '
                 f'{f["max_abs_loss_diff"]:.2e} (step {f["step"]})')
  if 'float64_reference' in summary:
    f = summary['float64_reference']
    lines.append(f'float64 reference (PyTorch in float64, same weights and batches): max |loss diff| '
                 f'JAX {f["jax"]["max_abs_loss_diff"]:.2e} (step {f["jax"]["step"]}), PyTorch '
                 f'{f["torch"]["max_abs_loss_diff"]:.2e} (step {f["torch"]["step"]})')
  if 'dropout_verdict' in summary:
    lines.append('dropout, train loss: ' + summary['dropout_verdict']['text'])
    lines.append('dropout, val loss:   ' + summary['dropout_verdict_val']['text'])
  lines.append(f'wrote {summary["out_dir"]}/dynamics.jsonl, summary.json, dynamics.png')
  return '\n'.join(lines)
