# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GPT-2 from raw text to a trained model: a walkthrough
#
# This notebook follows one character of Shakespeare from the text file to a trained model's
# prediction, using the project's own modules at every step (`gpt_jax.*`, nothing copied). Where a
# piece is written out by hand here (attention, LayerNorm, AdamW), an `assert` checks it against the
# project's code and a library's, so the notebook cannot drift into a false statement.
#
# It runs on a laptop CPU in a few minutes. The source of truth is `notebooks/walkthrough.py`
# (jupytext percent format); `python scripts/build_notebook.py` re-executes it and rewrites
# `notebooks/walkthrough.ipynb` with its outputs, and `tests/test_notebook.py` runs it in CI.
#
# Contents:
# 1. The text and its 65 characters; one line as character ids and as GPT-2 BPE ids
# 2. A batch and its shifted targets, cut on the device
# 3. The shape flow of one forward pass
# 4. Attention written out step by step; LayerNorm the same way
# 5. The loss at initialisation, and what counting alone reaches (n-gram baselines)
# 6. One training step taken apart: gradients per layer, AdamW by hand
# 7. A short training run: loss curve, per-layer statistics, train/val gap, the model against counting
# 8. Inside the trained model: attention maps and what each head does, a copying test, a token trace,
#    samples
# 9. JAX against PyTorch from the same weights
# 10. Why each piece: the model with one piece of GPT-2 removed at a time

# %%
import functools
import math
import os
import pathlib
import shutil
import sys
import tempfile

# The repository root, whether Jupyter started in notebooks/ or in the root itself.
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / 'gpt_jax').is_dir())
sys.path.insert(0, str(ROOT))

import warnings

warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm in a notebook, without widgets.
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from absl import logging as absl_logging
from IPython.display import Image, display

from configs import shakespeare
from gpt_jax import attention as attention_lib, config as config_lib, model as model_lib, optim, sampling
from gpt_jax.data import batches, bpe, text as text_lib
from gpt_jax.lab import ablations, ngram, plots, probes, shape_flow, torch_compare, torch_ref
from gpt_jax.training import layer_stats, loop, step as step_lib

# gpt_jax.lab.plots selected matplotlib's file-only Agg backend; draw in the notebook instead:
# %matplotlib inline

absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes on opening checkpoints read-only.
WORK = pathlib.Path(tempfile.mkdtemp(prefix='gpt_jax_walkthrough_'))  # Data and the run; removed at the end.
print(f'JAX {jax.__version__} on {jax.default_backend()}; working in {WORK}')

# %% [markdown]
# ## 1. The text and its 65 characters
#
# The `cpu` preset (`configs/shakespeare.py:cpu`) is the configuration this notebook follows: nanoGPT's
# small CPU model (4 layers, 4 heads, 128 wide, a context of 64 characters). Its data section names
# TinyShakespeare by SHA-256; the package ships that file, so nothing is downloaded.

# %%
config = shakespeare.get_config('cpu')
config.data.data_dir = str(WORK / 'data')  # Token files go to the scratch folder, not the repository.
config.out_dir = str(WORK / 'run')

text = text_lib.read_text(text_lib.find_text(config.data))
chars = sorted(set(text))
print(f'{len(text):,} characters, {len(chars)} distinct:')
print(repr(''.join(chars)))
print()
print(text[:250])
assert len(chars) == 65

# %% [markdown]
# `text_lib.load` tokenizes the text once into `train.bin` / `val.bin` (90/10 by characters) and
# opens them as memory maps. The character tokenizer's vocabulary is exactly the sorted set above:
# id 0 is `'\n'`, id 1 is `' '`, and the letters come last.

# %%
ds = text_lib.load(config.data, verbose=False)  # (Quiet: it would print this machine's paths.)
tok = ds.tokenizer
assert tok.chars == chars and tok.vocab_size == 65
print(f'train {len(ds.train):,} tokens, val {len(ds.val):,} tokens, stored as {ds.train.dtype}')

counts = np.bincount(np.asarray(ds.train), minlength=tok.vocab_size)
order = np.argsort(-counts)
fig, ax = plt.subplots(figsize=(12, 2.6))
ax.bar(range(tok.vocab_size), counts[order] / counts.sum())
ax.set_xticks(range(tok.vocab_size), [plots.axis_label(chars[i]) for i in order], fontsize=7)
ax.set_ylabel('frequency')
ax.set_title('The 65 characters of the training split, most frequent first')
plt.show()

# %% [markdown]
# The same line as character ids and as GPT-2's byte-level BPE ids (`gpt_jax/data/bpe.py`, written by
# hand and tested to give tiktoken's ids exactly). Characters give one id per character from a
# vocabulary of 65; BPE gives one id per frequent piece from a vocabulary of 50,257, so the same line
# is about four times shorter. This project trains on characters: every prediction is one character,
# easy to read, and the output layer is tiny.

# %%
gpt2_tok = bpe.load_gpt2_tokenizer(*text_lib.find_gpt2_files(config.data))
line = text.splitlines()[1]
char_ids, bpe_ids = tok.encode(line), gpt2_tok.encode(line)
print(f'{line!r}\n')
print(f'characters: {len(char_ids)} ids from a vocabulary of {tok.vocab_size}')
print(' '.join(f'{plots.axis_label(c)}:{i}' for c, i in zip(line, char_ids)))
print(f'\nGPT-2 BPE:  {len(bpe_ids)} ids from a vocabulary of {gpt2_tok.vocab_size:,}')
print(' '.join(f'{plots.axis_label(probes.token_text(gpt2_tok, i))}:{i}' for i in bpe_ids))
assert tok.decode(char_ids) == line and gpt2_tok.decode(bpe_ids) == line
assert len(char_ids) == len(line) and len(bpe_ids) < len(line) / 3

# %% [markdown]
# ## 2. A batch and its shifted targets, cut on the device
#
# The whole training split (about a million ids, 2 MB as uint16) is copied to the device once.
# `batches.get_batch` then cuts `B` random windows of `T + 1` tokens from it *inside* the jitted
# computation: `x` is the first `T`, and the targets `y` are the same windows shifted by one, so
# position `t` of every row is trained to predict token `t + 1`. No batch is copied from the host per
# step, and the batch of step `s` depends only on (seed, s), so a resumed run sees the same batches.

# %%
train_data = batches.to_device(ds.train)
print(f'the split on the device: {train_data.shape} {train_data.dtype} on {train_data.devices()}')

cut = jax.jit(batches.get_batch, static_argnums=(2, 3))
x, y = cut(train_data, jax.random.PRNGKey(0), 4, 24)  # 4 windows of 24 characters, for reading.
for xr, yr in zip(np.asarray(x), np.asarray(y)):
  print(f'x {tok.decode(xr)!r}\ny {tok.decode(yr)!r}\n')
assert (np.asarray(y)[:, :-1] == np.asarray(x)[:, 1:]).all()  # y is x shifted left by one.
train_text = tok.decode(np.asarray(ds.train))
for xr, yr in zip(np.asarray(x), np.asarray(y)):  # Each window is a contiguous piece of the split.
  assert tok.decode(xr) + tok.decode(yr[-1:]) in train_text

# %% [markdown]
# The cut is part of the compiled program: its input is the whole resident split (`u16[1003854]`),
# and the program itself draws the start positions (`_randint`) and gathers the windows (`gather`, the
# vectorised form of `get_batch`'s `dynamic_slice`). Here is that program, as JAX traces it:

# %%
jaxpr = jax.make_jaxpr(batches.get_batch, static_argnums=(2, 3))(train_data, jax.random.PRNGKey(0), 4, 24)
program = jaxpr.pretty_print(use_color=False)  # Plain text (Jupyter would get terminal colour codes).
program = '{ lambda' + program.split('\n{ lambda')[-1]  # The top level, without randint's own body.
print(program)
assert 'randint' in program and 'gather' in program and 'u16[1003854]' in program
assert 'random_bits' not in program and '\x1b' not in program  # randint's body is not printed.

# %% [markdown]
# ## 3. The shape flow of one forward pass
#
# `gpt_jax.lab.shape_flow` traces the model abstractly (nothing is computed) and records every
# module's input and output shapes; the parameter and FLOP columns add up to the model's own counts
# (`config.num_params`, `config.flops_per_token`), which the cell checks. B = 12 rows of T = 64
# characters, C = 128 wide, 4 heads of D = 32, V = 65.

# %%
model_cfg = config_lib.model_config_from(config, tok.vocab_size)
model = model_lib.GPT(model_cfg)
B, T = config.train.batch_size, model_cfg.block_size
C, H, D = model_cfg.n_embd, model_cfg.n_head, model_cfg.head_size
rows = shape_flow.shape_flow(model_cfg, batch_size=B)
print(shape_flow.format_table(rows, model_cfg))

state = step_lib.init_train_state(model_cfg, config.train)  # GPT-2 init, AdamW state, step 0.
params = state.params
assert shape_flow.totals(rows) == (config_lib.num_params(model_cfg), config_lib.flops_per_token(model_cfg))
assert model_lib.count_params(params) == config_lib.num_params(model_cfg)

# %% [markdown]
# ## 4. Attention, step by step
#
# Take a short phrase, embed it (token embedding + position embedding), apply block 0's first
# LayerNorm and its `c_attn` projection with the project's own modules and the fresh weights above,
# and split the result into queries, keys and values per head. Then attention is four steps:
#
# 1. **scores** `q k^T / sqrt(D)`: how well each query matches each key;
# 2. **causal mask**: a position may not look at later positions, so their scores become `-inf`;
# 3. **softmax** over each row: the weights, each row summing to 1, exactly 0 on the future;
# 4. **weighted sum** `probs @ v`: each position's output is a mix of the values it may see.

# %%
phrase = 'O Romeo, Romeo!'
ids = jnp.asarray([tok.encode(phrase)])  # (1, Tp)
Tp = ids.shape[1]
labels = list(phrase)
p0 = params['h_0']
x_emb = params['wte'][ids] + params['wpe'][:Tp]                                      # (1, Tp, C)
h = model_lib.LayerNorm(use_bias=False).apply({'params': p0['ln_1']}, x_emb)         # (1, Tp, C)
qkv = model_lib.Linear(3 * C, use_bias=False).apply({'params': p0['attn']['c_attn']}, h)  # (1, Tp, 3C)
q, k, v = qkv.reshape(1, Tp, 3, H, D).transpose(2, 0, 3, 1, 4)                       # each (1, H, Tp, D)

scores = q @ k.swapaxes(-1, -2) / math.sqrt(D)                        # 1. (1, H, Tp, Tp)
causal = jnp.tril(jnp.ones((Tp, Tp), bool))                            #    True where key <= query
masked = jnp.where(causal, scores, -jnp.inf)                           # 2.
e = jnp.exp(masked - masked.max(axis=-1, keepdims=True))               # 3. (the max: no overflow)
probs = e / e.sum(axis=-1, keepdims=True)
out = probs @ v                                                        # 4. (1, H, Tp, D)

np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
assert (probs[..., ~causal] == 0).all()  # The future gets exactly zero weight.
# The same as the project's attention and as JAX's own (which takes (B, T, H, D)):
np.testing.assert_allclose(out, attention_lib.causal_attention(q, k, v, causal), atol=1e-6)
bthd = lambda a: a.transpose(0, 2, 1, 3)
np.testing.assert_allclose(out, bthd(jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), is_causal=True)),
                           atol=1e-6)
# ... and, with the output projection c_proj, the same as the model's whole attention layer.
layer_out, _ = model_lib.CausalSelfAttention(model_cfg).apply({'params': p0['attn']}, h, True)
by_hand = model_lib.Linear(C, use_bias=False).apply({'params': p0['attn']['c_proj']},
                                                    bthd(out).reshape(1, Tp, C))
np.testing.assert_allclose(by_hand, layer_out, atol=1e-6)
print('scores -> mask -> softmax -> weighted sum equals attention.causal_attention, '
      'jax.nn.dot_product_attention and the model\'s attention layer')

fig, axes = plt.subplots(1, 4, figsize=(17, 4.4))
shown = [('1. scores q·k/√D', scores[0, 0], 'RdBu_r'),
         ('2. masked (blank = -inf)', jnp.where(causal, scores[0, 0], jnp.nan), 'RdBu_r'),
         ('3. softmax: attention weights', probs[0, 0], 'magma'),
         ('4. output = weights @ v (head 0)', out[0, 0], 'RdBu_r')]
for ax, (title, a, cmap) in zip(axes, shown):
  im = ax.imshow(np.asarray(a), cmap=cmap, interpolation='nearest',
                 aspect='equal' if a.shape[-1] == Tp else 'auto')
  ax.set_title(title, fontsize=10)
  ax.set_yticks(range(Tp), [plots.axis_label(c) for c in labels], fontsize=8)
  if a.shape[-1] == Tp:
    ax.set_xticks(range(Tp), [plots.axis_label(c) for c in labels], fontsize=8)
  else:
    ax.set_xlabel('head dimension')
  fig.colorbar(im, ax=ax, shrink=0.7)
fig.suptitle('Layer 0, head 0 of the untrained model: rows are queries, columns keys')
plt.show()

# %% [markdown]
# At initialisation the scores are tiny (weights are N(0, 0.02)), so each row's weights are nearly
# uniform over the positions it may see: `1/(t+1)` for query `t`. Training makes them selective
# (section 8).
#
# **LayerNorm** the same way: over the channels of each position, subtract the mean, divide by the
# standard deviation (the biased variance plus `eps = 1e-5`, GPT-2's value; Flax's default is 1e-6),
# then scale (and shift, when the model has biases; this one has none, as nanoGPT's).

# %%
mean = x_emb.mean(axis=-1, keepdims=True)
var = ((x_emb - mean) ** 2).mean(axis=-1, keepdims=True)
ln_by_hand = (x_emb - mean) / jnp.sqrt(var + 1e-5) * p0['ln_1']['scale']
flax_ln = nn.LayerNorm(epsilon=1e-5, use_bias=False).apply({'params': {'scale': p0['ln_1']['scale']}}, x_emb)
np.testing.assert_allclose(ln_by_hand, h, atol=1e-5)       # The project's LayerNorm (h above).
np.testing.assert_allclose(ln_by_hand, flax_ln, atol=1e-5)  # flax.linen.LayerNorm.
print('LayerNorm by hand equals model.LayerNorm and flax.linen.LayerNorm')

fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
axes[0].hist(np.asarray(x_emb).ravel(), bins=60)
axes[0].set_title(f'embeddings entering block 0: std {float(x_emb.std()):.3f}')
axes[1].hist(np.asarray(h).ravel(), bins=60, color='C1')
axes[1].set_title(f'after ln_1: mean 0, std 1 per position (std {float(h.std()):.3f})')
plt.show()

# %% [markdown]
# ## 5. The loss at initialisation
#
# The loss is the mean cross-entropy of the next character. A model that knows nothing should spread
# its probability evenly over the 65 characters, giving `-ln(1/65) = ln 65 ≈ 4.174` nats. GPT-2's
# small initial weights make the logits nearly equal (their spread is about 0.02·√C), so the model
# starts just above that; a loss far from it would mean a broken initialisation.

# %%
xb, yb = cut(train_data, jax.random.PRNGKey(1), B, T)
loss0 = float(jax.jit(lambda p, x, y: step_lib.loss_fn(p, model, x, y, None))(params, xb, yb))
logits0 = jax.jit(model.apply)({'params': params}, xb)  # (B, T, V)
print(f'loss at init {loss0:.4f}, ln 65 = {math.log(65):.4f}; std of the logits {float(logits0.std()):.3f}')
assert abs(loss0 - math.log(65)) < 0.1

# %% [markdown]
# **What counting alone reaches.** Before training anything, the baselines a trained model must beat:
# n-gram tables (`gpt_jax/lab/ngram.py`). A unigram model predicts every character from its frequency
# alone; a bigram model from the one character before it; a trigram model from the two before it, by
# counting in the training split how often each character followed that context. Add-k smoothing
# (`(count + k) / (total + k·65)`) keeps unseen pairs possible, with k chosen on the training split
# only (fitted on its first 90%, scored on the rest). Their val losses, in the same nats per character
# as the model's:

# %%
baselines = {name: loss for name, (_, loss) in ngram.baselines(ds.train, ds.val, tok.vocab_size).items()}
print(f'uniform {math.log(65):.3f}  ' + '  '.join(f'{n} {l:.3f}' for n, l in baselines.items()))
assert math.log(65) > baselines['unigram'] > baselines['bigram'] > baselines['trigram']

# %% [markdown]
# ## 6. One training step, taken apart
#
# `step.train_step` draws the step's batch, computes the loss and its gradient, and applies the
# optimizer: clipping to a global norm of 1, then AdamW. Here are the same three steps by hand, from
# the state above, each checked against the project's jitted `train_step`.
#
# AdamW, per parameter, at update number `t = 1, 2, ...` with gradient `g` (after clipping):
#
#     m = β1 m + (1 - β1) g            v = β2 v + (1 - β2) g²
#     m̂ = m / (1 - β1^t)              v̂ = v / (1 - β2^t)         (the moments start at 0: undo that bias)
#     θ = θ - lr · (m̂ / (√v̂ + ε) + wd · θ)                        (weight decay on matrices only)
#
# The hand version below is written in float64 NumPy, independent of the project's float32 code.

# %%
train_step = jax.jit(functools.partial(step_lib.train_step, model=model, batch_size=B, grad_accum_steps=1,
                                       schedule=optim.lr_schedule(config.train)))
gradients = jax.jit(functools.partial(step_lib.gradients, model=model, batch_size=B, grad_accum_steps=1))
tc = config.train
flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(a, np.float64)
                     for p, a in jax.tree_util.tree_leaves_with_path(tree)}
theta = flat(state.params)
m = {n: np.zeros_like(a) for n, a in theta.items()}
v = {n: np.zeros_like(a) for n, a in theta.items()}
st = state
for t in range(1, 4):
  # The step's batch and gradients, exactly as train_step gets them.
  batch_key, dropout_key = step_lib.step_keys(st)
  xs, ys = cut(train_data, batch_key, B, T)
  loss, grads = gradients(st.params, xs, ys, dropout_key)
  g = flat(grads)
  gnorm = math.sqrt(sum((a ** 2).sum() for a in g.values()))
  if gnorm > tc.grad_clip:  # Clip by the global norm: one factor for all, the direction is kept.
    g = {n: a * tc.grad_clip / gnorm for n, a in g.items()}
  lr = tc.learning_rate * (t - 1) / tc.warmup_steps  # Linear warmup from 0 (nanoGPT's get_lr).
  for n in theta:
    m[n] = tc.beta1 * m[n] + (1 - tc.beta1) * g[n]
    v[n] = tc.beta2 * v[n] + (1 - tc.beta2) * g[n] ** 2
    m_hat, v_hat = m[n] / (1 - tc.beta1 ** t), v[n] / (1 - tc.beta2 ** t)
    decay = tc.weight_decay * theta[n] if theta[n].ndim >= 2 else 0.0
    theta[n] = theta[n] - lr * (m_hat / (np.sqrt(v_hat) + optim.ADAM_EPS) + decay)

  new_st, metrics = train_step(st, train_data)
  before, project = flat(st.params), flat(new_st.params)
  moved = {n: project[n] - before[n] for n in theta}
  err = max(np.abs(theta[n] - project[n]).max() for n in theta)
  size = max(np.abs(moved[n]).max() for n in theta)
  # The same update, up to float32 rounding on the project's side: its parameters are stored in float32
  # (half an ulp of a LayerNorm scale of 1.0 is 6e-8), and its arithmetic is float32.
  assert all(np.allclose(theta[n], project[n], rtol=2.5e-7, atol=1e-3 * size) for n in theta)
  print(f'update {t}: loss {float(metrics["loss"]):.4f}, lr {float(metrics["lr"]):.1e}, gradient norm '
        f'{gnorm:.3f}, largest parameter change {size:.2e}, hand vs train_step {err:.1e}')
  assert math.isclose(float(metrics['lr']), lr, rel_tol=1e-6)
  assert math.isclose(float(metrics['loss']), float(loss))
  if t == 1:
    first_grads = grads
  st = new_st

# %% [markdown]
# Update 1 has learning rate 0 (the warmup starts at 0, as in nanoGPT's `get_lr`): it only fills
# Adam's moments. From update 2 on the parameters move, by about `lr` per element: Adam divides each
# gradient by its own running size, so every parameter takes a step of similar length whatever its
# gradient's scale.
#
# The gradient norms of the first update, per layer (`layer_stats.layer_norms`, which the training
# loop logs too): every block gets a gradient of similar size, the earlier blocks a little more; the
# token table `wte`, which is also the output layer, about as much as a block; the position table less;
# and the final LayerNorm's 128 scales the least.

# %%
norms = {k: float(a) for k, a in layer_stats.layer_norms(first_grads).items()}
norms = {k: norms[k] for k in ['wte', 'wpe', *(f'h_{i}' for i in range(model_cfg.n_layer)), 'ln_f']}
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.bar(list(norms), list(norms.values()))
ax.set_yscale('log')
ax.set_title('gradient norm per layer at initialisation')
plt.show()
assert math.isclose(math.sqrt(sum(n ** 2 for n in norms.values())), float(optax.tree.norm(first_grads)),
                    rel_tol=1e-5)  # The per-layer norms make up the global norm.
assert min(norms, key=norms.get) == 'ln_f' and norms['h_0'] > norms['h_3']

# %% [markdown]
# ## 7. A short training run
#
# `loop.train_and_evaluate` is what `scripts/train.py` runs: the jitted step, evals on fixed batches,
# Orbax checkpoints and `metrics.jsonl`. Here the `cpu` preset is cut to 500 steps, with an eval every
# tenth of the run and per-layer statistics every 25 steps; what the full preset (7,000 steps) reaches is
# in the README's
# [results table](../README.md#results). (`tests/test_notebook.py` sets `GPT_JAX_NOTEBOOK_STEPS` to run
# fewer: every claim the notebook asserts below holds after that shorter run too.)

# %%
steps = int(os.environ.get('GPT_JAX_NOTEBOOK_STEPS', 500))
config.train.update(max_steps=steps, lr_decay_steps=steps, eval_interval=max(steps // 10, 1), eval_iters=10,
                    log_interval=100, layer_stats_interval=25)
summary = loop.train_and_evaluate(config)
run = plots.read_run(config.out_dir, name=f'cpu preset, {steps} steps')
val = run.series('evals', 'val_loss')[1]
print(f'val loss {val[0]:.3f} at step 0 -> {val[-1]:.3f} at step {steps}')
assert val[-1] < val[0] - 1.5  # From ~4.2 to below 2.7: it has learnt far more than letter frequencies.

# %% [markdown]
# The log's MFU (model FLOPs utilisation) is relative to what this CPU itself reaches on a plain
# float32 matrix product, measured at the start of the run (a CPU has no datasheet peak to look up);
# a small model, with its many small operations, stays well below that.
#
# The loss curve, and what the per-layer statistics (`gpt_jax/training/layer_stats.py`) show:
# the gradient norm of each layer over time; the update-to-parameter ratio ‖Δθ‖/‖θ‖; the size of the
# residual stream after each block, which grows with depth as every block adds to it; and the
# attention entropy, which falls below that of uniform attention as heads learn to focus.
#
# The update ratio sits between about 3e-3 and 2e-2 here (the cell prints the measured median, about
# 5e-3), above the 1e-3 often quoted as a rule of thumb (the dashed line). Adam moves every weight by
# about `lr` per step whatever its gradient's size, so the ratio is about `lr / rms(θ)`: this recipe's
# peak lr of 2e-3 against weights of rms ~0.1 gives ~1e-2, and it falls as the lr decays. Larger
# models trained at smaller learning rates sit nearer 1e-3.

# %%
fig, axes = plt.subplots(3, 2, figsize=(13, 10))
for ax, panel in zip(axes.flat, ('loss', 'lr', 'grad_heatmap', 'update_ratio', 'act_rms', 'attn_entropy')):
  plots.draw_panel(ax, panel, [run], run)
fig.tight_layout()
plt.show()
ratios = [np.mean(v) for rec in run.layer_stats.values() for v in rec['layer_stats']['update_ratio'].values()]
print(f'update / parameter norm: median {np.median(ratios):.1e} over layers and records '
      f'(range {min(ratios):.0e} to {max(ratios):.0e})')
assert 3e-3 < np.median(ratios) < 3e-2  # Near 1e-2, as the text says.

# %% [markdown]
# **Dynamics.** The same run's evals: training and validation loss side by side (their gap is how much
# the model has memorised its training text rather than learnt what generalises; in so short a run it
# has seen each character less than once, so the gap stays small), the loss against the number of
# tokens seen (B·T = 768 per step), and the model against the n-gram baselines of section 5.

# %%
ev_steps, ev_val = run.series('evals', 'val_loss')
_, ev_train = run.series('evals', 'train_loss')
tr_steps, tr_loss = run.series('train', 'train_loss')
fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
axes[0].plot(ev_steps, ev_train, 'o-', ms=3, label='train')
axes[0].plot(ev_steps, ev_val, 'o-', ms=3, label='val')
gap = axes[0].twinx()
gap.bar(ev_steps, ev_val - ev_train, width=steps / 40, color='grey', alpha=0.3)
gap.set_ylabel('val - train (bars)')
axes[0].set(xlabel='step', ylabel='loss (nats)', title='train and val loss; their gap')
axes[0].legend()
axes[1].semilogx(tr_steps[1:] * B * T, tr_loss[1:], '.', ms=3, label='training batches')
axes[1].semilogx(ev_steps[1:] * B * T, ev_val[1:], 'o-', ms=3, label='val')
axes[1].set(xlabel='tokens seen', ylabel='loss (nats)', title='loss against tokens seen')
axes[1].legend()
axes[2].plot(ev_steps, ev_val, 'o-', ms=3, color='C1', label='model (val)')
for i, (name, loss) in enumerate(baselines.items()):
  axes[2].axhline(loss, ls='--', color=f'C{i + 2}', label=f'{name} {loss:.2f}')
axes[2].set(xlabel='step', ylabel='val loss (nats)', ylim=(1.8, 4.3), title='the model against counting')
axes[2].legend()
fig.tight_layout()
plt.show()
beaten = [name for name, loss in baselines.items() if ev_val[-1] < loss]
print(f'after {steps} steps ({steps * B * T:,} tokens, {steps * B * T / len(ds.train):.2f} epochs): '
      f'val {ev_val[-1]:.3f}, train {ev_train[-1]:.3f}; below the {", ".join(beaten) or "no"} baseline(s)')
assert ev_val[-1] < baselines['unigram'] and abs(ev_val[-1] - ev_train[-1]) < 0.15

# %% [markdown]
# ## 8. Inside the trained model
#
# `probes.load` opens the run's best checkpoint: model config, parameters and tokenizer, which is
# all that `scripts/sample.py`, `scripts/attention.py` and `scripts/trace.py` need too.
#
# **Attention maps** of a line of the play, every layer and head (row: the position attending;
# column: the position attended to). Compare them with the near-uniform rows of section 4.
#
# Each map's title names what its head does most, measured (`probes.head_scores`) as the mean
# attention weight the head puts, over 32 windows of the val split, on
# - the **previous token** (position t - 1),
# - the **line start**: the most recent newline, which opens the current line,
# - the **word start**: the most recent space (or newline), which opens the current word
#
# (the two starts counted only where they are not the previous token). Uniform attention over the
# t + 1 visible positions would score well under 0.1 on each.
#
# After this short run two heads of layer 1 have specialised: one looks back at the newline that
# opened the line (it tells the model whether it is in a speaker's name, which is in capitals, or in
# verse), one at the space that opened the word. The cell asserts both, as a head scoring at least
# three times the median head. A **previous-token head** comes later: in this run no head yet scores
# much above the rest on it, while in the `cpu` preset's full run (7,000 steps; the README's picture)
# layer 0 head 3 puts most of its weight on the previous character.

# %%
trained_cfg, trained, trained_tok = probes.load(config.out_dir)
verse = 'ROMEO:\nBut soft, what light through yonder window breaks?'
verse_ids = trained_tok.encode(verse)
maps = probes.attention_maps(trained, trained_cfg, verse_ids)  # (L, H, T, T)
assert maps.shape == (4, 4, len(verse_ids), len(verse_ids))
np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)

starts = np.random.default_rng(0).integers(0, len(ds.val) - T, size=32)
head_scores = probes.mean_head_scores(trained, trained_cfg, trained_tok, [ds.val[s:s + T] for s in starts])
for name, a in head_scores.items():
  print(f'{name:>14}: ' + '   '.join(f'L{l} ' + ' '.join(f'{x:.2f}' for x in a[l]) for l in range(len(a))))
display(Image(plots.attention_grid(maps, list(verse), str(WORK / 'attention.png'), dpi=80,
                                   head_titles=probes.best_pattern(head_scores))))
for name, a in head_scores.items():
  l, h = np.unravel_index(a.argmax(), a.shape)
  print(f'strongest {name} head: layer {l}, head {h}: {a[l, h]:.2f} (median head {np.median(a):.2f})')
for name in ('line start', 'word start'):  # Held after 200 and after 500 steps.
  assert head_scores[name].max() > 3 * np.median(head_scores[name]), name

# %% [markdown]
# The previous-token head, measured on the model behind the README's attention picture: the `cpu`
# preset trained for 7,000 steps (`python scripts/train.py --config configs/shakespeare.py:cpu`; its
# parameters are kept in `runs/cpu_model/`). Scored on the same val windows as above, one of its heads
# puts most of its weight on the previous character: with it, the next character can be predicted from
# the last two, which is what a trigram table does and what this short run has not learnt yet.

# %%
cpu_cfg, cpu_params, cpu_tok = probes.load(str(ROOT / 'runs' / 'cpu_model'))
cpu_scores = probes.mean_head_scores(cpu_params, cpu_cfg, cpu_tok,
                                     [ds.val[s:s + cpu_cfg.block_size] for s in starts])
prev = cpu_scores['previous token']
l, h = np.unravel_index(prev.argmax(), prev.shape)
print(f'cpu model, strongest previous-token head: layer {l}, head {h}: {prev[l, h]:.2f} '
      f'(median head {np.median(prev):.2f}; this run\'s best {head_scores["previous token"].max():.2f})')
assert prev.max() > 0.5 > head_scores['previous token'].max()  # The trained model has one; this run not yet.

# %% [markdown]
# **A copying test.** Does the model use what it has just read? In "O Romeo, Romeo!" the name comes
# twice; the second time, every letter after the `R` is in the context already. `probes.copy_losses`
# compares the loss on a phrase's letters (all but its first) the first and the second time the model
# reads it. The same with a made-up word, which no table of Shakespeare could predict, tells copying from
# knowing the name.

# %%
for phrase, before, between in (('Romeo', 'O ', ', '), ('Zorbun', 'O ', ', ')):
  first, second = probes.copy_losses(trained, trained_cfg, trained_tok, phrase, before, between)
  print(f'{before + phrase + between + phrase!r}: loss on {phrase!r} the first time {first:.2f}, '
        f'the second time {second:.2f} nats per character')

# %% [markdown]
# **A token trace**: at each position, the real next character, the probability the model gave it,
# its rank among the 65, and the model's top guesses. After 500 steps it knows what follows
# punctuation (a newline after `ROMEO:`, a space after a comma) and often where a word ends; the first
# letter of a word, after a space or a newline, is the hardest to guess.

# %%
trace = probes.token_trace(trained, trained_cfg, verse_ids, top_k=3)
print(probes.format_trace(trace, trained_tok))
# The trace is the loss, position by position: its mean -log p(next) is the model's loss on the line.
trace_loss = -np.mean([math.log(r.prob) for r in trace])
line_loss = step_lib.loss_fn(trained, model_lib.GPT(trained_cfg), jnp.asarray([verse_ids[:-1]]),
                             jnp.asarray([verse_ids[1:]]), None)
assert math.isclose(trace_loss, float(line_loss), rel_tol=1e-4)
seen = [trained_tok.decode([r.token]) for r in trace]
assert all(r.prob > 0.5 for r, c in zip(trace, seen) if c in ':,')  # After punctuation: nearly sure.
first_letter = np.mean([r.prob for r, c in zip(trace, seen) if c in ' \n'])
assert first_letter < np.mean([r.prob for r, c in zip(trace, seen) if c not in ' \n'])

# %% [markdown]
# **Samples** at several temperatures and top-k settings (`sampling.generate`: a jitted loop over a KV
# cache). Temperature 0 is greedy (always the most likely character: it soon repeats itself); a
# temperature below 1 sharpens the distribution, above 1 flattens it, and top-k keeps only the k most
# likely characters before sampling (which keeps a hot sample from picking rare nonsense).

# %%
prompt = np.asarray([trained_tok.encode('ROMEO:\n')])
for temperature, top_k in ((0.0, None), (0.8, None), (1.2, 5)):
  out = sampling.generate(trained, trained_cfg, prompt, 120, jax.random.PRNGKey(7),
                          temperature=temperature, top_k=top_k)
  print(f'--- temperature {temperature}, top_k {top_k}\n{trained_tok.decode(np.asarray(out[0]))}\n')

# %% [markdown]
# ## 9. JAX against PyTorch, from the same weights
#
# `gpt_jax/lab/torch_ref.py` is a nanoGPT-style PyTorch model and `torch.optim.AdamW`. Loaded with
# the same float32 weights, it gives the same logits and gradients; trained on the same batches with
# the same learning rates, the two losses stay equal to float32 rounding (`scripts/compare_torch.py`
# runs this for hundreds of steps and against a float64 reference; see docs/faithfulness.md).
# PyTorch runs on one thread here: this comparison is about values, not speed, and on a busy
# 2-core machine its threads would wait on each other.

# %%
init = jax.device_get(state.params)
at_init = torch_ref.compare_at_init(init, model_cfg, np.asarray(xb), np.asarray(yb))
print(f'at init: logits differ by at most {at_init["logits_max_abs_diff"]:.1e}, gradients by '
      f'{at_init["grad_max_rel_diff"]:.1e} (relative)')
assert at_init['logits_max_abs_diff'] < 1e-5 and at_init['grad_max_rel_diff'] < 1e-5

jax_step = jax.jit(functools.partial(torch_compare.jax_step, model=model, batch_size=B, grad_accum_steps=1,
                                     schedule=optim.lr_schedule(config.train)))
torch_ref.require_torch().set_num_threads(1)
trainer = torch_ref.TorchTrainer(model_cfg, config.train, init)
js, losses = state, []
for _ in range(20):
  js, jm, xs, ys = jax_step(js, train_data, state.key)  # train_step's batch and update, plus the batch.
  tm, _ = trainer.step(np.asarray(xs), np.asarray(ys), float(jm['lr']))
  losses.append((float(jm['loss']), tm['loss']))
losses = np.array(losses)
diff = np.abs(losses[:, 0] - losses[:, 1])
print(f'20 steps: loss {losses[0, 0]:.4f} -> {losses[-1, 0]:.4f}; largest |JAX - PyTorch| {diff.max():.1e}')
assert diff.max() < 1e-5

fig, axes = plt.subplots(1, 2, figsize=(12, 3))
axes[0].plot(losses[:, 0], label='JAX')
axes[0].plot(losses[:, 1], '--', label='PyTorch')
axes[0].set_title('training loss')
axes[0].legend()
axes[1].semilogy(np.maximum(diff, 1e-9), 'o-', ms=3)
axes[1].set_title('|loss difference| (float32 rounding: ~1e-7)')
axes[1].set_xlabel('step')
plt.show()

# %% [markdown]
# ## 10. Why each piece
#
# Every piece of GPT-2 is there for a reason; the quickest way to see the reason is to take the piece
# out and train again. `gpt_jax/lab/ablations.py` trains a smaller model than the one above (3 layers,
# 4 heads, 64 wide, a context of 64; seconds per run) once in full and once without each piece
# (`ModelConfig.ablate`, gpt_jax/config.py), from the same seed, on the same batches, for the same
# steps, and measures the val loss on the same fixed val windows. The dashed lines are the n-gram
# baselines of section 5.
#
# - **Attention** ([Vaswani et al. 2017](https://arxiv.org/abs/1706.03762)) is the only place where
#   one position reads another. Without it (`ablate='attention'`: each position attends only to itself)
#   every prediction is made from the current character alone, so at best the model is a bigram table.
# - **Positions.** Attention itself is blind to order: it weighs the visible positions by what they
#   hold, not where they are. GPT-2 adds a learned position vector to each token (`wpe`; the original
#   Transformer used fixed sinusoids). Without any, a causal model still learns some sense of position
#   from the mask, as the number of visible tokens grows
#   ([Haviv et al. 2022](https://arxiv.org/abs/2203.16634)), but not "the character two back".
# - **Residual connections** ([He et al. 2015](https://arxiv.org/abs/1512.03385)): each block adds to
#   a running stream, `x + f(x)`, instead of replacing it, so every block starts close to the identity
#   and the gradient reaches the first layers directly, past every block.
# - **LayerNorm** ([Ba et al. 2016](https://arxiv.org/abs/1607.06450)) rescales each position's vector
#   to zero mean and unit variance before each sublayer (GPT-2's pre-LN placement, which trains stably
#   without a long warmup; [Xiong et al. 2020](https://arxiv.org/abs/2002.04745)) and once at the end,
#   so no block's input grows or shrinks as the residual stream does.
# - **Several heads** (Vaswani et al., section 3.2.2): the same width split into H smaller heads gives
#   H attention patterns per layer at the same cost; section 8 found one head following the previous
#   character while another looks back at the start of the line. With one head, one pattern per layer.
# - **The MLP** (Vaswani et al.'s position-wise feed-forward network) is where each position computes
#   on what attention gathered: attention only takes weighted averages of values, the MLP transforms
#   them, and it holds two thirds of each block's weights (read as key-value memories by
#   [Geva et al. 2021](https://arxiv.org/abs/2012.14913)).
#
# The notebook asserts only the orderings that held in every one of three seeds
# (`python scripts/why_each_piece.py`; all seeds' figures and the table are in
# [docs/why-each-piece.md](../docs/why-each-piece.md)). At this short budget the residual connections,
# LayerNorm, the MLP and attention each cost clearly when taken out (in that order, the residual
# stream most: without it the model learns little beyond letter frequencies); one head instead of four
# and no position information cost little or nothing yet. Their value grows with training: a head
# that attends by offset (section 8's previous-token head) needs positions, and such heads appear
# only after this many steps.

# %%
why_config = ablations.small_config(seed=0)
why_config.data.data_dir = config.data.data_dir
curves = ablations.run(why_config, ds.train, ds.val, tok.vocab_size,
                       log=lambda line: print(line, flush=True))
fig, ax = plt.subplots(figsize=(10, 5))
ablations.plot(ax, curves, baselines, f'val loss without each piece ({why_config.train.max_steps} steps, seed 0)')
plt.show()
# What held in every seed of scripts/why_each_piece.py, by more than 0.02 nats: each name here ends
# below every name in a later group. Without attention the model stays above the bigram table.
ORDER = [('full model', 'positions', 'heads'), ('attention',), ('mlp',), ('layernorm',), ('residual',)]
for i, group in enumerate(ORDER):
  for a in group:
    for b in (b for later in ORDER[i + 1:] for b in later):
      assert curves[a].final < curves[b].final, (a, b)
assert curves['full model'].final < baselines['bigram'] < curves['attention'].final

# %% [markdown]
# **Why scores are divided by √D** (Vaswani et al., section 3.2.1). A score `q·k` sums D products; if
# the entries of q and k have unit variance, the sum has variance D. Left unscaled, scores of a head of
# D = 32 spread over ±6 or more, and the softmax of such scores puts nearly all the weight on one
# key from the start: a saturated softmax whose gradient is almost zero. Dividing by √D keeps the
# scores at unit scale whatever the head size:

# %%
qk = jax.random.normal(jax.random.PRNGKey(0), (2, 64, D))  # 64 queries and keys, unit-variance entries
raw = qk[0] @ qk[1].T                                        # (64, 64) scores
for name, sc in (('q·k', raw), ('q·k/√D', raw / math.sqrt(D))):
  w = jax.nn.softmax(sc, axis=-1)
  print(f'{name:>7}: score std {float(sc.std()):.2f}, mean largest weight {float(w.max(-1).mean()):.2f} '
        f'over 64 keys (uniform: {1 / 64:.3f})')
assert 0.8 < float(raw.std()) / math.sqrt(D) < 1.2

# %% [markdown]
# ## Where next
#
# - The same run in full: `python scripts/train.py --config configs/shakespeare.py:cpu`, then
#   `python scripts/sample.py --ckpt_dir out/shakespeare_char_cpu`.
# - The model in one file: `gpt_jax/model.py`; the step: `gpt_jax/training/step.py`; the optimizer:
#   `gpt_jax/optim.py`.
# - The docs: [how it works](../docs/how-it-works.md), [faithfulness](../docs/faithfulness.md),
#   [seeing inside](../docs/seeing-inside.md), [the speedrun](../docs/speedrun.md).

# %%
shutil.rmtree(WORK)  # The scratch data, run and pictures.
