"""Measurements behind scripts/bench.py: train-step speed, compile time, generation speed, memory.

Every figure is measured in the calling process, side by side with its PyTorch counterpart when
asked (gpt_jax/lab/torch_ref.py, nanoGPT-style eager PyTorch), so ratios compare runs on the same
machine under the same load. Nothing here is used by training itself.

Two model/batch settings are named after the issue that set the targets:
  * 'baby': nanoGPT's CPU config (4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0);
  * 'char': nanoGPT's shakespeare_char config (6/6/384, block 256, batch 64, dropout 0.2).
"""

from __future__ import annotations

import functools
import math
import os
import resource
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import config as config_lib, optim, sampling
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.model import GPT, init_params
from gpt_jax.training import metrics as metrics_lib, step as step_lib

SETTINGS = {
    'baby': (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0), 12),
    'char': (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2), 64),
    'tiny': (dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0), 8),  # For tests.
}
VOCAB = 65  # TinyShakespeare's characters; speed does not depend on what the tokens are.


def setting(name: str, dtype: str = 'float32') -> tuple[ModelConfig, int]:
  """(model config, batch size) of a named setting."""
  if name not in SETTINGS:
    raise ValueError(f'unknown setting {name!r}; known: {", ".join(SETTINGS)}')
  model, batch = SETTINGS[name]
  return ModelConfig(vocab_size=VOCAB, dtype=dtype, **model), batch


# --- memory -----------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
  """Restarts the kernel's peak-RSS counter (Linux: VmHWM); False where that is not possible."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_mb() -> float:
  """Peak resident memory of this process since the last `reset_peak_rss` (or since start), MB."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB.


# --- timing helpers --------------------------------------------------------------------------------

def _best_of(fn: Callable[[], Any], repeats: int, inner: int) -> float:
  """Best mean seconds per call over `repeats` rounds of `inner` calls (fn must block)."""
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    best = min(best, (time.perf_counter() - t0) / inner)
  return best


def synthetic_tokens(n: int = 200_000, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint16)


# --- training ---------------------------------------------------------------------------------------

def _compiled_train_step(cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, batch_size: int,
                         data: jax.Array) -> tuple[Any, Any, float]:
  """(compiled train_step, a fresh state, compile seconds) for `batch_size` rows drawn from `data`."""
  tcfg = ml_collections.ConfigDict(train_cfg.to_dict())
  tcfg.batch_size = batch_size
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(cfg), batch_size=batch_size,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(tcfg)),
                 donate_argnums=0)
  state = step_lib.init_train_state(cfg, tcfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  return compiled, state, time.perf_counter() - t0


def jax_train(cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, batch_size: int, steps: int,
              repeats: int = 2) -> dict:
  """The project's jitted train_step (batch drawn on device, AdamW, clipping): speed and memory.

  `train_cfg`: a run config's `train` section (the optimizer; the speed does not depend on its values).
  """
  data = jnp.asarray(synthetic_tokens())
  reset_peak_rss()
  compiled, state, compile_s = _compiled_train_step(cfg, train_cfg, batch_size, data)
  t0 = time.perf_counter()
  state, m = compiled(state, data)
  m['loss'].block_until_ready()
  first_step_s = time.perf_counter() - t0

  def run():
    nonlocal state
    state, metrics = compiled(state, data)
    metrics['loss'].block_until_ready()

  dt = _best_of(run, repeats, steps)
  tokens = batch_size * cfg.block_size
  return {'ms_per_step': 1e3 * dt, 'tokens_per_s': tokens / dt, 'compile_s': compile_s,
          'first_step_s': first_step_s, 'peak_rss_mb': peak_rss_mb(),
          'model_tflops': config_lib.flops_per_token(cfg) * tokens / dt / 1e12}


def train_side_by_side(variants: dict[str, tuple[ModelConfig, ml_collections.ConfigDict]],
                       rounds: int = 5, steps: int = 5) -> dict[str, dict]:
  """Train-step speed of several variants of one run, timed in turns in this process.

  `variants`: name -> (model config, train section with its batch size and optimizer). Every step is
  compiled and run once first; then each round times `steps` steps of every variant in turn (each
  round starting one variant later), and the best round counts. A load that changes slowly falls on
  every variant alike, so the ratios are fair where separate processes (one after another) would
  compare different moments. Also reported: XLA's
  cost analysis of each compiled step (flops and bytes accessed), which does not depend on the machine.
  """
  data = jnp.asarray(synthetic_tokens())
  runs, out = {}, {}
  for name, (cfg, tcfg) in variants.items():
    batch = int(tcfg.batch_size)
    compiled, state, compile_s = _compiled_train_step(cfg, tcfg, batch, data)
    state, m = compiled(state, data)
    m['loss'].block_until_ready()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list in older JAX versions.
    runs[name] = [compiled, state]
    out[name] = {'compile_s': compile_s, 'gflop': float(cost.get('flops', 0.0)) / 1e9,
                 'gb_accessed': float(cost.get('bytes accessed', 0.0)) / 1e9,
                 'tokens_per_step': batch * cfg.block_size, 'ms_per_step': math.inf}
  names = list(runs)
  for r in range(rounds):
    # Each round starts one variant later: the first in a round was measured slower than the same
    # program later in it (a variant listed twice), so no variant may always take that place.
    for name in names[r % len(names):] + names[:r % len(names)]:
      run = runs[name]
      compiled, state = run
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = compiled(state, data)
      m['loss'].block_until_ready()
      run[1] = state
      out[name]['ms_per_step'] = min(out[name]['ms_per_step'], 1e3 * (time.perf_counter() - t0) / steps)
  first = out[next(iter(out))]
  for r in out.values():
    r['vs_first'] = r['ms_per_step'] / first['ms_per_step']
    r['tokens_per_s'] = r['tokens_per_step'] / r['ms_per_step'] * 1e3
  return out


def torch_train(cfg: ModelConfig, train_cfg: ml_collections.ConfigDict, batch_size: int, steps: int,
                repeats: int = 2) -> dict:
  """nanoGPT-style eager PyTorch step (gpt_jax/lab/torch_ref.py): random batch, forward, backward,
  clip_grad_norm_, AdamW, zero_grad, all in float32 on the same CPU threads."""
  from gpt_jax.lab import torch_ref
  torch = torch_ref.require_torch()
  tcfg = ml_collections.ConfigDict(train_cfg.to_dict())
  reset_peak_rss()
  model = torch_ref.build_model(cfg)
  model.train()
  opt = torch_ref.make_optimizer(model, tcfg)
  data = torch.from_numpy(synthetic_tokens().astype(np.int64))
  T = cfg.block_size

  def run():
    ix = torch.randint(len(data) - T, (batch_size,))
    x = torch.stack([data[i:i + T] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
    _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)

  run()  # Warm-up (allocator, first-call dispatch).
  dt = _best_of(run, repeats, steps)
  tokens = batch_size * T
  return {'ms_per_step': 1e3 * dt, 'tokens_per_s': tokens / dt, 'peak_rss_mb': peak_rss_mb(),
          'threads': torch.get_num_threads(),
          'model_tflops': config_lib.flops_per_token(cfg) * tokens / dt / 1e12}


# --- generation -------------------------------------------------------------------------------------

def jax_generate(cfg: ModelConfig, batch_size: int, new_tokens: int, repeats: int = 2) -> dict:
  """The jitted KV-cache sampling loop (gpt_jax/sampling.py, default window shift), from one token."""
  params = init_params(cfg, jax.random.PRNGKey(0))
  prompt = jnp.zeros((batch_size, 1), jnp.int32)
  key = jax.random.PRNGKey(1)
  gen = lambda: sampling.generate(params, cfg, prompt, new_tokens, key, 0.8, 200).block_until_ready()
  reset_peak_rss()
  t0 = time.perf_counter()
  gen()
  first_s = time.perf_counter() - t0  # Includes compilation.
  dt = _best_of(gen, repeats, 1)
  return {'tokens_per_s': batch_size * new_tokens / dt, 'seconds': dt, 'first_call_s': first_s,
          'peak_rss_mb': peak_rss_mb()}


def torch_generate(cfg: ModelConfig, batch_size: int, new_tokens: int) -> dict:
  """nanoGPT's `generate`: no KV cache; each new token re-runs the model on the last block_size
  tokens (temperature 0.8, top-k 200, multinomial draw), under torch.no_grad, float32."""
  from gpt_jax.lab import torch_ref
  torch = torch_ref.require_torch()
  model = torch_ref.build_model(cfg)
  model.eval()
  idx = torch.zeros((batch_size, 1), dtype=torch.long)
  reset_peak_rss()
  t0 = time.perf_counter()
  with torch.no_grad():
    for _ in range(new_tokens):
      idx_cond = idx[:, -cfg.block_size:]
      logits, _ = model(idx_cond)
      logits = logits[:, -1, :] / 0.8
      v, _ = torch.topk(logits, min(200, logits.size(-1)))
      logits[logits < v[:, [-1]]] = -float('inf')
      nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
      idx = torch.cat((idx, nxt), dim=1)
  dt = time.perf_counter() - t0
  return {'tokens_per_s': batch_size * new_tokens / dt, 'seconds': dt, 'peak_rss_mb': peak_rss_mb()}


def weight_stream_gbs(cfg: ModelConfig, repeats: int = 20) -> float:
  """GB/s at which XLA streams float32 weight matrices through batch-1 matrix-vector products.

  Batch-1 generation must read every weight once per token, so parameter bytes / this rate is
  the floor of its time per token (`batch1_ceiling_tok_s` in scripts/bench.py). Measured on
  matrix pairs (C, 4C) and (4C, C) of the model's width with as many bytes as the model's weights,
  chained through tanh so that nothing can be hoisted out of the timed loop.
  """
  C = cfg.n_embd
  n_pairs = max(1, round(weight_bytes(cfg) / (8 * C * C * 4)))
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * n_pairs)
  mats = [jax.random.normal(k, (C, 4 * C) if i % 2 == 0 else (4 * C, C)) * 0.02
          for i, k in enumerate(keys)]

  @jax.jit
  def stream(mats, x):
    def body(_, x):
      for m in mats:
        x = jnp.tanh(x @ m)
      return x
    return jax.lax.fori_loop(0, repeats, body, x)

  x = jnp.ones((1, C), jnp.float32)
  dt = _best_of(lambda: stream(mats, x).block_until_ready(), 3, 1)
  return sum(m.size * 4 for m in mats) * repeats / dt / 1e9


def weight_bytes(cfg: ModelConfig) -> int:
  """float32 bytes of the model's parameters, all of which one generated token reads."""
  return 4 * num_params(cfg)


def matmul_peak_tflops() -> float:
  """float32 GEMM throughput XLA reaches on this machine (the MFU denominator on a CPU)."""
  return metrics_lib.peak_flops(0.0)[0] / 1e12


def environment() -> dict:
  import jaxlib
  info = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count()}
  try:
    import torch
    info['torch'] = torch.__version__
  except ImportError:
    pass
  return info
