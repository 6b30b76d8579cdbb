"""The GPU path, proven on a CPU: which attention kernel runs, the `gpu` preset (bf16 matmuls on a
float32 residual stream), MFU peaks by device name and precision, the compilation cache, one GPU per
process, no malloc preload on accelerators, and the suite's CPU pin. docs/gpu.md has the why."""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import allocator, attention as attention_lib, cli, model as model_lib
from gpt_jax.config import ModelConfig, model_config_from
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.parallel import distributed
from gpt_jax.training import metrics

BF16 = ModelConfig(vocab_size=41, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                   dtype='bfloat16')


# --- attention: chosen in one place -------------------------------------------------------------

@pytest.mark.parametrize('attention, dtype, head, platform, drop, want', [
    ('manual', 'bfloat16', 16, 'gpu', False, 'manual'),
    ('xla', 'bfloat16', 16, 'gpu', False, 'xla'),       # 'xla' means XLA, on a GPU too.
    ('xla', 'float32', 16, 'cpu', True, 'manual'),      # Dropped probabilities: the written-out softmax.
    ('auto', 'bfloat16', 16, 'gpu', False, 'cudnn'),
    ('auto', 'float16', 64, 'cuda', False, 'cudnn'),
    ('auto', 'float32', 16, 'gpu', False, 'xla'),       # cuDNN takes bf16/fp16 only.
    ('auto', 'bfloat16', 12, 'gpu', False, 'xla'),      # Head size not a multiple of 8.
    ('auto', 'bfloat16', 256, 'gpu', False, 'xla'),     # Head size over 128.
    ('auto', 'bfloat16', 16, 'cpu', False, 'xla'),
    ('auto', 'bfloat16', 16, 'gpu', True, 'flash'),     # Dropped probabilities on a GPU: the Pallas kernel.
    ('auto', 'float32', 64, 'cuda', True, 'flash'),
    ('auto', 'bfloat16', 12, 'gpu', True, 'manual'),    # Head size the flash kernel cannot take.
    ('auto', 'bfloat16', 16, 'cpu', True, 'manual'),    # Off a GPU the kernel would only be interpreted.
    ('xla', 'bfloat16', 16, 'gpu', True, 'manual'),     # 'xla' never picks the flash kernel.
    ('cudnn', 'bfloat16', 128, 'gpu', False, 'cudnn'),
    ('flash', 'float32', 16, 'cpu', True, 'flash'),     # Asked for: anywhere (interpreted off a GPU).
    ('flash', 'bfloat16', 64, 'gpu', False, 'flash'),   # Evals too.
])
def test_attention_implementation(attention, dtype, head, platform, drop, want):
  cfg = ModelConfig(n_head=2, n_embd=2 * head, attention=attention, dtype=dtype)
  assert attention_lib.attention_implementation(cfg, drop, platform) == want


@pytest.mark.parametrize('dtype, platform, drop, match', [
    ('bfloat16', 'cpu', False, 'needs an NVIDIA GPU'),
    ('float32', 'gpu', False, 'only bfloat16/float16'),
    ('bfloat16', 'gpu', True, 'attention_dropout=False'),
])
def test_cudnn_says_why_it_cannot_run(dtype, platform, drop, match):
  cfg = ModelConfig(attention='cudnn', dtype=dtype, n_head=6, n_embd=384)
  with pytest.raises(UserError, match=match):
    attention_lib.attention_implementation(cfg, drop, platform)


def test_start_up_line_names_the_kernels():
  gpu = model_config_from(shakespeare.get_config('gpu'), 65)
  assert attention_lib.describe_attention(gpu, 'gpu').startswith('flash in training, cudnn in evals')
  fused = dataclasses.replace(gpu, attention_dropout=False)
  assert attention_lib.describe_attention(fused, 'gpu').startswith('cudnn (training and evals')
  assert attention_lib.describe_attention(fused, 'cpu').startswith('xla (training and evals')
  assert attention_lib.describe_attention(gpu, 'cpu').startswith('manual in training')
  xla = dataclasses.replace(model_config_from(shakespeare.get_config(''), 65), attention='xla')
  assert attention_lib.describe_attention(xla, 'gpu').startswith('manual in training (attention dropout')
  assert ', xla in evals' in attention_lib.describe_attention(xla, 'gpu')


def test_model_calls_the_chosen_kernel(monkeypatch):
  """Under target_platform('gpu') an 'auto' bf16 model asks jax.nn.dot_product_attention for cuDNN
  (run here as XLA, which the CPU has); in training with attention dropout it never calls it, but
  the flash kernel, compiled (not interpreted), with a seed and the dropout rate."""
  seen, flash_calls = [], []
  real, real_flash = jax.nn.dot_product_attention, attention_lib.flash_attention.flash_attention

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return real(*args, implementation='xla', **kwargs)

  def flash_spy(q, k, v, seed, rate, interpret):
    flash_calls.append((seed is not None, rate, interpret))
    return real_flash(q, k, v, seed, rate, interpret=True)  # Traced only; the CPU interprets it.

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  monkeypatch.setattr(attention_lib.flash_attention, 'flash_attention', flash_spy)
  cfg = dataclasses.replace(BF16, attention='auto')
  x = jnp.zeros((2, 16), jnp.int32)
  # The kernel is chosen while tracing, so tracing alone (eval_shape) shows every call; nothing runs.
  params = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), x))['params']  # On the CPU: XLA.
  assert seen and set(seen) == {'xla'}
  seen.clear()
  train = lambda c: jax.eval_shape(lambda p: GPT(c).apply({'params': p}, x, deterministic=False,
                                                          rngs={'dropout': jax.random.PRNGKey(1)}), params)
  with attention_lib.target_platform('gpu'):
    jax.eval_shape(lambda p: GPT(cfg).apply({'params': p}, x), params)
    assert seen == ['cudnn'] * cfg.n_layer
    seen.clear()
    drop = dataclasses.replace(cfg, dropout=0.1)
    train(drop)
    assert seen == []  # Attention dropout: the flash kernel.
    assert flash_calls == [(True, 0.1, False)] * cfg.n_layer
    train(dataclasses.replace(drop, attention_dropout=False))
    assert seen == ['cudnn'] * cfg.n_layer and len(flash_calls) == cfg.n_layer


def test_attention_dropout_off_drops_no_probabilities():
  """attention_dropout=False: attention itself is dropout-free whatever the key; the residual dropout
  after c_proj still acts (entries zeroed, the rest scaled by 1 / (1 - p))."""
  cfg = dataclasses.replace(BF16, dtype='float32', dropout=0.5, attention_dropout=False)
  attn = model_lib.CausalSelfAttention(cfg)
  h = jax.random.normal(jax.random.PRNGKey(3), (2, 16, cfg.n_embd))
  params = jax.jit(attn.init, static_argnums=2)(jax.random.PRNGKey(0), h, True)  # Jitted: eager compiles
  clean = jax.jit(attn.apply, static_argnums=2)(params, h, True)[0]                # every op on its own.
  train = jax.jit(lambda p, h, key: attn.apply(p, h, False, rngs={'dropout': key})[0])
  outs = [train(params, h, jax.random.PRNGKey(k)) for k in range(2)]
  for out in outs:
    kept = out != 0
    assert 0.3 < float(kept.mean()) < 0.7
    np.testing.assert_allclose(out[kept], clean[kept] * 2.0, rtol=1e-4, atol=1e-6)
  assert not np.array_equal(outs[0], outs[1])


# --- bf16: float32 residual stream, bf16 matmuls ---------------------------------------------------

def test_bf16_keeps_residual_stream_float32_and_multiplies_in_bf16():
  x = jnp.zeros((2, 16), jnp.int32)
  # Only dtypes are checked: eval_shape traces the model without running it.
  params = jax.eval_shape(lambda: GPT(BF16).init(jax.random.PRNGKey(0), x))['params']
  logits, inter = jax.eval_shape(lambda p: GPT(BF16).apply({'params': p}, x, mutable='intermediates'), params)
  assert logits.dtype == jnp.float32
  assert inter['intermediates']['embed'][0].dtype == jnp.float32
  assert all(r[0].dtype == jnp.float32 for k, v in inter['intermediates'].items() if k.startswith('h_')
             for r in [v['resid']])
  hlo = jax.jit(lambda p: GPT(BF16).apply({'params': p}, x)).lower(params).as_text()
  # Operand types of every matmul: `stablehlo.dot_general %a, %b, ... : (tensor<..xbf16>, ...) -> ...`.
  operands = [l.rsplit(': (', 1)[1].split(') ->')[0] for l in hlo.splitlines() if 'dot_general' in l]
  matmuls = [o for o in operands if o.count('x') and o.count('tensor<') == 2]
  assert len(matmuls) >= 4 * BF16.n_layer + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block; LM head.
  linear = [o for o in matmuls if o.split(',')[0].count('x') == 2]  # The 2-D GEMMs (not q k^T, p v).
  assert len(linear) == 4 * BF16.n_layer + 1 and all(o.count('bf16') == 2 for o in linear), linear


def test_gpu_preset_is_the_default_recipe_in_bf16_with_fused_attention():
  default, gpu = shakespeare.get_config(''), shakespeare.get_config('gpu')
  assert gpu.model.dtype == 'bfloat16' and gpu.model.attention == 'auto'
  # Attention dropout stays (nanoGPT's regulariser): on a GPU training runs the flash kernel, evals cuDNN.
  assert gpu.model.attention_dropout is True and gpu.model.dropout == default.model.dropout
  assert gpu.out_dir != default.out_dir and gpu.train.target_val_loss == 1.47
  d, g = default.to_dict(), gpu.to_dict()
  for section in ('model', 'train', 'data', 'sample', 'checkpoint', 'mesh'):
    changed = {k for k in d[section] if d[section][k] != g[section][k]}
    # The compilation cache changes how fast a rerun starts, never what it computes.
    assert changed <= {'dtype', 'attention', 'target_val_loss', 'compilation_cache_dir'}, (section, changed)


def _changed(a, b) -> dict:
  """{(section, field): (a's value, b's value)} where two run configs differ."""
  a, b = a.to_dict(), b.to_dict()
  return {(sec, k): (a[sec][k], v) for sec in b if isinstance(b[sec], dict) for k, v in b[sec].items()
          if a[sec][k] != v}


def test_gpu_speedrun_preset_is_the_speedrun_levers_sized_for_one_gpu():
  """Every lever of `speedrun` (model, optimizer, evals) kept; bf16, cuDNN, a GPU batch and its own
  length (one eval, at the end), 10 steps per call and the compilation cache changed; nothing else."""
  speedrun, gpu = shakespeare.get_config('speedrun'), shakespeare.get_config('gpu_speedrun')
  diff = _changed(speedrun, gpu)
  assert set(diff) == {('model', 'dtype'), ('model', 'attention'), ('train', 'batch_size'),
                       ('train', 'max_steps'), ('train', 'lr_decay_steps'), ('train', 'eval_interval'),
                       ('train', 'steps_per_call'), ('train', 'compilation_cache_dir')}
  assert gpu.model.dtype == 'bfloat16' and gpu.model.attention == 'auto' and gpu.train.batch_size == 64
  assert gpu.train.steps_per_call == 10 and gpu.train.compilation_cache_dir  # A rerun compiles nothing.
  t = gpu.train
  assert t.max_steps == t.lr_decay_steps == t.eval_interval and not t.eval_at_start and t.val_full_pass
  assert t.target_val_loss == 1.47 and gpu.sample.eval_tokens == 0 and gpu.out_dir != speedrun.out_dir


def test_gpt2_gpu_preset_is_gpt2_in_bf16_with_one_batch_per_step():
  """The same model and the same 32 x 1024 tokens per optimizer step as `gpt2`, as one bf16 batch."""
  from configs import gpt2 as gpt2_configs
  gpt2, gpu = gpt2_configs.get_config('gpt2'), gpt2_configs.get_config('gpt2_gpu')
  assert set(_changed(gpt2, gpu)) == {('model', 'dtype'), ('model', 'attention'), ('train', 'batch_size'),
                                      ('train', 'grad_accum_steps')}
  rows = lambda c: c.train.batch_size * c.train.grad_accum_steps
  assert rows(gpu) == rows(gpt2) == 32
  assert gpu.model.dropout == 0.0  # No attention dropout to keep: cuDNN trains too.
  assert gpu.out_dir != gpt2.out_dir


# --- MFU: exact names, precision, device count ----------------------------------------------------

@dataclasses.dataclass
class FakeDevice:
  device_kind: str
  platform: str = 'gpu'


@pytest.mark.parametrize('kind, dtype, want', [
    ('NVIDIA L40S', 'bfloat16', 362e12),           # Not L4's 121.
    ('NVIDIA L4', 'bfloat16', 121e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),      # Not the SXM part's 989.
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156e12),  # float32 at default precision: tf32.
    ('NVIDIA A100-SXM4-80GB', 'float16', 312e12),
])
def test_peak_by_exact_name_and_precision(kind, dtype, want):
  assert metrics.peak_flops(0.0, dtype, [FakeDevice(kind)]) == (want, f'{kind} '
                                                                 f'{metrics.matmul_precision(dtype)} peak')


def test_peak_precision_follows_jax_matmul_precision(monkeypatch):
  with jax.default_matmul_precision('highest'):
    assert metrics.matmul_precision('float32') == 'fp32'
    assert metrics.peak_flops(0.0, 'float32', [FakeDevice('NVIDIA A100-SXM4-40GB')])[0] == 19.5e12
    assert metrics.matmul_precision('bfloat16') == 'bf16'
  monkeypatch.setenv('NVIDIA_TF32_OVERRIDE', '0')
  assert metrics.matmul_precision('float32') == 'fp32'


def test_device_count_applies_to_every_source(monkeypatch):
  measured = []
  monkeypatch.setattr(metrics, '_measure_matmul', lambda dtype, dev: measured.append(dtype) or 1e12)
  four = lambda kind, platform='gpu': [FakeDevice(kind, platform)] * 4
  assert metrics.peak_flops(0.0, 'bfloat16', four('NVIDIA H200'))[0] == 4 * 989e12
  assert metrics.peak_flops(2e12, 'float32', four('NVIDIA H200')) == (8e12, '4 x configured peak')
  assert metrics.peak_flops(0.0, 'bfloat16', four('NVIDIA B300'))[0] == 4e12  # Unknown GPU: measured.
  assert measured == ['bfloat16']
  # A CPU measurement already spans every core, which simulated CPU devices share.
  assert metrics.peak_flops(0.0, 'float32', four('cpu', 'cpu'))[0] == 1e12


# --- compilation cache, local devices, allocator, the suite's pin ----------------------------------

def test_compilation_cache_dir(tmp_path):
  home = {'XDG_CACHE_HOME': str(tmp_path)}
  assert cli.compilation_cache_dir(home) == str(tmp_path / 'gpt_jax' / 'jax_compilation_cache')
  assert cli.compilation_cache_dir({**home, cli.CACHE_ENV_VAR: 'off'}) is None
  assert cli.compilation_cache_dir({cli.CACHE_ENV_VAR: str(tmp_path / 'c')}) == str(tmp_path / 'c')
  assert cli.compilation_cache_dir({**home, 'JAX_COMPILATION_CACHE_DIR': '/elsewhere'}) is None


def test_local_device_ids_reach_jax(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  cfg = {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1, 'local_device_ids': '1'}
  distributed.initialize(cfg, environ={})
  assert calls[-1]['local_device_ids'] == [1]
  distributed.initialize({**cfg, 'local_device_ids': ''}, environ={})
  assert calls[-1]['local_device_ids'] is None  # JAX's own choice (JAX_LOCAL_DEVICE_IDS, launcher).
  with pytest.raises(UserError, match='e.g. 0 or 0,1'):
    distributed.initialize({**cfg, 'local_device_ids': 'gpu1'}, environ={})


@pytest.mark.parametrize('nodes, plugin, platforms, want', [
    (['/dev/nvidia0'], 'jax-cuda12-plugin', '', 'gpu'),
    (['/dev/nvidia0'], 'jax_cuda13_plugin', 'cuda', 'gpu'),
    (['/dev/nvidia0'], 'jax-cuda12-plugin', 'cpu', None),   # JAX told to use the CPU.
    (['/dev/nvidia0'], 'numpy', '', None),                  # A GPU, but no CUDA JAX.
    ([], 'jax-cuda12-plugin', '', None),                    # The plugin, but no GPU.
])
def test_accelerator_backend(monkeypatch, nodes, plugin, platforms, want):
  import glob
  from importlib import metadata
  monkeypatch.setattr(glob, 'glob', lambda pattern: nodes if 'nvidia' in pattern else [])
  monkeypatch.setattr(metadata, 'distributions', lambda: [type('D', (), {'metadata': {'Name': plugin}})])
  assert allocator.accelerator_backend({'JAX_PLATFORMS': platforms}) == want


def test_no_preload_on_a_gpu(monkeypatch):
  execs = []
  monkeypatch.setattr(os, 'execve', lambda *a: execs.append(a))
  monkeypatch.setattr(allocator, 'loaded_allocator', lambda: None)
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  run_as_main = lambda: exec('allocator.preload()', {'__name__': '__main__', 'allocator': allocator})
  monkeypatch.setattr(allocator, 'accelerator_backend', lambda: 'gpu')
  run_as_main()
  assert execs == []
  if allocator.library_path() is None or os.uname().machine not in ('x86_64', 'aarch64'):
    return  # No mimalloc here: the CPU case below has nothing to preload.
  monkeypatch.setattr(allocator, 'accelerator_backend', lambda: None)
  monkeypatch.setattr(sys, 'argv', [allocator.__file__])  # A script file (xdist workers run `-c`).
  run_as_main()  # The CPU: re-executes on mimalloc (execve is the fake here).
  assert len(execs) == 1 and 'mimalloc' in execs[0][2]['LD_PRELOAD']


def test_default_run_is_pinned_to_the_cpu():
  import conftest
  assert os.environ['JAX_PLATFORMS'] == 'cpu' and jax.default_backend() == 'cpu'
  assert os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  assert conftest.gpu_tier('gpu') and conftest.gpu_tier('gpu and not slow')
  assert not conftest.gpu_tier('') and not conftest.gpu_tier('not gpu')


# Largest |loss_bf16 - loss_f32| allowed at any of the 60 steps below (measured 6.0e-4 here: the
# `gpu` preset's settings at the `tiny` size, dropout 0.1, lr 3e-3; the same batches and masks).
BF16_TOLERANCE = 2e-3


def train_losses(dtype: str, steps: int = 60) -> np.ndarray:
  """Per-step losses of the `tiny` model with the `gpu` preset's model settings (dropout 0.1)."""
  from gpt_jax import optim
  from gpt_jax.training.step import init_train_state, train_step

  from conftest import make_synthetic_text
  text = make_synthetic_text()
  chars = sorted(set(text))
  data = jnp.asarray(np.array([chars.index(c) for c in text], np.uint16))
  c = shakespeare.get_config('tiny')
  gpu = shakespeare.get_config('gpu').model
  c.model.update(dtype=dtype, attention=gpu.attention, attention_dropout=gpu.attention_dropout,
                 dropout=0.1)
  c.train.update(max_steps=steps, lr_decay_steps=steps, learning_rate=3e-3)
  m = model_config_from(c, len(chars))
  state = init_train_state(m, c.train)
  step = jax.jit(functools.partial(train_step, model=GPT(m), batch_size=c.train.batch_size,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(c.train)))
  out = []
  for _ in range(steps):
    state, met = step(state, data)
    out.append(float(met['loss']))
  return np.array(out)


@pytest.mark.slow
def test_bf16_training_tracks_float32():
  f32, bf16 = train_losses('float32'), train_losses('bfloat16')
  print(f'max |bf16 - f32| = {np.abs(bf16 - f32).max():.2e}')
  assert f32[-1] < f32[0] - 1.0  # It learns.
  assert np.abs(bf16 - f32).max() < BF16_TOLERANCE
