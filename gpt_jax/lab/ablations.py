"""Why each piece: the model trained with one piece of GPT-2 removed at a time, against the full model.

Every variant starts from the same config and seed and sees the same batches; only `model.ablate`
differs (ModelConfig.ablate in gpt_jax/config.py: 'attention', 'positions', 'residual', 'layernorm',
'heads' or 'mlp').
Val loss is measured on one fixed set of val windows, the same for every variant and every eval, so
the curves differ by the model alone. The walkthrough notebook trains one seed of this;
scripts/why_each_piece.py runs several seeds and writes the table of docs/why-each-piece.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import config as config_lib, model as model_lib, optim
from gpt_jax.data import batches
from gpt_jax.training import step as step_lib

PIECES = ('attention', 'positions', 'residual', 'layernorm', 'heads', 'mlp')
FULL = 'full model'


def small_config(seed: int = 0, steps: int = 250) -> ml_collections.ConfigDict:
  """The `cpu` preset cut to a model and run that trains in seconds on a CPU, for comparing pieces."""
  from configs import shakespeare
  c = shakespeare.get_config('cpu')
  c.model.update(n_layer=3, n_head=4, n_embd=64, block_size=64)
  c.train.update(seed=seed, batch_size=16, max_steps=steps, lr_decay_steps=steps, warmup_steps=steps // 10,
                 learning_rate=3e-3, min_learning_rate=3e-4)
  return c


@dataclasses.dataclass
class Curve:
  """Val loss of one variant at steps 0, every, 2 * every, ..., max_steps."""
  name: str
  steps: list[int]
  val_loss: list[float]
  seconds: float

  @property
  def final(self) -> float:
    return self.val_loss[-1]


def val_windows(val: np.ndarray, block_size: int, n: int = 256, seed: int = 0) -> np.ndarray:
  """(n, block_size + 1) fixed windows of the val split: inputs [:, :-1], targets [:, 1:]."""
  starts = np.random.default_rng(seed).integers(0, len(val) - block_size - 1, size=n)
  return np.stack([np.asarray(val[s:s + block_size + 1], np.int32) for s in starts])


def train_curve(config: ml_collections.ConfigDict, vocab_size: int, train_data: jax.Array,
                windows: np.ndarray, name: str, every: int = 50) -> Curve:
  """Trains `config`'s model from scratch; its val loss on `windows` at step 0 and every `every` steps."""
  t0 = time.perf_counter()
  model_cfg = config_lib.model_config_from(config, vocab_size)
  model = model_lib.GPT(model_cfg)
  state = step_lib.init_train_state(model_cfg, config.train)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, batch_size=config.train.batch_size,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(config.train)),
                 donate_argnums=0)
  x, y = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
  evaluate = jax.jit(lambda p: step_lib.loss_fn(p, model, x, y, None))
  steps, losses = [0], [float(evaluate(state.params))]
  for s in range(1, config.train.max_steps + 1):
    state, _ = step(state, train_data)
    if s % every == 0 or s == config.train.max_steps:
      steps.append(s)
      losses.append(float(evaluate(state.params)))
  return Curve(name=name, steps=steps, val_loss=losses, seconds=time.perf_counter() - t0)


def run(config: ml_collections.ConfigDict, train: np.ndarray, val: np.ndarray, vocab_size: int,
        pieces: Sequence[str] = PIECES, every: int = 50,
        log: Optional[Callable[[str], None]] = None) -> dict[str, Curve]:
  """{FULL: the full model's curve, piece: the curve without that piece} for one config and seed."""
  train_data = batches.to_device(train)
  windows = val_windows(val, config.model.block_size)
  curves = {}
  for piece in (FULL, *pieces):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.ablate = '' if piece == FULL else piece
    curves[piece] = train_curve(c, vocab_size, train_data, windows, piece, every)
    if log:
      log(f'{piece:<12} val loss {curves[piece].final:.3f} ({curves[piece].seconds:.0f} s)')
  return curves


def orderings(curves: dict[str, Curve], margin: float = 0.0) -> list[tuple[str, str]]:
  """Every (a, b) with a's final val loss below b's by more than `margin`."""
  return [(a, b) for a in curves for b in curves if curves[a].final + margin < curves[b].final]


def held_in_every(runs: Sequence[dict[str, Curve]], margin: float = 0.0) -> list[tuple[str, str]]:
  """The orderings (a below b by more than `margin`) that held in every one of `runs` (one per seed)."""
  common = set(orderings(runs[0], margin))
  for curves in runs[1:]:
    common &= set(orderings(curves, margin))
  return sorted(common, key=lambda ab: (runs[0][ab[0]].final, runs[0][ab[1]].final))


def plot(ax, curves: dict[str, Curve], baselines: dict[str, float], title: str = '') -> None:
  """Val loss against steps, one line per variant, with the n-gram baselines as dashed lines."""
  for i, (name, c) in enumerate(curves.items()):
    label = name if name == FULL else f'no {name}' if name != 'heads' else 'one head'
    ax.plot(c.steps, c.val_loss, 'o-' if name == FULL else '.-', ms=3, lw=2.5 if name == FULL else 1.2,
            color='black' if name == FULL else f'C{i}', label=f'{label} {c.final:.2f}')
  for name, loss in baselines.items():
    ax.axhline(loss, ls='--', lw=0.8, color='grey')
    ax.annotate(f'{name} {loss:.2f}', (0, loss), textcoords='offset points', xytext=(2, 2), fontsize=7,
                color='grey')
  ax.set(xlabel='step', ylabel='val loss (nats)', ylim=(1.9, 3.6), title=title)
  ax.legend(fontsize=7, loc='upper right')
