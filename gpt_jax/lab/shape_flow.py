"""Shape flow: every module of the GPT with its input -> output shapes, parameters and FLOPs per token.

The shapes are recorded, not derived: the model is traced abstractly (`jax.eval_shape`, nothing is
computed) with a Flax method interceptor that notes each module call's arguments and results. The
parameter counts come from the actual parameter tree. The FLOPs follow the estimate that
`gpt_jax.config.flops_per_token` uses (PaLM appendix B, nanoGPT's `estimate_mfu`), split per module so
that the column adds up to it exactly:

  * every parameter that takes part in a matmul costs 2 FLOPs per token forward and 4 backward (one
    product for the input gradient, one for the weight gradient): 6 per parameter per token. The 6N
    rule applies it to every non-embedding parameter, LayerNorm scales and biases included, which is a
    bookkeeping convention (they cost a few elementwise FLOPs, not a multiply-add each);
  * the token table `wte` is looked up (free) but is also the output layer (tied weights), so the LM
    head row carries its 6 V C; the position table `wpe` is only looked up, so it costs nothing
    (rotary models have none: their rotation of q and k is elementwise and not counted, like the
    softmax; qk_norm's scales count as any LayerNorm's);
  * attention itself (q k^T and att @ v) has no parameters: 2 * 2 * T * C FLOPs per token forward,
    x3 for forward + backward = 12 T C per layer, with T = block_size (the full square is computed,
    the causal mask only zeroes half of it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT


@dataclasses.dataclass
class Row:
  """One line of the table. `params`/`flops` are None on container rows (they'd double count)."""
  name: str          # Dotted module path, e.g. 'h_0.attn.c_attn'.
  kind: str          # Module class or what the line stands for.
  depth: int         # Nesting depth, for indentation.
  inputs: str        # Input shape(s).
  output: str        # Output shape(s).
  params: Optional[int] = None
  fwd_flops: Optional[int] = None    # Forward FLOPs per token.
  subtotal: Optional[tuple[int, int]] = None  # (params, train FLOPs) of a container's leaves.

  @property
  def train_flops(self) -> Optional[int]:
    return None if self.fwd_flops is None else 3 * self.fwd_flops  # Backward = 2x forward.


def _shape_str(tree: Any) -> str:
  """Shapes of the arrays in a call's arguments or results, e.g. '(B,T,C)=(12, 64, 128)'."""
  shapes = [tuple(a.shape) for a in jax.tree_util.tree_leaves(tree) if hasattr(a, 'shape')]
  shapes = [s for s in shapes if s]  # Drop scalars such as `pos`.
  return ', '.join(str(s).replace(' ', '') for s in shapes) or '-'


def _count(tree: Any) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def shape_flow(cfg: ModelConfig, batch_size: int = 1) -> list[Row]:
  """The table rows, in execution order, for a (batch_size, block_size) input."""
  B, T, C, V, H = batch_size, cfg.block_size, cfg.n_embd, cfg.vocab_size, cfg.n_head
  D = cfg.head_size
  model = GPT(cfg)
  idx = jax.ShapeDtypeStruct((B, T), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32)))
  params = params['params']

  calls: list[dict] = []  # Pre-order: a slot is taken on entry and filled on return.

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name not in ('__call__', '_forward'):
      return next_fun(*args, **kwargs)
    slot = {'path': context.module.path, 'kind': type(context.module).__name__,
            'method': context.method_name, 'inputs': _shape_str((args, kwargs))}
    calls.append(slot)
    out = next_fun(*args, **kwargs)
    slot['output'] = _shape_str(out)
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda p, x: model.apply({'params': p}, x), params, idx)

  def params_at(path: tuple[str, ...]) -> Any:
    node = params
    for k in path:
      node = node[k]
    return node

  rows: list[Row] = []
  emb = f'({B},{T},{C})'
  for call in calls:
    path, kind = tuple(call['path']), call['kind']
    name = '.'.join(path) or 'GPT'
    depth = len(path)
    if kind == 'Dropout' or (kind == 'GPT' and call['method'] != '__call__'):
      continue  # Dropout has no parameters and keeps the shape; GPT is listed once, at the top.
    if kind == 'GPT':  # The first call: the embeddings come before every block.
      rows.append(Row('GPT', 'GPT', 0, call['inputs'], call['output']))
      rows.append(Row('wte', 'token embedding (lookup)', 1, f'({B},{T}) ids', emb,
                      params=_count(params['wte']), fwd_flops=0))
      if 'wpe' in params:  # A rotary model has no position table (positions rotate q, k instead).
        rows.append(Row('wpe', 'position embedding (lookup)', 1, f'({T},) positions', f'({T},{C})',
                        params=_count(params['wpe']), fwd_flops=0))
      continue
    if kind in ('Linear', 'LayerNorm', 'RMSNorm'):
      n = _count(params_at(path))
      rows.append(Row(name, kind, depth, call['inputs'], call['output'], params=n, fwd_flops=2 * n))
      if name.endswith('attn.c_attn'):  # The parameter-free attention core runs between the two.
        qkv = f'({B},{T},{H},{D})'
        rows.append(Row(name[:-len('c_attn')] + 'softmax(qk^T)v', f'attention, {H} heads', depth,
                        f'q,k,v {qkv}', f'{qkv}; probs ({B},{H},{T},{T})', params=0,
                        fwd_flops=4 * T * C))
    else:  # Containers: Block, CausalSelfAttention, MLP.
      rows.append(Row(name, kind, depth, call['inputs'], call['output']))

  rows.append(Row('lm_head', 'x @ wte.T (tied to wte)', 1, emb, f'({B},{T},{V})', params=0,
                  fwd_flops=2 * V * C))

  # Subtotals of containers (sum of the leaves below them).
  for r in rows:
    if r.params is None and r.name != 'GPT':
      leaves = [s for s in rows if s.params is not None and s.name.startswith(r.name + '.')]
      r.subtotal = (sum(s.params for s in leaves), sum(s.train_flops for s in leaves))
  return rows


def totals(rows: list[Row]) -> tuple[int, int]:
  """(parameters, training FLOPs per token) summed over the leaf rows."""
  leaves = [r for r in rows if r.params is not None]
  return sum(r.params for r in leaves), sum(r.train_flops for r in leaves)


def _fmt(n: Optional[int]) -> str:
  return '' if n is None else f'{n:,}'


def format_table(rows: list[Row], cfg: ModelConfig) -> str:
  """The rows as one aligned text table, with totals and the model's own counts beside them."""
  from gpt_jax.config import flops_per_token, num_params
  head = ('module', 'type', 'input', 'output', 'params', 'FLOPs/token (fwd+bwd)')
  body = []
  for r in rows:
    name = '  ' * r.depth + r.name.split('.')[-1] if r.depth > 1 else '  ' * r.depth + r.name
    if r.subtotal is not None:
      p, f = (f'[{_fmt(r.subtotal[0])}]', f'[{_fmt(r.subtotal[1])}]')
    else:
      p, f = _fmt(r.params), _fmt(r.train_flops)
    body.append((name, r.kind, r.inputs, r.output, p, f))
  n_params, n_flops = totals(rows)
  body.append(('total', '', '', '', _fmt(n_params), _fmt(n_flops)))
  widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
  right = {4, 5}

  def fmt(line):
    return '  '.join(s.rjust(w) if i in right else s.ljust(w)
                     for i, (s, w) in enumerate(zip(line, widths))).rstrip()

  sep = '-' * len(fmt(head))
  lines = [fmt(head), sep] + [fmt(l) for l in body[:-1]] + [sep, fmt(body[-1])]
  ref_p, ref_f = num_params(cfg), flops_per_token(cfg)
  ok = 'matches' if (n_params, n_flops) == (ref_p, ref_f) else 'DOES NOT MATCH'
  lines += ['', f'[..] = subtotal of the rows below. Model counts: num_params = {ref_p:,}, '
            f'config.flops_per_token = {ref_f:,.0f} ({ok}).',
            'FLOPs: 6 per parameter per token (2 forward, 4 backward) plus 12*T*C per layer for '
            'attention; the lookups (wte, wpe) are free and the LM head reuses wte.']
  return '\n'.join(lines)
