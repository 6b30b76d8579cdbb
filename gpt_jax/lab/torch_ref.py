"""A PyTorch reference for the JAX model: the same GPT-2, nanoGPT-style, with exact weight transfer.

Everything here mirrors a JAX counterpart so the two can be run side by side (see gpt_jax/lab/torch_compare.py):

  * `build_model(cfg)`: GPT-2 as eager `nn.Module`s written the way nanoGPT writes them
    (`F.scaled_dot_product_attention(..., is_causal=True)`, LayerNorm with optional bias and eps 1e-5,
    exact or tanh GELU per `cfg.gelu_approximate`, the head tied to `wte`). Module names are nanoGPT's
    (`transformer.wte`, `transformer.h.0.attn.c_attn`, ..., `lm_head`), so its checkpoints would load.
  * `jax_to_torch` / `torch_to_jax`: exact, lossless weight transfer. A Flax kernel is (in, out) and a
    torch `Linear.weight` is (out, in), so kernels are transposed; `c_attn` stays q, k, v concatenated in
    the same order on both sides (and heads are split the same way: head h owns columns h*D:(h+1)*D).
  * `make_optimizer` + `TorchTrainer.step`: `torch.optim.AdamW` with nanoGPT's two parameter groups
    (decay for dim >= 2, none otherwise), `clip_grad_norm_`, and the learning rate of each step set
    from gpt_jax.optim's schedule, so both sides apply identical learning rates.

torch is an optional (dev) dependency: it is imported lazily, and a missing install is a UserError.
"""

from __future__ import annotations

import functools
import math
import time
import types
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError

TORCH_REQUIREMENT = 'torch==2.13.0'
LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon, as in gpt_jax.model.


def require_torch() -> Any:
  """Imports torch, or explains how to install it (a CPU wheel is enough for the comparison)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f'PyTorch is needed for the JAX-vs-PyTorch comparison but is not installed; '
                    f'install it with `pip install {TORCH_REQUIREMENT}` (a dev-only requirement, '
                    'listed in requirements-dev.txt; on a machine without a GPU add '
                    '`--index-url https://download.pytorch.org/whl/cpu` to skip the CUDA '
                    'libraries).') from None
  return torch


@functools.lru_cache(maxsize=None)
def _modules() -> types.SimpleNamespace:
  """Defines the nn.Module classes on first use, so importing this file never imports torch."""
  torch = require_torch()
  nn = torch.nn
  F = torch.nn.functional

  class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(ndim))
      self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
      return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LN_EPS)

  class CausalSelfAttention(nn.Module):

    def __init__(self, cfg: ModelConfig):
      super().__init__()
      self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
      self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
      self.resid_dropout = nn.Dropout(cfg.dropout)
      self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x):
      B, T, C = x.shape
      q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
      q, k, v = (a.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for a in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                         dropout_p=self.dropout if self.training else 0.0)
      y = y.transpose(1, 2).contiguous().view(B, T, C)
      return self.resid_dropout(self.c_proj(y))

  class MLP(nn.Module):

    def __init__(self, cfg: ModelConfig):
      super().__init__()
      self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
      self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
      self.dropout = nn.Dropout(cfg.dropout)
      self.approximate = 'tanh' if cfg.gelu_approximate else 'none'

    def forward(self, x):
      return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))

  class Block(nn.Module):

    def __init__(self, cfg: ModelConfig):
      super().__init__()
      self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
      self.attn = CausalSelfAttention(cfg)
      self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
      self.mlp = MLP(cfg)

    def forward(self, x):
      x = x + self.attn(self.ln_1(x))
      return x + self.mlp(self.ln_2(x))

  class GPT(nn.Module):
    """forward(idx, targets=None) -> (logits (B, T, V), mean cross-entropy or None)."""

    def __init__(self, cfg: ModelConfig):
      super().__init__()
      self.config = cfg
      self.transformer = nn.ModuleDict(dict(
          wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
          wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
          drop=nn.Dropout(cfg.dropout),
          h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
          ln_f=LayerNorm(cfg.n_embd, cfg.bias),
      ))
      self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
      self.transformer.wte.weight = self.lm_head.weight  # Weight tying, as nanoGPT.
      # GPT-2 init, as nanoGPT (only matters when the weights are not transferred from JAX).
      for name, p in self.named_parameters():
        if p.dim() >= 2:
          std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith('c_proj.weight') else 0.02
          torch.nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith('bias'):
          torch.nn.init.zeros_(p)

    def forward(self, idx, targets=None):
      T = idx.shape[1]
      if T > self.config.block_size:
        raise ValueError(f'sequence length {T} exceeds block_size {self.config.block_size}')
      pos = torch.arange(T, dtype=torch.long, device=idx.device)
      x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
      for block in self.transformer.h:
        x = block(x)
      logits = self.lm_head(self.transformer.ln_f(x))
      loss = None
      if targets is not None:
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
      return logits, loss

  return types.SimpleNamespace(GPT=GPT, Block=Block, LayerNorm=LayerNorm)


def build_model(cfg: ModelConfig) -> Any:
  """A float32 PyTorch GPT with nanoGPT's initialisation (overwrite it with `jax_to_torch`)."""
  if cfg.non_gpt2_options():
    raise UserError(f'the PyTorch reference is nanoGPT\'s GPT-2, without '
                    f'{", ".join(cfg.non_gpt2_options())}; compare a model with those options off.')
  if cfg.dtype != 'float32':
    raise UserError(f'the PyTorch reference runs in float32 only (model.dtype is {cfg.dtype!r}); '
                    "pass --config.model.dtype=float32.")
  return _modules().GPT(cfg).float()


# ---------------------------------------------------------------------------------------------------
# Weight transfer.

def param_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, bool]]:
  """(Flax path, torch parameter name, transpose?) for every parameter, in a fixed order.

  The tied head has no entry of its own: `lm_head.weight` *is* `transformer.wte.weight`.
  """
  rows: list[tuple[tuple[str, ...], str, bool]] = [
      (('wte',), 'transformer.wte.weight', False),
      (('wpe',), 'transformer.wpe.weight', False),
  ]

  def ln(flax_prefix: tuple[str, ...], torch_prefix: str) -> None:
    rows.append((flax_prefix + ('scale',), f'{torch_prefix}.weight', False))
    if cfg.bias:
      rows.append((flax_prefix + ('bias',), f'{torch_prefix}.bias', False))

  def linear(flax_prefix: tuple[str, ...], torch_prefix: str) -> None:
    rows.append((flax_prefix + ('kernel',), f'{torch_prefix}.weight', True))  # (in, out) <-> (out, in)
    if cfg.bias:
      rows.append((flax_prefix + ('bias',), f'{torch_prefix}.bias', False))

  for i in range(cfg.n_layer):
    f, t = f'h_{i}', f'transformer.h.{i}'
    ln((f, 'ln_1'), f'{t}.ln_1')
    linear((f, 'attn', 'c_attn'), f'{t}.attn.c_attn')
    linear((f, 'attn', 'c_proj'), f'{t}.attn.c_proj')
    ln((f, 'ln_2'), f'{t}.ln_2')
    linear((f, 'mlp', 'c_fc'), f'{t}.mlp.c_fc')
    linear((f, 'mlp', 'c_proj'), f'{t}.mlp.c_proj')
  ln(('ln_f',), 'transformer.ln_f')
  return rows


def _get(tree: Any, path: Sequence[str]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _flax_paths(tree: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
  if hasattr(tree, 'items'):
    return set().union(*(_flax_paths(v, prefix + (k,)) for k, v in tree.items()))
  return {prefix}


def _check_same_names(cfg: ModelConfig, params: Any, model: Any) -> None:
  rows = param_map(cfg)
  missing = _flax_paths(params) ^ {r[0] for r in rows}
  torch_names = {n for n, _ in model.named_parameters()}
  missing_t = torch_names ^ {r[1] for r in rows}
  if missing or missing_t:
    raise ValueError(f'parameter sets differ: flax {sorted(missing)}, torch {sorted(missing_t)}')


def jax_to_torch(params: Any, model: Any) -> Any:
  """Copies Flax params into `model` in place (bit-exact; kernels transposed). Returns `model`."""
  torch = require_torch()
  cfg = model.config
  _check_same_names(cfg, params, model)
  tparams = dict(model.named_parameters())
  with torch.no_grad():
    for fpath, tname, transpose in param_map(cfg):
      a = np.asarray(_get(params, fpath), dtype=np.float32)
      a = np.array(a.T if transpose else a, dtype=np.float32, order='C')  # A writable copy.
      dst = tparams[tname]
      if tuple(dst.shape) != a.shape:
        raise ValueError(f'{"/".join(fpath)} {a.shape} does not fit {tname} {tuple(dst.shape)}')
      dst.copy_(torch.from_numpy(a))
  return model


def torch_to_jax(model: Any, tensors: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """The Flax parameter tree (nested dicts of float32 numpy arrays) of `model`.

  With `tensors` (torch name -> tensor, e.g. the gradients), converts those instead of the weights.
  """
  tensors = tensors if tensors is not None else dict(model.named_parameters())
  out: dict[str, Any] = {}
  for fpath, tname, transpose in param_map(model.config):
    a = tensors[tname].detach().cpu().numpy().astype(np.float32, copy=True)
    node = out
    for k in fpath[:-1]:
      node = node.setdefault(k, {})
    node[fpath[-1]] = np.ascontiguousarray(a.T if transpose else a)
  return out


def grads_to_jax(model: Any) -> dict[str, Any]:
  """The current `.grad` of every parameter, laid out as a Flax tree (kernels transposed back)."""
  return torch_to_jax(model, {n: p.grad for n, p in model.named_parameters()})


def group_of(torch_name: str) -> str:
  """The per-layer group a parameter belongs to: 'wte', 'wpe', 'h_3', 'ln_f' (the JAX top-level key)."""
  parts = torch_name.split('.')
  if parts[1] == 'h':
    return f'h_{parts[2]}'
  return parts[1]


# ---------------------------------------------------------------------------------------------------
# Optimizer and training step.

def make_optimizer(model: Any, train_cfg: Any) -> Any:
  """torch AdamW with nanoGPT's groups: weight decay for dim >= 2 tensors only (as gpt_jax.optim).

  The learning rate is set per step by `TorchTrainer.step` from gpt_jax.optim's schedule.
  """
  torch = require_torch()
  params = [p for p in model.parameters() if p.requires_grad]  # Tied weight counted once.
  groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': train_cfg.weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
  return torch.optim.AdamW(groups, lr=0.0, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8)


def _norm(tensors: Iterable[Any]) -> float:
  """Global L2 norm, summed in float64 (metrics only; the clipping norm is clip_grad_norm_'s own)."""
  return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class TorchTrainer:
  """Owns a torch GPT and its AdamW; `step` does one update and returns the same metrics as JAX."""

  def __init__(self, model_cfg: ModelConfig, train_cfg: Any, params: Any, seed: int = 0,
               float64: bool = False):
    """`float64`: train in double precision (from the same float32 weights), as a stand-in for
    exact arithmetic that both float32 sides can be measured against."""
    if train_cfg.get('optimizer') == 'muon':
      raise UserError('the PyTorch reference trains with AdamW only; compare with train.optimizer=adamw.')
    self.torch = require_torch()
    self.torch.manual_seed(seed)  # Only dropout masks draw from it; weights come from `params`.
    self.model = jax_to_torch(params, build_model(model_cfg))
    if float64:
      self.model.double()  # Before the optimizer exists, so its state is created in float64 too.
    self.optimizer = make_optimizer(self.model, train_cfg)
    self.grad_clip = float(train_cfg.grad_clip)
    self.grad_accum_steps = int(train_cfg.grad_accum_steps)
    self.named = [(n, p) for n, p in self.model.named_parameters()]
    self.groups = sorted({group_of(n) for n, _ in self.named}, key=_group_order)

  def _grouped(self, tensors: Sequence[Any]) -> dict[str, float]:
    out = {}
    for g in self.groups:
      out[g] = _norm(t for (n, _), t in zip(self.named, tensors) if group_of(n) == g)
    return out

  def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[dict[str, Any], float]:
    """One optimizer update on (x, y) (all micro-batches stacked along the batch axis).

    Returns (metrics, seconds spent in forward/backward/clip/update, excluding metric bookkeeping).
    """
    torch, model = self.torch, self.model
    model.train()
    xs = torch.from_numpy(np.array(x, np.int64)).chunk(self.grad_accum_steps)
    ys = torch.from_numpy(np.array(y, np.int64)).chunk(self.grad_accum_steps)
    old = [p.detach().clone() for _, p in self.named]
    t0 = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for xb, yb in zip(xs, ys):
      _, loss = model(xb, yb)
      (loss / self.grad_accum_steps).backward()  # Mean over micro-batches, as train_step.
      loss_sum += float(loss.detach())
    seconds = time.perf_counter() - t0
    # Per-layer norms must be read before clip_grad_norm_ rescales the gradients in place.
    grads = [p.grad for _, p in self.named]
    layer_norms = self._grouped(grads)
    t0 = time.perf_counter()
    # Returns the norm before clipping; with no clipping configured, max_norm=inf scales by exactly 1.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        model.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf))
    for group in self.optimizer.param_groups:
      group['lr'] = lr
    self.optimizer.step()
    seconds += time.perf_counter() - t0
    new = [p.detach() for _, p in self.named]
    deltas = [n - o for n, o in zip(new, old)]
    old_layer, delta_layer = self._grouped(old), self._grouped(deltas)
    metrics = {
        'loss': loss_sum / self.grad_accum_steps, 'lr': lr, 'grad_norm': grad_norm,
        'param_norm': _norm(new), 'update_ratio': _norm(deltas) / _norm(old),
        'grad_norm_layers': layer_norms,
        'update_ratio_layers': {g: delta_layer[g] / old_layer[g] for g in self.groups},
    }
    return metrics, seconds

  def eval_loss(self, xs: np.ndarray, ys: np.ndarray) -> float:
    """Mean loss over stacked batches xs, ys of shape (num_batches, B, T), dropout off."""
    torch = self.torch
    self.model.eval()
    total = 0.0
    with torch.no_grad():
      for xb, yb in zip(xs, ys):
        _, loss = self.model(torch.from_numpy(np.array(xb, np.int64)),
                             torch.from_numpy(np.array(yb, np.int64)))
        total += float(loss)
    return total / len(xs)

  def params(self) -> dict[str, Any]:
    return torch_to_jax(self.model)


def _group_order(g: str) -> tuple[int, int]:
  """Sort key giving wte, wpe, h_0, h_1, ..., ln_f."""
  if g.startswith('h_'):
    return (1, int(g[2:]))
  return {'wte': (0, 0), 'wpe': (0, 1)}.get(g, (2, 0))


# ---------------------------------------------------------------------------------------------------
# Checks at initialisation.

def compare_at_init(params: Any, model_cfg: ModelConfig, x: np.ndarray, y: np.ndarray) -> dict:
  """Logits and gradients of the same weights on the same batch, JAX vs PyTorch (dropout off).

  Returns max |logits diff|, the max over tensors of ||g_torch - g_jax|| / ||g_jax|| and the loss of
  each side.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from gpt_jax.model import GPT  # pylint: disable=import-outside-toplevel
  from gpt_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  torch = require_torch()
  jmodel = GPT(model_cfg)
  x, y = np.asarray(x, np.int32), np.asarray(y, np.int32)

  @jax.jit
  def forward_backward(params, x, y):
    loss, grads = jax.value_and_grad(step_lib.loss_fn)(params, jmodel, x, y, None)
    return jmodel.apply({'params': params}, x), loss, grads

  jlogits, jloss, jgrads = jax.device_get(forward_backward(params, x, y))

  tmodel = jax_to_torch(params, build_model(model_cfg)).eval()
  tlogits, tloss = tmodel(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
  tloss.backward()
  tgrads = grads_to_jax(tmodel)

  rel = {}
  for fpath, _, _ in param_map(model_cfg):
    gj = np.asarray(_get(jgrads, fpath), np.float64)
    gt = np.asarray(_get(tgrads, fpath), np.float64)
    rel['/'.join(fpath)] = float(np.linalg.norm(gt - gj) / max(np.linalg.norm(gj), 1e-30))
  return {
      'logits_max_abs_diff': float(np.max(np.abs(tlogits.detach().numpy() - jlogits))),
      'grad_max_rel_diff': max(rel.values()),
      'grad_rel_diff': rel,
      'loss_jax': float(jloss), 'loss_torch': float(tloss.detach()),
  }
