"""The train step, the eval step and the sampler lowered for CUDA on this CPU-only machine.

JAX lowers a jitted function for another platform without its device (`.trace(...).lower(
lowering_platforms=('cuda',))`): this proves the GPU programs build, for the default preset and the
`gpu` preset, on one device and on eight (simulated with --xla_force_host_platform_device_count).
From the eight-device program the batch and the dropout bits must be sharded over the devices, not
replicated. Programs are lowered at each preset's model size; only the batch is made smaller.

Without the CUDA plugin JAX cannot lower cuDNN attention ("cuDNN is not detected"), so here the
`gpu` preset lowers with model.attention='auto' resolved for the CPU, i.e. XLA attention; its cuDNN
program is lowered by the gpu-marked test at the end, which runs where the plugin is installed.
The Pallas flash kernel lowers to Triton without it: the `gpu` preset's train step chooses it for
CUDA and is lowered with it here (compiling the Triton kernels for a GPU needs the GPU).
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import shakespeare
from gpt_jax import attention as attention_lib, optim, sample_run
from gpt_jax.config import model_config_from
from gpt_jax.model import GPT
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training.step import eval_step, init_train_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # Divides over 8 devices.


def _programs(preset: str, n_devices: int) -> dict:
  """{'train': lowered, 'eval': lowered, 'sample': lowered}: the preset's programs for CUDA."""
  c = shakespeare.get_config(preset)
  c.train.batch_size = BATCH
  cfg = model_config_from(c, 65)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:n_devices])
  abstract = jax.eval_shape(lambda: init_train_state(cfg, c.train))
  state_sh, rep = mesh_lib.state_shardings(abstract, mesh), mesh_lib.replicated(mesh)
  data = jax.ShapeDtypeStruct((100_000,), jnp.uint16)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  train = jax.jit(functools.partial(train_step, model=GPT(cfg), batch_size=BATCH, grad_accum_steps=1,
                                    schedule=optim.lr_schedule(c.train), mesh=mesh),
                  in_shardings=(state_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=GPT(cfg), batch_size=BATCH, mesh=mesh),
                     in_shardings=(state_sh.params, rep, rep), out_shardings=rep)
  prompt = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  lower = lambda f, *args, **kw: f.trace(*args, **kw).lower(lowering_platforms=('cuda',))
  out = {'train': lower(train, abstract, data), 'eval': lower(evaluate, abstract.params, data, key),
         'sample': lower(sample_run.generate_in_one_program, abstract.params, prompt, key, cfg=cfg,
                         max_new_tokens=8, temperature=0.8, top_k=200, shift=64, vocab_limit=65)}
  if n_devices > 1:  # The partitioned program, compiled for this CPU (XLA:CPU cannot compile CUDA).
    out['partitioned'] = train.trace(abstract, data).lower().compile().as_text()
  return out


def _matmul_dtypes(text: str) -> set:
  """Element types of the operands of every stablehlo.dot_general in a module."""
  return {t for line in text.splitlines() if 'dot_general' in line
          for t in re.findall(r'tensor<[\dx]+x(\w+)>', line.rsplit(': (', 1)[-1].split(') ->')[0])}


@pytest.mark.slow
@pytest.mark.parametrize('preset, dtype', [('', 'f32'), ('gpu', 'bf16')])
def test_lowers_for_cuda_on_one_device(preset, dtype):
  programs = _programs(preset, 1)
  for name, lowered in programs.items():
    text = lowered.as_text()
    assert text.startswith('module @jit_'), name
    if name != 'sample':  # The sampler also multiplies in the compute dtype, plus f32 softmax rows.
      assert _matmul_dtypes(text) >= {dtype}, (name, _matmul_dtypes(text))
  # Every GEMM of the train step, forward and backward, multiplies in the compute dtype (in the bf16
  # preset a float32 one would run as tf32, at half the rate). Attention's batched products are not
  # GEMMs of this kind: scores and softmax stay float32 (and cuDNN fuses them on a GPU).
  gemms = [l for l in programs['train'].as_text().splitlines()
           if 'dot_general' in l and re.search(r': \(tensor<\d+x\d+x[a-z]+\d+>, tensor<\d+x\d+x[a-z]+\d+>\)', l)]
  assert len(gemms) >= 3 * 4 * 6  # Forward, and both gradients, of 4 GEMMs in each of 6 blocks.
  assert {t for l in gemms for t in re.findall(r'tensor<\d+x\d+x([a-z]+\d+)>', l.rsplit(': (', 1)[-1])} == {dtype}


_WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
import jax
import test_lower_cuda as t
out = {}
for preset in ('', 'gpu'):
  progs = t._programs(preset, 8)
  out[preset] = {'devices': len(jax.devices()), 'train': progs['train'].as_text(),
                 'eval': progs['eval'].as_text(), 'sample': progs['sample'].as_text()[:200],
                 'partitioned': progs['partitioned']}
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def eight_device_programs():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _WORKER, REPO], env=env, capture_output=True, text=True,
                        cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['', 'gpu'])
def test_eight_devices_shard_the_batch_and_the_dropout_bits(eight_device_programs, preset):
  p = eight_device_programs[preset]
  assert p['devices'] == 8 and p['sample'].startswith('module @jit_generate_in_one_program')
  for name in ('train', 'eval'):
    text = p[name]
    assert 'num_partitions = 8' in text, name
    # The (B, T) token batch is pinned to the batch sharding where it is drawn (Shardy's notation).
    pins = [l for l in text.splitlines() if 'sharding_constraint' in l and f'tensor<{BATCH}x256xi32>' in l]
    assert len(pins) == 2 and all('[{"data", "fsdp"}, {}]' in l for l in pins), (name, pins)
  # After SPMD partitioning (the same partitioner for every platform; compiled here for the CPU),
  # each device holds one row of the batch, and draws 1/8 of every dropout mask's random bits: the
  # embedding dropout's (B * T * C / 2 uint32 words) never exists whole on a device.
  hlo = p['partitioned']
  shapes = set(re.findall(r'\b[su]32\[[\d,]+\]', hlo))
  words = BATCH * 256 * 384 // 2
  assert 's32[1,256]' in shapes and f's32[{BATCH},256]' not in shapes
  assert f'u32[{words // 8}]' in shapes and f'u32[{words}]' not in shapes


def test_gpu_preset_trains_with_the_flash_kernel_lowered_for_cuda():
  """The `gpu` preset's train step, attention chosen for CUDA: attention dropout runs in the Pallas
  flash kernel, lowered to Triton custom calls (forward, dk/dv and dq in each of the 6 blocks)."""
  c = shakespeare.get_config('gpu')
  c.train.batch_size = BATCH
  cfg = model_config_from(c, 65)
  abstract = jax.eval_shape(lambda: init_train_state(cfg, c.train))  # Chosen for the CPU: XLA.
  data = jax.ShapeDtypeStruct((100_000,), jnp.uint16)
  step = jax.jit(functools.partial(train_step, model=GPT(cfg), batch_size=BATCH, grad_accum_steps=1,
                                   schedule=optim.lr_schedule(c.train)))
  with attention_lib.target_platform('cuda'):
    assert attention_lib.describe_attention(cfg).startswith('flash in training, cudnn in evals')
    text = step.trace(abstract, data).lower(lowering_platforms=('cuda',)).as_text()
  calls = [l for l in text.splitlines() if '__gpu$xla.gpu.triton' in l]
  names = [re.search(r'name = "(\w+)"', l).group(1) for l in calls]
  assert sorted(set(names)) == ['flash_attention_dkv', 'flash_attention_dq', 'flash_attention_forward']
  assert len(names) == 3 * cfg.n_layer, names
  assert '__cudnn$fmha' not in text  # Training drops attention probabilities: no cuDNN.


@pytest.mark.gpu
def test_gpu_preset_lowers_with_cudnn_attention():
  """cuDNN flash attention (custom call) lowered for CUDA: the `gpu` preset's eval step (its training
  keeps attention dropout, so the Pallas flash kernel), and its train step with attention dropout off."""
  c = shakespeare.get_config('gpu')
  c.train.batch_size = BATCH
  cfg = model_config_from(c, 65)
  data = jax.ShapeDtypeStruct((100_000,), jnp.uint16)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  try:
    with attention_lib.target_platform('cuda'):
      abstract = jax.eval_shape(lambda: init_train_state(cfg, c.train))
      evaluate = jax.jit(functools.partial(eval_step, model=GPT(cfg), batch_size=BATCH))
      texts = {'eval': evaluate.trace(abstract.params, data, key).lower(
          lowering_platforms=('cuda',)).as_text()}
      for name, m in (('train', cfg), ('train without attention dropout', dataclasses.replace(
          cfg, attention_dropout=False))):
        step = jax.jit(functools.partial(train_step, model=GPT(m), batch_size=BATCH, grad_accum_steps=1,
                                         schedule=optim.lr_schedule(c.train)))
        texts[name] = step.trace(abstract, data).lower(lowering_platforms=('cuda',)).as_text()
  except RuntimeError as e:
    if 'cuDNN is not detected' in str(e):
      pytest.skip('cuDNN attention cannot be lowered without the CUDA plugin (jax[cuda12] / '
                  'jax-cuda13-plugin): "cuDNN is not detected"')
    raise
  assert '__cudnn$fmha' in texts['eval'] and '__cudnn$fmha' in texts['train without attention dropout']
  assert '__cudnn$fmha' not in texts['train']  # Attention dropout: the Pallas flash kernel.
  assert '__gpu$xla.gpu.triton' in texts['train']
