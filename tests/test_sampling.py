"""Generation: the jitted KV-cache loop vs full recomputation, windows, sampling controls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model as model_lib, sample_run, sampling
from gpt_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture(scope='module')
def params():
  # Larger-than-init weights make the greedy choice depend strongly on the context.
  make = lambda: jax.tree_util.tree_map(lambda a: a * 8 if a.ndim == 2 else a,
                                        model_lib.init_params(CFG, jax.random.PRNGKey(0)))
  return jax.jit(make)()  # One program: eagerly, each op of the init compiles on its own.


def _prompt(batch, length, seed=1):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CFG.vocab_size))


@pytest.mark.parametrize('prompt_len,new,shift', [
    (3, 10, 1),    # Inside the window.
    (5, 30, 1),    # Past the window, exact nanoGPT cropping.
    (5, 30, 4),    # Past the window, re-encoding every 4 tokens.
    (20, 12, 0),   # Prompt longer than the window, automatic shift.
    (16, 5, 16),   # Window exactly full at the start, largest shift.
])
@pytest.mark.slow
def test_cached_greedy_equals_full_recomputation(params, prompt_len, new, shift):
  prompt = _prompt(2, prompt_len)
  cached = sampling.generate(params, CFG, prompt, new, jax.random.PRNGKey(0), temperature=0.0,
                               window_shift=shift)
  reference = sample_run.generate_uncached(params, CFG, prompt, new, window_shift=shift)
  np.testing.assert_array_equal(np.asarray(cached), reference)
  np.testing.assert_array_equal(np.asarray(cached[:, :prompt_len]), prompt)


OPTIONS = {  # The speedrun options of the model, one at a time and all at once.
    'rotary': dict(position='rotary'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(activation='relu2'),
    'zero_init_proj': dict(zero_init_proj=True),
    'all': dict(position='rotary', qk_norm=True, activation='relu2', zero_init_proj=True, bias=True),
}


@pytest.mark.slow
@pytest.mark.parametrize('prompt_len,new,shift', [
    (5, 30, 1),    # Past the window, exact nanoGPT cropping.
    (20, 12, 4),   # Prompt longer than the window, re-encoding every 4 tokens.
])
@pytest.mark.parametrize('option', OPTIONS)
def test_cached_greedy_equals_full_recomputation_under_every_option(option, prompt_len, new, shift):
  """As above for every model option. With rotary positions the cache holds rotated keys, and the
  re-encoded window restarts at position 0 in both paths."""
  cfg = dataclasses.replace(CFG, **OPTIONS[option])

  def make():
    # Large random weights everywhere (zero-initialised projections and biases too) make the greedy
    # choice depend on the context; the scaling above would let some of these models settle on
    # repeating one token.
    leaves, tree = jax.tree_util.tree_flatten(model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return tree.unflatten([a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])

  p = jax.jit(make)()  # One program: eagerly, each op of the init compiles on its own.
  prompt = _prompt(2, prompt_len)
  cached = sampling.generate(p, cfg, prompt, new, jax.random.PRNGKey(0), temperature=0.0,
                               window_shift=shift)
  reference = sample_run.generate_uncached(p, cfg, prompt, new, window_shift=shift)
  np.testing.assert_array_equal(np.asarray(cached), reference)
  assert len(set(np.asarray(cached)[:, prompt_len:].ravel().tolist())) > 1  # Not one token repeated.


@pytest.mark.slow
def test_shift_one_is_nanogpt_crop_to_block_size(params):
  """nanoGPT: idx_cond = idx[:, -block_size:]; logits[:, -1] -> next token, here sampled.

  Sampled at temperature 1 with the sampler's own key per token (greedy decoding of a random model
  soon repeats one token, which no window error would change): four rows, 60 new tokens, most of
  them past the full window, so a window one token short or one step late changes the text.
  The cropped context is padded on the right to block_size, so that one compiled forward serves
  every length (not one per length): the model is causal (tests/test_model.py), so the logits at the
  context's last position do not see the padding."""
  prompt = _prompt(4, 4)
  key = jax.random.PRNGKey(0)
  tokens = prompt
  forward = jax.jit(lambda p, x: model_lib.GPT(CFG).apply({'params': p}, x))
  pick = jax.jit(lambda logits, i: sampling._pick(logits, jax.random.fold_in(key, i), 1.0, None,
                                                  CFG.vocab_size))
  for i in range(60):
    context = tokens[:, -CFG.block_size:]
    n = context.shape[1]
    padded = np.pad(context, ((0, 0), (0, CFG.block_size - n)))
    logits = forward(params, padded)[:, n - 1]
    tokens = np.concatenate([tokens, np.asarray(pick(logits, i))[:, None]], axis=1)
  assert len(set(tokens[:, -40:].ravel().tolist())) > 5  # Varied text past the window.
  cached = sampling.generate(params, CFG, prompt, 60, key, temperature=1.0, window_shift=1)
  np.testing.assert_array_equal(np.asarray(cached), tokens)


@pytest.mark.slow
def test_top_k_one_is_greedy(params):
  prompt = _prompt(3, 4)
  greedy = sampling.generate(params, CFG, prompt, 12, jax.random.PRNGKey(0), temperature=0.0)
  top1 = sampling.generate(params, CFG, prompt, 12, jax.random.PRNGKey(5), temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))


def test_sampling_is_seeded_and_rows_differ(params):
  prompt = np.zeros((4, 1), np.int32)
  a = sampling.generate(params, CFG, prompt, 20, jax.random.PRNGKey(1), temperature=1.0)
  b = sampling.generate(params, CFG, prompt, 20, jax.random.PRNGKey(1), temperature=1.0)
  c = sampling.generate(params, CFG, prompt, 20, jax.random.PRNGKey(2), temperature=1.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  assert len({tuple(r) for r in np.asarray(a).tolist()}) > 1  # Independent samples per row.


@pytest.mark.slow
def test_vocab_limit_masks_padded_rows(params):
  out = sampling.generate(params, CFG, np.zeros((8, 1), np.int32), 40, jax.random.PRNGKey(3),
                            temperature=2.0, vocab_limit=5)
  assert int(np.asarray(out[:, 1:]).max()) < 5


@pytest.mark.slow
def test_top_k_restricts_choices(params):
  prompt = _prompt(1, 3)
  logits = jax.jit(model_lib.GPT(CFG).apply)({'params': params}, jnp.asarray(prompt))[:, -1]
  allowed = set(np.asarray(jax.lax.top_k(logits, 3)[1])[0].tolist())
  firsts = {int(sampling.generate(params, CFG, prompt, 1, jax.random.PRNGKey(s), temperature=5.0,
                                    top_k=3)[0, -1]) for s in range(30)}
  assert firsts <= allowed and len(firsts) > 1
