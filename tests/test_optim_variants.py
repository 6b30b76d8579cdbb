"""The departures from GPT-2's optimizer (gpt_jax/optim_variants.py), each tested for its own property;
and that, off, nothing changed: Muon on the block matrices (and its batched Newton-Schulz), the
warmup-stable-decay schedule, the moving average of the weights.
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import shakespeare
from gpt_jax import checkpoint as checkpoint_lib, optim, optim_variants
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

import tiny_models

CFG = tiny_models.CFG
_params = tiny_models.params
_shapes = tiny_models.shapes
_tokens = tiny_models.tokens
_flat = tiny_models.flat


# --- Muon -----------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (modded-nanogpt, the Muon post).


def newton_schulz(g: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
  """Reference orthogonalisation, float64: X <- a X + (b A + c A^2) X with A = X X^T, X = G/||G||_F
  (on the wide orientation: a tall G is transposed first and back at the end)."""
  a, b, c = NS_COEFFS
  x = np.asarray(g, np.float64)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if tall else x


@pytest.mark.parametrize('shape', [(32, 96), (128, 32), (24, 24)])
def test_newton_schulz_matches_optax_contrib_and_orthogonalises(shape):
  # G = U diag(s) V^T with singular values spread over two orders of magnitude.
  k = min(shape)
  rng = np.random.RandomState(6)
  u, _ = np.linalg.qr(rng.randn(shape[0], k))
  v, _ = np.linalg.qr(rng.randn(shape[1], k))
  g = (u * np.logspace(0, -2, k)) @ v.T
  ref = newton_schulz(g)
  # optax.contrib.scale_by_muon with beta = 0 is exactly the orthogonalisation of the gradient.
  tx = optax.contrib.scale_by_muon(beta=0.0)
  out, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(shape)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=5e-6)  # float32 vs float64; entries ~0.4.
  # The point of it: the singular vectors are kept, the values all pushed into a band around 1.
  s = np.linalg.svd(ref, compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.25
  np.testing.assert_allclose(u.T @ ref @ v, np.diag(np.diag(u.T @ ref @ v)), atol=1e-6)


def _muon_train_cfg(**overrides) -> ml_collections.ConfigDict:
  t = shakespeare.get_config('tiny').train
  t.update(optimizer='muon', warmup_steps=0, learning_rate=2e-3, min_learning_rate=2e-3,
           muon_learning_rate=0.03, muon_momentum=0.9, weight_decay=0.1, grad_clip=1.0)
  t.update(**overrides)
  return t


MUON_CFG = dataclasses.replace(CFG, qk_norm=True, bias=True)  # Every kind of leaf: tables, matrices, scales, biases.


@functools.lru_cache(maxsize=None)
def _two_gradients():
  """Real gradients of the tiny model on two batches, the second's larger than grad_clip."""
  p = _params(MUON_CFG)
  out = []
  for seed in (11, 12):
    x, y = _tokens((4, 16), seed), _tokens((4, 16), seed + 100)
    g = jax.jit(jax.grad(lambda p, x=x, y=y: step_lib.loss_fn(p, GPT(MUON_CFG), x, y, None)))(p)
    out.append(g)
  # Norms at init are about 1: make the first unclipped and the second clipped (grad_clip = 1).
  out = [jax.tree_util.tree_map(lambda a, f=f: f * a, g) for f, g in zip((0.5, 30.0), out)]
  return p, out


def test_muon_labels_exactly_the_four_block_matrices():
  labels = _flat(optim_variants.muon_labels(_shapes(MUON_CFG)))
  want = {f'h_{i}.{m}.kernel' for i in range(MUON_CFG.n_layer)
          for m in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')}
  assert {k for k, v in labels.items() if v == 'muon'} == want
  assert {v for k, v in labels.items() if k not in want} == {'adamw'}
  assert labels['wte'] == labels['wpe'] == 'adamw'  # 2-D, but tables, not linear maps.


@pytest.mark.slow
@pytest.mark.parametrize('ns_steps', [5, 3])
def test_muon_steps_match_the_reference_and_adamw_elsewhere(ns_steps):
  """Two updates from real gradients (the second clipped): the block matrices get the reference
  Muon update (Nesterov momentum, `ns_steps` Newton-Schulz steps, width scale, learning rate), every
  other leaf exactly the update of a pure-AdamW ('adamw') optimizer fed the same gradients."""
  t = _muon_train_cfg(muon_ns_steps=ns_steps)
  params, grads = _two_gradients()
  muon_tx = optim.make_optimizer(t)
  adamw_tx = optim.make_optimizer(_muon_train_cfg(optimizer='adamw'))
  s_m, s_a = muon_tx.init(params), adamw_tx.init(params)
  beta, lr = t.muon_momentum, t.muon_learning_rate
  labels = _flat(optim_variants.muon_labels(params))
  mu = {k: 0.0 for k in labels}
  update = jax.jit(lambda tx_s, g, p: (muon_tx.update(g, tx_s[0], p), adamw_tx.update(g, tx_s[1], p)))
  for step, g in enumerate(grads, start=1):
    (u_m, s_m), (u_a, s_a) = update((s_m, s_a), g, params)
    u_m, u_a, g_flat = _flat(u_m), _flat(u_a), _flat(g)
    norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in g_flat.values()))
    clip = min(1.0, t.grad_clip / norm)
    assert (clip < 1.0) == (step == 2)
    for k, label in labels.items():
      if label == 'adamw':
        np.testing.assert_array_equal(u_m[k], u_a[k], err_msg=k)
        continue
      gk = np.asarray(g_flat[k], np.float64) * clip
      mu[k] = beta * mu[k] + (1 - beta) * gk
      # optax's Nesterov momentum with bias correction: beta mu_t / (1 - beta^(t+1)) + (1 - beta)
      # g_t / (1 - beta^t) (modded-nanogpt uses the same mix without the corrections).
      nesterov = beta * mu[k] / (1 - beta ** (step + 1)) + (1 - beta) * gk / (1 - beta ** step)
      n_in, n_out = gk.shape
      want = -lr * math.sqrt(max(1.0, n_out / n_in)) * newton_schulz(nesterov, steps=ns_steps)
      # float32 against float64: measured within 1.5e-6 * lr (the entries are ~0.5 * lr).
      np.testing.assert_allclose(u_m[k], want, rtol=0, atol=1e-5 * lr, err_msg=k)
      assert not np.allclose(u_m[k], u_a[k], atol=1e-2 * lr)  # Not what AdamW would do.


@pytest.mark.slow
def test_batched_muon_gives_the_same_updates_from_a_stacked_state():
  """muon_batched orthogonalises the matrices of each shape as one batch: the same updates as one
  matrix at a time (to float32 rounding, with momentum, clipping and decay), its momentum kept as one
  (n_layer, fan_in, fan_out) array per shape."""
  params, grads = _two_gradients()
  one, batched = (optim.make_optimizer(_muon_train_cfg(muon_batched=b, muon_weight_decay=0.1))
                  for b in (False, True))
  s_one, s_batched = one.init(params), batched.init(params)
  stacked = [x.shape for x in jax.tree_util.tree_leaves(s_batched)
             if x.ndim == 3 and x.shape[0] == MUON_CFG.n_layer]
  e = MUON_CFG.n_embd
  assert sorted(stacked) == sorted([(MUON_CFG.n_layer, e, 3 * e), (MUON_CFG.n_layer, e, e),
                                    (MUON_CFG.n_layer, e, 4 * e), (MUON_CFG.n_layer, 4 * e, e)])
  update = jax.jit(lambda s, g, p: (one.update(g, s[0], p), batched.update(g, s[1], p)))
  labels = _flat(optim_variants.muon_labels(params))
  for g in grads:
    (u_one, s_one), (u_batched, s_batched) = update((s_one, s_batched), g, params)
    u_one, u_batched = _flat(u_one), _flat(u_batched)
    assert u_one.keys() == u_batched.keys()
    for k in u_one:
      if labels[k] == 'adamw':
        np.testing.assert_array_equal(u_batched[k], u_one[k], err_msg=k)
      else:  # Entries ~0.5 * lr; float32 rounding apart (measured up to about 1e-6 * lr), as the
        # reference test above bounds float32 against float64. A matrix mixed up with another of
        # its shape would be off by ~lr.
        lr = 0.03
        np.testing.assert_allclose(u_batched[k], u_one[k], rtol=0, atol=1e-5 * lr, err_msg=k)
        assert np.abs(np.asarray(u_one[k])).max() > 0.1 * lr


@pytest.mark.slow
def test_muon_weight_decay_is_its_own_and_only_on_the_matrices():
  """With zero gradients Muon's update is pure decay: matrices *= 1 - muon_lr * muon_weight_decay,
  AdamW's >= 2-D leaves *= 1 - lr * weight_decay, the rest unchanged."""
  t = _muon_train_cfg(muon_weight_decay=0.5, weight_decay=0.25)
  params = _params(MUON_CFG)
  tx = optim.make_optimizer(t)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
  new = _flat(jax.jit(optax.apply_updates)(params, updates))
  labels = _flat(optim_variants.muon_labels(params))
  for k, p in _flat(params).items():
    if labels[k] == 'muon':
      factor = 1 - t.muon_learning_rate * t.muon_weight_decay
    else:
      factor = 1 - t.learning_rate * t.weight_decay if p.ndim >= 2 else 1.0
    np.testing.assert_allclose(new[k], p * factor, rtol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize('batched', [False, True])
def test_muon_state_round_trips_through_orbax(tmp_path, batched):
  model_cfg = MUON_CFG
  t = _muon_train_cfg(muon_batched=batched)
  # Committed to the device, as the restored state is, so that both lower to one program: the step
  # is traced again for the restored state (its optimizer is another object, part of the tree's
  # structure), and that compile then loads from the session's compilation cache. Committed and
  # uncommitted arrays lower to different programs, each compiled in full.
  state = jax.device_put(step_lib.init_train_state(model_cfg, t), jax.devices()[0])
  data = _tokens((2000,), 3)
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(model_cfg), batch_size=4,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(t)))
  for _ in range(3):
    state, _ = step(state, data)
  ckpt = checkpoint_lib.Checkpointer(
      str(tmp_path / 'ckpt'), ml_collections.ConfigDict(dict(keep_last=2, async_save=False)))
  ckpt.save(3, state, {'model': model_cfg.to_dict()}, val_loss=1.0)
  ckpt.close()
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(model_cfg, t))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ckpt'), read_only=True)
  restored = ckpt.restore_state(3, abstract)
  # The other setting's state is stacked differently: one message that says what to resume with.
  other = jax.eval_shape(lambda: step_lib.init_train_state(
      model_cfg, _muon_train_cfg(muon_batched=not batched)))
  with pytest.raises(UserError, match='does not fit the configured model and optimizer.*muon_batched'):
    ckpt.restore_state(3, other)
  ckpt.close()
  a, b = step(state, data)[0], step(restored, data)[0]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- schedules ------------------------------------------------------------------------------------

def _wsd(**overrides) -> ml_collections.ConfigDict:
  t = shakespeare.get_config('').train
  t.update(lr_schedule='wsd', learning_rate=2e-3, min_learning_rate=2e-4, warmup_steps=100,
           lr_decay_steps=1000, cooldown_fraction=0.25)
  t.update(**overrides)
  return t


def test_wsd_schedule_values():
  """Warmup 0 -> peak over 100 steps, peak until step 750, 1 - sqrt down to min at 1000, flat after."""
  t = _wsd()
  lr = jax.jit(optim.lr_schedule(t))
  at = lambda s: float(lr(s))
  assert at(0) == 0.0
  assert at(50) == pytest.approx(1e-3, rel=1e-6)
  assert at(100) == pytest.approx(2e-3, rel=1e-6)  # Warmup end.
  for s in (101, 400, 749, 750):  # Stable, up to the first cooldown step.
    assert at(s) == pytest.approx(2e-3, rel=1e-6), s
  for s in (751, 812, 875, 999):  # 1 - sqrt of the fraction of the cooldown done.
    want = 2e-4 + (2e-3 - 2e-4) * (1 - math.sqrt((s - 750) / 250))
    assert at(s) == pytest.approx(want, rel=1e-5), s
  assert at(875) < 2e-4 + 0.5 * (2e-3 - 2e-4)  # Below the linear cooldown's midpoint.
  for s in (1000, 1001, 5000):
    assert at(s) == pytest.approx(2e-4, rel=1e-6), s
  # Muon's schedule: the same shape, scaled.
  scaled = optim.lr_schedule(t, 10.0)
  for s in (50, 400, 875, 2000):
    assert float(scaled(s)) == pytest.approx(10 * at(s), rel=1e-6)


def test_wsd_without_warmup_starts_at_the_peak():
  lr = optim.lr_schedule(_wsd(warmup_steps=0))
  assert float(lr(0)) == pytest.approx(2e-3, rel=1e-6)
  assert float(lr(1000)) == pytest.approx(2e-4, rel=1e-6)


@pytest.mark.parametrize('bad, message', [(dict(cooldown_fraction=0.95), 'inside the warmup'),
                                          (dict(cooldown_fraction=0.0), 'cooldown_fraction'),
                                          (dict(lr_schedule='linear'), 'lr_schedule')])
def test_bad_schedule_is_a_user_error(bad, message):
  with pytest.raises(UserError, match=message):
    optim.lr_schedule(_wsd(**bad))


# --- EMA of the weights ----------------------------------------------------------------------------


def _ema_train_cfg(**overrides) -> ml_collections.ConfigDict:
  t = shakespeare.get_config('tiny').train
  t.update(warmup_steps=0, learning_rate=1e-2, min_learning_rate=1e-2, **overrides)
  return t


@pytest.mark.slow
def test_ema_off_keeps_no_average_and_on_never_changes_the_training_weights():
  """ema_decay = 0 builds exactly the optimizer of before (no EmaState, the same state tree); on, the
  updates that reach the params are bit-identical to off (the average is only a bystander).
  Mutations caught: an EMA that feeds its average back into the updates, or one always on."""
  params = _params(CFG)
  grads = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params)
  off, on = optim.make_optimizer(_ema_train_cfg()), optim.make_optimizer(_ema_train_cfg(ema_decay=0.9))
  s_off, s_on = jax.jit(off.init)(params), jax.jit(on.init)(params)  # Jitted: eager ops compile one by one.
  assert optim_variants.ema_state(s_off) is None and isinstance(optim_variants.ema_state(s_on), optim_variants.EmaState)
  plain = optim.adamw(_ema_train_cfg())
  assert jax.tree_util.tree_structure(s_off) == jax.tree_util.tree_structure(jax.eval_shape(plain.init, params))
  update_off, update_on, apply = jax.jit(off.update), jax.jit(on.update), jax.jit(optax.apply_updates)
  for _ in range(3):
    u_off, s_off = update_off(grads, s_off, params)
    u_on, s_on = update_on(grads, s_on, params)
    for a, b in zip(jax.tree_util.tree_leaves(u_off), jax.tree_util.tree_leaves(u_on)):
      np.testing.assert_array_equal(a, b)
    params = apply(params, u_on)


def test_ema_follows_the_debiased_average_formula():
  """After t updates the average is sum_i d^(t-i) (1 - d) p_i / (1 - d^t) of the weights p_i after
  each update (float64 reference), and before any update it is the initial weights.
  Mutations caught: a missing bias correction, the old weights averaged instead of the new, d and
  1 - d swapped."""
  d = 0.8
  tx = optim.make_optimizer(_ema_train_cfg(ema_decay=d))
  params = _params(CFG)
  state = jax.jit(tx.init)(params)
  for a, b in zip(jax.tree_util.tree_leaves(optim_variants.ema_state(state).ema), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  update, apply = jax.jit(tx.update), jax.jit(optax.apply_updates)
  history = []
  rng = np.random.default_rng(0)
  for _ in range(6):
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = update(grads, state, params)
    params = apply(params, updates)
    history.append(jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params))
  t = len(history)
  want = jax.tree_util.tree_map(
      lambda *ps: sum(d ** (t - 1 - i) * (1 - d) * p for i, p in enumerate(ps)) / (1 - d ** t), *history)
  ema = optim_variants.ema_state(state)
  assert int(ema.count) == t
  for got, ref in zip(jax.tree_util.tree_leaves(ema.ema), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # And it is not simply the last weights (which a decay ignored would give).
  last = jax.tree_util.tree_leaves(params)[0]
  assert not np.allclose(jax.tree_util.tree_leaves(ema.ema)[0], last, atol=1e-4)


def test_bad_ema_decay_is_a_user_error():
  with pytest.raises(UserError, match='ema_decay'):
    optim.make_optimizer(_ema_train_cfg(ema_decay=1.0))


@pytest.mark.slow
def test_ema_run_evaluates_and_keeps_the_average_and_resumes_exactly(tiny_config, tmp_path):
  """A tiny run with ema_decay: every eval's val loss is the EMA weights' (a direct eval_step on the
  checkpoint's average agrees), the kept checkpoint gives inference the average, and a run stopped
  half-way and resumed ends with bit-identical losses and average.
  Mutations caught: evals or inference reading the training params, the average left out of the
  checkpoint (a resumed average restarts)."""
  from gpt_jax.data import text as text_lib
  from gpt_jax.training import loop as loop_lib
  tiny_config.train.update(max_steps=40, eval_interval=20, log_interval=1, ema_decay=0.9)
  tiny_config.checkpoint.save = 'always'

  def run(out_dir):
    tiny_config.out_dir = str(out_dir)
    loop_lib.train_and_evaluate(tiny_config)
    return [json.loads(line) for line in (out_dir / 'metrics.jsonl').read_text(encoding='utf-8').splitlines()]

  straight = run(tmp_path / 'straight')
  tiny_config.train.max_steps = 20
  run(tmp_path / 'resumed')
  tiny_config.train.update(max_steps=40, resume=True)
  resumed = run(tmp_path / 'resumed')
  losses = lambda recs, key: {r['step']: r[key] for r in recs if key in r}
  for key in ('train_loss', 'val_loss'):
    want, got = losses(straight, key), losses(resumed, key)
    assert all(got[s] == want[s] for s in got) and 40 in got, key

  ckpt_dir = str(tmp_path / 'straight')
  cfg, params, meta = checkpoint_lib.load_for_inference(ckpt_dir, 40)
  assert meta['inference_params'] == 'ema_params'
  ckpt = checkpoint_lib.Checkpointer(f'{ckpt_dir}/checkpoints', read_only=True)
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(cfg, tiny_config.train))
  state = ckpt.restore_state(40, abstract)
  ckpt.close()
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  for a, b in zip(leaves(params), leaves(optim_variants.ema_state(state.opt_state).ema)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(params), leaves(state.params)))
  # The logged val loss at step 40 is the average's, not the training weights'.
  ds = text_lib.Dataset(tiny_config.data.data_dir)
  from gpt_jax.data import batches as batches_lib
  src = batches_lib.ResidentBatches({'train': ds.train, 'val': ds.val}, cfg.block_size,
                                    tiny_config.train.batch_size, 1, None)
  base = jax.random.fold_in(jax.random.PRNGKey(tiny_config.train.seed), batches_lib.EVAL_KEY_SALT)
  ev = jax.jit(functools.partial(step_lib.eval_step, model=GPT(cfg), draw=src.draw,
                                 batch_size=tiny_config.train.batch_size))
  val = lambda p: float(sum(np.float32(ev(p, src.eval_inputs('val', i), jax.random.fold_in(base, i)))
                            for i in range(tiny_config.train.eval_iters)) / tiny_config.train.eval_iters)
  logged = losses(straight, 'val_loss')[40]
  assert val(params) == pytest.approx(logged, abs=1e-6)
  assert val(state.params) != pytest.approx(logged, abs=1e-6)
