"""Count-based n-gram models: the baselines a trained GPT must beat.

An order-n model predicts token t from the n - 1 tokens before it by counting, in the training split,
how often each token followed that context. Add-k smoothing keeps unseen continuations possible:

    p(next | context) = (count(context, next) + k) / (count(context) + k * V)

so every context's row sums to one, also a context never seen (which gets the uniform 1/V). k is
chosen on the training split only: fitted on its first 90%, scored on the last 10%, from a grid.

    models = ngram.baselines(train_ids, val_ids, vocab_size)  # {'unigram': NGram, ...}
    models['trigram'].loss(val_ids)                           # mean nats per token
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

NAMES = {1: 'unigram', 2: 'bigram', 3: 'trigram'}
K_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # Add-k candidates: from near-unsmoothed to Laplace.


def counts(tokens: np.ndarray, order: int, vocab_size: int) -> np.ndarray:
  """How often each n-gram occurs: an array of shape (V,) * order, the last axis the next token."""
  tokens = np.asarray(tokens, np.int64)
  n = len(tokens) - order + 1
  index = np.zeros(max(n, 0), np.int64)
  for j in range(order):  # The n-gram (a, b, c) at flat index (a * V + b) * V + c.
    index = index * vocab_size + tokens[j:j + n]
  return np.bincount(index, minlength=vocab_size ** order).reshape((vocab_size,) * order)


@dataclasses.dataclass
class NGram:
  """An add-k smoothed n-gram model."""
  order: int
  k: float
  probs: np.ndarray  # (V,) * order: probs[context..., next], each row summing to one.

  def nll(self, tokens: np.ndarray) -> np.ndarray:
    """-ln p of each token from index order - 1 on, given the order - 1 tokens before it (nats)."""
    tokens = np.asarray(tokens, np.int64)
    n = len(tokens) - self.order + 1
    grams = tuple(tokens[j:j + n] for j in range(self.order))
    return -np.log(self.probs[grams])

  def loss(self, tokens: np.ndarray) -> float:
    """Mean cross-entropy (nats per token) on `tokens`, the measure of the GPT's val loss."""
    return float(self.nll(tokens).mean())


def fit(tokens: np.ndarray, order: int, vocab_size: int, k: float) -> NGram:
  """The order-`order` model of `tokens` with add-k smoothing (k > 0)."""
  if order < 1 or k <= 0:
    raise ValueError(f'need order >= 1 and k > 0, got order={order}, k={k}')
  c = counts(tokens, order, vocab_size).astype(np.float64) + k
  return NGram(order=order, k=k, probs=c / c.sum(axis=-1, keepdims=True))


def choose_k(train: np.ndarray, order: int, vocab_size: int, grid: Sequence[float] = K_GRID,
             held_out: float = 0.1) -> float:
  """The k of `grid` whose model of train's first part scores best on train's last `held_out` part."""
  cut = int(len(train) * (1 - held_out))
  fitted, held = np.asarray(train[:cut]), np.asarray(train[cut:])
  return min(grid, key=lambda k: fit(fitted, order, vocab_size, k).loss(held))


def baselines(train: np.ndarray, val: np.ndarray, vocab_size: int,
              orders: Sequence[int] = (1, 2, 3)) -> dict[str, tuple[NGram, float]]:
  """{name: (model fitted on all of train with its chosen k, its val loss in nats)} per order."""
  out = {}
  for order in orders:
    model = fit(train, order, vocab_size, choose_k(train, order, vocab_size))
    out[NAMES.get(order, f'{order}-gram')] = (model, model.loss(val))
  return out
