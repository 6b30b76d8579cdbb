"""The GPU tier: `pytest -m gpu` on a machine with an NVIDIA GPU and a CUDA-enabled JAX.

conftest.py keeps the GPU for this tier (the default run pins the CPU), with float32 matmuls at
full precision (jax_default_matmul_precision='highest': tf32 would break float32 tolerances) and
GPU memory allocated as needed. Without a GPU every test here skips (the only skips the suite allows).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import attention as attention_lib, flash_attention, sample_run, sampling
from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT

pytestmark = pytest.mark.gpu

CFG = ModelConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


@pytest.fixture(autouse=True)
def _needs_a_gpu():
  if jax.default_backend() != 'gpu':
    pytest.skip(f'needs an NVIDIA GPU and a CUDA-enabled JAX (this run is on {jax.default_backend()}): '
                'run `pytest -m gpu` there, or scripts/gpu_check.sh')


def _params(cfg):
  return GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.block_size), jnp.int32))['params']


def test_cudnn_attention_matches_manual():
  cudnn = dataclasses.replace(CFG, dtype='bfloat16', attention='cudnn')
  manual = dataclasses.replace(cudnn, attention='manual')
  assert attention_lib.describe_attention(cudnn).startswith('cudnn')
  params = _params(manual)
  x = jax.random.randint(jax.random.PRNGKey(1), (4, CFG.block_size), 0, CFG.vocab_size)
  y = jnp.roll(x, -1, axis=1)

  def loss(p, cfg):
    logits = GPT(cfg).apply({'params': p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                        for c in (cudnn, manual))
  text = jax.jit(lambda p: GPT(cudnn).apply({'params': p}, x)).lower(params).as_text()
  assert 'cudnn' in text.lower()  # The fused kernel, not XLA's attention.
  assert abs(float(la) - float(lb)) < 2e-2  # bf16 attention inputs either way.
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    assert float(jnp.max(jnp.abs(a - b))) <= 0.05 * float(jnp.max(jnp.abs(b))) + 1e-6


@pytest.mark.parametrize('dtype, T, tol', [('float32', 256, 1e-4), ('bfloat16', 200, 3e-2)])
def test_flash_kernel_matches_the_written_out_softmax(dtype, T, tol):
  """The Pallas kernel compiled with Triton (the `gpu` preset's shapes: 6 heads of 64; T = 200 is
  padded to whole blocks) against the written-out softmax with the same hashed dropout mask:
  output and dq, dk, dv. float32 runs at full precision on both sides (this tier's setting)."""
  B, H, D, rate = 4, 6, 64, 0.2
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (B, H, T, D)).astype(dtype) for key in keys[:3])
  w = jax.random.normal(keys[3], (B, H, T, D)).astype(dtype)
  seed = jnp.uint32(1234)
  mask = jnp.tril(jnp.ones((T, T), bool))
  kernel = lambda q, k, v: flash_attention.flash_attention(q, k, v, seed, rate)
  written = lambda q, k, v: attention_lib.causal_attention(q, k, v, mask, rate, dropout_seed=seed)

  def run(f, q, k, v):
    y, pullback = jax.vjp(f, q, k, v)
    return y, pullback(w)

  text = jax.jit(functools.partial(run, kernel)).lower(q, k, v).as_text()
  assert text.count('__gpu$xla.gpu.triton') == 3  # Forward, dk/dv and dq: not interpreted.
  got, want = (jax.jit(functools.partial(run, f))(q, k, v) for f in (kernel, written))
  for name, a, b in zip(('y', 'dq', 'dk', 'dv'), jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(want)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    err = float(jnp.max(jnp.abs(a - b)))
    assert err <= tol * max(1.0, float(jnp.max(jnp.abs(b)))), f'{name}: max |kernel - written| = {err:.2e}'


def test_gpu_preset_trains_with_the_flash_kernel():
  from configs import shakespeare
  from gpt_jax.config import model_config_from
  cfg = model_config_from(shakespeare.get_config('gpu'), 65)
  assert attention_lib.describe_attention(cfg).startswith('flash in training, cudnn in evals')


def test_bf16_training_tracks_float32_on_the_gpu():
  from test_gpu_path import BF16_TOLERANCE, train_losses
  f32, bf16 = train_losses('float32'), train_losses('bfloat16')
  assert f32[-1] < f32[0] - 1.0
  assert np.abs(bf16 - f32).max() < 2 * BF16_TOLERANCE  # Other kernels than the CPU's: twice the margin.


def test_sampler_with_cache_equals_recomputation():
  params = _params(CFG)
  prompt = np.array([[1, 2, 3, 4]], np.int32)
  n = CFG.block_size + 20  # Past the window: re-encoding included.
  cached = sampling.generate(params, CFG, prompt, n, jax.random.PRNGKey(0), temperature=0.0)
  plain = sample_run.generate_uncached(params, CFG, prompt, n)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))


def test_checkpoint_round_trip(tiny_config):
  from gpt_jax import checkpoint as checkpoint_lib
  from gpt_jax.training import loop as loop_lib
  tiny_config.model.update(dtype='bfloat16', attention='auto', attention_dropout=False)
  tiny_config.train.max_steps = 20
  tiny_config.checkpoint.update(save='always', async_save=False)
  summary = loop_lib.train_and_evaluate(tiny_config)
  cfg, params, _ = checkpoint_lib.load_for_inference(tiny_config.out_dir, step=20)
  assert cfg.dtype == 'bfloat16'
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  tiny_config.train.update(max_steps=30, resume=True)
  resumed = loop_lib.train_and_evaluate(tiny_config)
  assert resumed['start_step'] == 20 and resumed['final_step'] == 30
  assert np.isfinite(resumed['final_val_loss']) and summary['final_step'] == 20
