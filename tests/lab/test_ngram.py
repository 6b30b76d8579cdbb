"""The n-gram baselines: distributions, values by hand, k chosen on train, and TinyShakespeare's losses."""

import math

import numpy as np
import pytest

from configs import shakespeare
from gpt_jax.data import text as text_lib
from gpt_jax.lab import ngram

A, B = 0, 1  # A two-letter vocabulary: the text 'aaab' is [A, A, A, B].
AAAB = np.array([A, A, A, B])


@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('k', [1e-3, 0.5, 1.0])
def test_every_context_is_a_distribution(order, k):
  tokens = np.random.default_rng(0).integers(0, 7, size=500)
  model = ngram.fit(tokens, order, 7, k)
  assert model.probs.shape == (7,) * order
  np.testing.assert_allclose(model.probs.sum(axis=-1), 1.0, rtol=1e-12)
  assert (model.probs > 0).all()  # Smoothing leaves nothing impossible, unseen contexts included.


def test_counts_by_hand():
  assert ngram.counts(AAAB, 1, 2).tolist() == [3, 1]
  assert ngram.counts(AAAB, 2, 2).tolist() == [[2, 1], [0, 0]]  # aa twice, ab once.
  c3 = ngram.counts(AAAB, 3, 2)
  assert c3[A, A].tolist() == [1, 1] and c3.sum() == 2           # aaa, aab.


def test_probabilities_and_losses_by_hand():
  uni = ngram.fit(AAAB, 1, 2, k=1.0)     # (3 + 1) / (4 + 2), (1 + 1) / (4 + 2)
  np.testing.assert_allclose(uni.probs, [2 / 3, 1 / 3])
  bi = ngram.fit(AAAB, 2, 2, k=1.0)      # after a: (2 + 1) / (3 + 2), (1 + 1) / (3 + 2); b unseen: uniform
  np.testing.assert_allclose(bi.probs, [[3 / 5, 2 / 5], [1 / 2, 1 / 2]])
  tri = ngram.fit(AAAB, 3, 2, k=1.0)     # after aa: (1 + 1) / (2 + 2) each; the rest unseen
  np.testing.assert_allclose(tri.probs, np.full((2, 2, 2), 0.5))
  half = ngram.fit(AAAB, 2, 2, k=0.5)    # (2 + .5) / (3 + 1), (1 + .5) / (3 + 1)
  np.testing.assert_allclose(half.probs[A], [5 / 8, 3 / 8])
  # The loss scores each token from index order - 1 on, given the tokens before it.
  assert math.isclose(uni.loss(np.array([A, B])), -(math.log(2 / 3) + math.log(1 / 3)) / 2)
  assert math.isclose(bi.loss(np.array([A, A, B])), -(math.log(3 / 5) + math.log(2 / 5)) / 2)
  assert math.isclose(bi.loss(np.array([B, A])), math.log(2))
  np.testing.assert_allclose(tri.nll(np.array([A, A, B, A])), [math.log(2)] * 2)


def test_k_is_chosen_on_the_train_split():
  periodic = np.tile([A, B], 500)  # Fully predictable: the least smoothing scores best.
  assert ngram.choose_k(periodic, 2, 2) == min(ngram.K_GRID)
  noisy = np.random.default_rng(0).integers(0, 20, size=400)  # Few counts per context: smooth a lot.
  assert ngram.choose_k(noisy, 2, 20) == max(ngram.K_GRID)
  with pytest.raises(ValueError):
    ngram.fit(periodic, 2, 2, k=0.0)


def test_tiny_shakespeare_baselines(tmp_path):
  data = shakespeare.get_config('cpu').data
  data.data_dir = str(tmp_path / 'data')
  ds = text_lib.load(data, verbose=False)
  models = ngram.baselines(ds.train, ds.val, ds.tokenizer.vocab_size)
  losses = {name: loss for name, (_, loss) in models.items()}
  # Measured: unigram 3.347, bigram 2.482, trigram 2.046 nats per character on the val split.
  assert losses['unigram'] == pytest.approx(3.35, abs=0.02)
  assert losses['bigram'] == pytest.approx(2.48, abs=0.02)
  assert losses['trigram'] == pytest.approx(2.05, abs=0.03)
  assert losses['unigram'] > losses['bigram'] > losses['trigram']
