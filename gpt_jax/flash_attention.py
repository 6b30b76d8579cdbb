"""Flash attention in Pallas, with dropout on the attention probabilities decided by a hash.

Causal self-attention softmax(q k^T / sqrt(D)) v of q, k, v (B, H, T, D) that never writes the
(T, T) probabilities to memory (FlashAttention-2, Dao 2023):
  * forward: each program owns one block of query rows and walks the key blocks left of (and on) the
    diagonal, keeping a running row max m, normaliser l and unnormalised output (the online
    softmax); the blocks right of the diagonal are never touched. It saves only the output and the
    log-sum-exp lse = m + log(l) of each row.
  * backward: the probabilities are recomputed from q, k and lse (p = exp(s - lse)), once in a
    kernel that owns a block of keys (dk, dv) and once in one that owns a block of queries (dq).

Dropout. A fused kernel cannot draw its mask from jax.random (the bits would have to be written
out, which is what it exists to avoid). Instead the keep/drop decision for probability (b, h, i, j)
is a hash of (seed, b, h, i, j): the same 32-bit seed gives the same mask in the forward and both
backward kernels, in any block order, and `hashed_dropout_mask` computes it in plain JAX for the
written-out softmax. The seed comes from the step's dropout key, so a train step stays a pure
function of (seed, step) and a resumed run draws the masks of an uninterrupted one.

Shapes: B = batch, H = heads, T = positions, D = head size; a block is `block_q` query rows or
`block_k` key rows. Scores, softmax and all accumulators are float32 whatever the input dtype.
On an NVIDIA GPU the kernels compile with Triton; elsewhere (`interpret=True`) Pallas runs the
same kernel body as ordinary XLA operations: the same values, but slow (a correctness tool).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# --- the dropout hash --------------------------------------------------------------------------

# The hash counts (query, key) pairs in 16 bits each: one 32-bit counter per probability.
MAX_POSITIONS = 1 << 16
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive integers over all 32 bits.


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser on uint32: a bijection in which every input bit flips every output bit
  with probability ~1/2 (avalanche). Shifts are logical and products wrap mod 2^32 on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _head_key(seed: jax.Array, b: jax.Array, h: jax.Array, n_heads: int) -> jax.Array:
  """One 32-bit key per (seed, batch row, head); b, h int32 (any broadcastable shapes)."""
  row = (b * n_heads + h).astype(jnp.uint32) + jnp.uint32(1)  # + 1: _fmix32(0) is 0.
  return _fmix32(seed ^ _fmix32(row * jnp.uint32(_GOLDEN)))


def _keep(key: jax.Array, q_pos: jax.Array, k_pos: jax.Array, threshold: int) -> jax.Array:
  """Keep/drop of the probabilities at (q_pos, k_pos) (int32, broadcast) of one head's `key`.

  The pair is one 32-bit counter (16 bits each, so distinct pairs never collide), mixed with the
  key by two keyed rounds of _fmix32 (one round leaves neighbouring counters visibly correlated).
  For a fixed key this is a permutation of the counters, like a block cipher in counter mode.
  Kept when the bits are >= threshold: probability 1 - threshold / 2^32."""
  counter = (q_pos.astype(jnp.uint32) << 16) | k_pos.astype(jnp.uint32)
  bits = _fmix32(_fmix32(counter ^ key) + key)
  return bits >= jnp.uint32(threshold)


def dropout_threshold(rate: float) -> tuple[int, float]:
  """(threshold, scale): drop when the 32 hash bits are below `threshold` (round(rate * 2^32)),
  and scale survivors by the exact inverse of the keep probability that gives, so E[y] = x."""
  threshold = min(round(rate * 2.0 ** 32), 2 ** 32 - 1)
  return threshold, 2.0 ** 32 / (2 ** 32 - threshold)


def hashed_dropout_mask(seed: jax.Array, rate: float, B: int, H: int, T: int,
                        S: Optional[int] = None) -> jax.Array:
  """The kernel's keep mask in plain JAX: (B, H, T, S) bool, True where the probability of query
  position t for key position s survives dropout with `rate`. `seed`: uint32 (scalar or (1,))."""
  S = T if S is None else S
  seed = jnp.asarray(seed, jnp.uint32).reshape(())
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(H, dtype=jnp.int32)[None, :, None, None]
  key = _head_key(seed, b, h, H)  # (B, H, 1, 1)
  q_pos = jnp.arange(T, dtype=jnp.int32)[:, None]
  k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
  return _keep(key, q_pos, k_pos, dropout_threshold(rate)[0])


def hashed_dropout(att: jax.Array, rate: float, seed: jax.Array) -> jax.Array:
  """Dropout of probabilities att (B, H, T, S) with the kernel's hashed mask, survivors scaled."""
  keep = hashed_dropout_mask(seed, rate, *att.shape)
  return jnp.where(keep, att * dropout_threshold(rate)[1], 0.0).astype(att.dtype)


# --- the kernels -------------------------------------------------------------------------------

# A score that exp() turns into exactly 0. Finite, unlike -inf: a row whose scores seen so far were
# all masked would then give exp(-inf - (-inf)) = NaN in the running max's correction. (Key block 0
# comes first and every query sees key 0, so that never happens; the finite value keeps it so.)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b of two 2-D blocks (either transposed), accumulated and returned in float32. A transpose
  is a choice of contracted axis, which Triton folds into the matrix multiply."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores(q: jax.Array, k: jax.Array, q_start: jax.Array, k_start: jax.Array,
            scale: float) -> jax.Array:
  """Causally masked scores q k^T * scale (block_q, block_k), float32, for the blocks starting at
  query position q_start and key position k_start."""
  s = _dot(q, k, trans_b=True) * scale
  q_pos = q_start + jnp.arange(q.shape[0], dtype=jnp.int32)
  k_pos = k_start + jnp.arange(k.shape[0], dtype=jnp.int32)
  # Only blocks on the diagonal have masked entries; applying the (cheap) mask to every visited
  # block keeps one code path.
  return jnp.where(q_pos[:, None] >= k_pos[None, :], s, _MASKED)


def _program_key(seed_ref, n_heads: int) -> jax.Array:
  """This program's head key: program ids 0 and 1 are its batch row and head. (Read at the top of a
  kernel: Pallas' interpreter gives program ids only there, not inside loops.)"""
  return _head_key(seed_ref[0], pl.program_id(0), pl.program_id(1), n_heads)


def _dropout_factor(key: jax.Array, q_start: jax.Array, k_start: jax.Array,
                    shape: tuple[int, int], rate: float) -> jax.Array:
  """z (block_q, block_k) float32: 1 / (1 - rate) where a probability is kept, 0 where dropped,
  so that the dropped probabilities are p * z. `key`: the head's (`_program_key`)."""
  threshold, scale = dropout_threshold(rate)
  q_pos = q_start + jnp.arange(shape[0], dtype=jnp.int32)
  k_pos = k_start + jnp.arange(shape[1], dtype=jnp.int32)
  keep = _keep(key, q_pos[:, None], k_pos[None, :], threshold)
  return jnp.where(keep, jnp.float32(scale), jnp.float32(0.0))


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, rate: float,
                    block_k: int, n_heads: int):
  """One (batch row, head, query block): o (block_q, D) and lse (block_q,).

  Refs: q_ref, o_ref (block_q, D) and lse_ref (block_q,) are this program's rows; k_ref, v_ref
  (T, D) the whole sequence of this head, read one key block at a time."""
  block_q = q_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]
  key = _program_key(seed_ref, n_heads)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)  # Running row max of the scores.
  l = jnp.zeros((block_q,), jnp.float32)           # Running sum of exp(s - m), before dropout.
  acc = jnp.zeros(o_ref.shape, jnp.float32)        # Running sum of exp(s - m) * z @ v.

  def visit(j, carry):
    m, l, acc = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = _scores(q, k, q_start, k_start, scale)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # Finite: key 0 is in the first block, for every row.
    # What was summed under the old max is rescaled to the new one: exp(s - m) = exp(s - m_new) * a.
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])  # (block_q, block_k)
    # The normaliser sums the probabilities *before* dropout: dropout acts on softmax's output.
    l = alpha * l + jnp.sum(p, axis=1)
    if rate > 0.0:
      p = p * _dropout_factor(key, q_start, k_start, p.shape, rate)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)  # bf16 inputs: bf16 p, as unfused.
    return m_new, l, acc

  # Causal skip: key blocks starting past this block's last query are entirely masked.
  n_blocks = pl.cdiv(q_start + block_q, block_k)
  m, l, acc = jax.lax.fori_loop(0, n_blocks, visit, (m, l, acc))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)  # log sum_j exp(s_j): the backward pass recomputes p from it.


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale: float, rate: float, block_q: int, n_heads: int):
  """One (batch row, head, key block): dk, dv (block_k, D), summed over the query blocks that see it.

  With P the probabilities, z the dropout factors and Pd = P * z what multiplied v (O = Pd V):
    dV = Pd^T dO;  dPd = dO V^T;  dP = dPd * z;  dS = P * (dP - delta);  dK = dS^T Q * scale,
  where delta_i = sum_j P_ij dP_ij = dO_i . O_i (computed once, outside, as `delta`)."""
  block_k = k_ref.shape[0]
  k_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]
  key = _program_key(seed_ref, n_heads)

  def visit(i, carry):
    dk, dv = carry
    q_start = i * block_q
    q = q_ref[pl.ds(q_start, block_q), :]
    do = do_ref[pl.ds(q_start, block_q), :]
    lse = lse_ref[pl.ds(q_start, block_q)]
    delta = delta_ref[pl.ds(q_start, block_q)]
    p = jnp.exp(_scores(q, k, q_start, k_start, scale) - lse[:, None])  # (block_q, block_k)
    dp = _dot(do, v, trans_b=True)
    if rate > 0.0:
      z = _dropout_factor(key, q_start, k_start, p.shape, rate)
      pd, dp = p * z, dp * z
    else:
      pd = p
    dv = dv + _dot(pd.astype(do.dtype), do, trans_a=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  # Causal skip: query blocks ending before this key block's first key never see it.
  first = jax.lax.div(k_start, block_q)
  n_blocks = q_ref.shape[0] // block_q
  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(first, n_blocks, visit, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale: float, rate: float, block_k: int, n_heads: int):
  """One (batch row, head, query block): dq (block_q, D) = sum over key blocks of dS K * scale (the
  same dS as `_dkv_kernel`; a separate kernel, so each program writes only its own rows)."""
  block_q = q_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  key = _program_key(seed_ref, n_heads)

  def visit(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    p = jnp.exp(_scores(q, k, q_start, k_start, scale) - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    if rate > 0.0:
      dp = dp * _dropout_factor(key, q_start, k_start, p.shape, rate)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  n_blocks = pl.cdiv(q_start + block_q, block_k)
  dq = jax.lax.fori_loop(0, n_blocks, visit, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# --- the calls ---------------------------------------------------------------------------------

def _call(kernel, grid: tuple[int, ...], in_specs: list, out_specs: list, out_shape: list,
          interpret: bool, name: str):
  """pl.pallas_call, compiled with Triton on a GPU (Pallas' default there is Mosaic GPU, which
  needs Hopper-specific kernels), or interpreted as XLA operations anywhere else."""
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name=name,
                        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2))


def _specs(B: int, H: int, T: int, D: int):
  """BlockSpecs over grid (B, H, n): `rows(n)`, block i of n rows of a (B, H, T, D) array; `whole`,
  this head's whole (T, D); `vec(n)` / `whole_vec`, the same of a (B, H, T) array; `seed`."""
  one = pl.squeezed  # Batch and head axes: one of each per program, dropped inside the kernel.
  rows = lambda n: pl.BlockSpec((one, one, n, D), lambda b, h, i: (b, h, i, 0))
  whole = pl.BlockSpec((one, one, T, D), lambda b, h, i: (b, h, 0, 0))
  vec = lambda n: pl.BlockSpec((one, one, n), lambda b, h, i: (b, h, i))
  whole_vec = pl.BlockSpec((one, one, T), lambda b, h, i: (b, h, 0))
  seed = pl.BlockSpec((1,), lambda b, h, i: (0,))
  return rows, whole, vec, whole_vec, seed


def _forward(q, k, v, seed, rate, block_q, block_k, interpret):
  """(o (B, H, T, D), lse (B, H, T) float32) of padded q, k, v."""
  B, H, T, D = q.shape
  rows, whole, vec, _, seed_spec = _specs(B, H, T, D)
  kernel = functools.partial(_forward_kernel, scale=1.0 / math.sqrt(D), rate=rate,
                             block_k=block_k, n_heads=H)
  return _call(kernel, (B, H, T // block_q), [seed_spec, rows(block_q), whole, whole],
               [rows(block_q), vec(block_q)],
               [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
               interpret, 'flash_attention_forward')(seed, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seed, rate, block_q, block_k, interpret):
  return _forward(q, k, v, seed, rate, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, seed, rate, block_q, block_k, interpret):
  o, lse = _forward(q, k, v, seed, rate, block_q, block_k, interpret)
  return o, (q, k, v, seed, o, lse)


def _flash_bwd(rate, block_q, block_k, interpret, res, do):
  q, k, v, seed, o, lse = res
  B, H, T, D = q.shape
  scale = 1.0 / math.sqrt(D)
  # delta_i = dO_i . O_i: one number per row, cheaper here (XLA fuses it) than in either kernel.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (B, H, T)
  rows, whole, vec, whole_vec, seed_spec = _specs(B, H, T, D)
  dkv = functools.partial(_dkv_kernel, scale=scale, rate=rate, block_q=block_q, n_heads=H)
  dk, dv = _call(dkv, (B, H, T // block_k),
                 [seed_spec, whole, rows(block_k), rows(block_k), whole, whole_vec, whole_vec],
                 [rows(block_k), rows(block_k)],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 interpret, 'flash_attention_dkv')(seed, q, k, v, do, lse, delta)
  dq_kernel = functools.partial(_dq_kernel, scale=scale, rate=rate, block_k=block_k, n_heads=H)
  dq = _call(dq_kernel, (B, H, T // block_q),
             [seed_spec, rows(block_q), whole, whole, rows(block_q), vec(block_q), vec(block_q)],
             [rows(block_q)], [jax.ShapeDtypeStruct(q.shape, q.dtype)],
             interpret, 'flash_attention_dq')(seed, q, k, v, do, lse, delta)[0]
  return dq, dk, dv, None  # The seed is an integer: no gradient.


_flash.defvjp(_flash_fwd, _flash_bwd)

# Rows per block. Not tuned on a GPU yet; 64 x 64 float32 score tiles fit Triton's registers at
# head sizes up to 128 with 4 warps.
BLOCK = 64
MIN_BLOCK = 16  # Triton's matrix-multiply tiles are at least 16 on each side.


def block_size_for(T: int, block: int = BLOCK) -> int:
  """The block the kernels use for T positions: `block`, or the smallest power of two >= T (at
  least MIN_BLOCK) when that is smaller, so short sequences are not padded to a whole block."""
  return max(MIN_BLOCK, min(block, pl.next_power_of_2(T)))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, seed: Optional[jax.Array] = None,
                    rate: float = 0.0, *, block_q: Optional[int] = None,
                    block_k: Optional[int] = None, interpret: bool = False) -> jax.Array:
  """Causal softmax(q k^T / sqrt(D)) v of q, k, v (B, H, T, D): (B, H, T, D) in q's dtype.

  With `seed` (uint32, scalar or (1,)) and `rate` > 0, each probability is dropped as
  `hashed_dropout_mask(seed, rate, B, H, T)` says and the survivors are scaled by 1 / (1 - rate).
  Differentiable in q, k, v. D must be a power of two from 16 to 256 (Triton's tiles, checked by
  `gpt_jax.attention.flash_problem`); any T < 2^16 works: the sequence is padded to whole blocks,
  with padded keys after every real query (so causally invisible to it) and padded rows cut off.
  `interpret`: run the kernels as XLA operations (any backend; slow), not compiled with Triton.
  """
  B, H, T, D = q.shape
  if T > MAX_POSITIONS:
    raise ValueError(f'flash_attention: T={T} positions; the dropout hash counts at most '
                     f'{MAX_POSITIONS}')
  block_q = block_size_for(T) if block_q is None else block_q
  block_k = block_size_for(T) if block_k is None else block_k
  if rate > 0.0 and seed is None:
    raise ValueError('flash_attention: dropout (rate > 0) needs a seed')
  seed = jnp.zeros((1,), jnp.uint32) if seed is None else jnp.asarray(seed, jnp.uint32).reshape(1)
  padded = -(-T // math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - T), (0, 0))) if padded > T else x
  o = _flash(pad(q), pad(k), pad(v), seed, float(rate), block_q, block_k, interpret)
  return o[:, :, :T]
