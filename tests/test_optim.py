"""The hand-written AdamW ('adamw_by_hand') against the optax chain ('adamw') and optax.adamw, the
schedule, the decay mask, clipping, and the optimizer names old runs stored."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import shakespeare
from gpt_jax import checkpoint as checkpoint_lib, optim
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.training.step import TrainState, loss_fn

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                  bias=True)


def _train_cfg(optimizer: str, **overrides) -> ml_collections.ConfigDict:
  """The shakespeare train section with a schedule whose warmup, cosine and flat tail fit in 200."""
  t = shakespeare.get_config('tiny').train
  t.update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=20, lr_decay_steps=150,
           beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=0.8, optimizer=optimizer)
  t.update(**overrides)
  return t


@functools.lru_cache(maxsize=None)
def _tx(optimizer: str, overrides: tuple = ()):
  """One optimizer object per setting: TrainState.tx is static under jit, so reusing the object
  reuses the compiled step instead of compiling again."""
  return optim.make_optimizer(_train_cfg(optimizer, **dict(overrides)))


@functools.lru_cache(maxsize=None)
def _init_params():
  model = GPT(CFG)
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']


def _state(optimizer: str, **overrides) -> TrainState:
  state = TrainState.create(apply_fn=GPT(CFG).apply, params=_init_params(),
                            tx=_tx(optimizer, tuple(sorted(overrides.items()))),
                            key=jax.random.PRNGKey(1))
  return state.replace(step=jnp.zeros((), jnp.int32))  # An array, as init_train_state makes it.


@jax.jit
def _apply(state: TrainState, grads) -> TrainState:
  return state.apply_gradients(grads=grads)


DATA = jax.random.randint(jax.random.PRNGKey(2), (4096,), 0, CFG.vocab_size)


@jax.jit
def _step(state: TrainState) -> tuple[TrainState, jax.Array]:
  """One update on a batch fixed by the step number (the same batches for both optimizers)."""
  starts = jax.random.randint(jax.random.fold_in(state.key, state.step), (8,), 0,
                              DATA.shape[0] - CFG.block_size - 1)
  idx = starts[:, None] + jnp.arange(CFG.block_size)
  x, y = DATA[idx], DATA[idx + 1]
  grads = jax.grad(loss_fn)(state.params, GPT(CFG), x, y, None)
  return state.apply_gradients(grads=grads), optim.global_norm(grads)


def _run(state: TrainState, n: int) -> tuple[TrainState, list[float]]:
  norms = []
  for _ in range(n):
    state, norm = _step(state)
    norms.append(float(norm))
  return state, norms


def _max_rel_diff(a, b) -> float:
  """max over leaves of ||a - b|| / ||b||."""
  return max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_adamw_by_hand_matches_the_optax_chain_over_200_steps():
  """Same start, same batches: the two optimizers must give the same parameters.

  The model has biases on purpose. The key part of c_attn's bias has a mathematically zero gradient
  (adding a constant to every key shifts each row of scores by a constant, which softmax ignores),
  so Adam normalises pure rounding noise there into lr-sized steps: any difference in the float
  operations shows up in that tensor first. In practice the two agree bit for bit.
  """
  s_adamw, norms = _run(_state('adamw'), 200)
  s_by_hand, _ = _run(_state('adamw_by_hand'), 200)
  assert int(s_adamw.step) == int(s_by_hand.step) == 200
  assert any(n > 0.8 for n in norms) and any(n < 0.8 for n in norms), 'clipping never/always on'
  start = _state('adamw').params
  assert _max_rel_diff(s_adamw.params, start) > 0.05  # The parameters really moved.
  rel = _max_rel_diff(s_by_hand.params, s_adamw.params)
  print(f'adamw_by_hand vs adamw after 200 steps: max per-tensor relative difference {rel:.2e}')
  assert rel < 1e-6
  for a, b in zip(jax.tree_util.tree_leaves(s_by_hand.params),
                  jax.tree_util.tree_leaves(s_adamw.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adamw_by_hand_state_round_trips_through_orbax(tmp_path):
  state, _ = _run(_state('adamw_by_hand'), 5)
  assert isinstance(state.opt_state, optim.AdamWByHandState)
  ckpt = checkpoint_lib.Checkpointer(
      str(tmp_path / 'ckpt'), ml_collections.ConfigDict(dict(keep_last=2, async_save=False)))
  ckpt.save(5, state, {'model': CFG.to_dict()}, val_loss=1.0)
  ckpt.close()

  fresh = _state('adamw_by_hand')
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, 'shape') else a, fresh)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ckpt'), read_only=True)
  restored = ckpt.restore_state(5, abstract)
  ckpt.close()

  assert isinstance(restored.opt_state, optim.AdamWByHandState)
  for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state, state.step, state.key)),
                  jax.tree_util.tree_leaves((restored.params, restored.opt_state, restored.step,
                                             restored.key))):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  cont_a, _ = _run(state, 5)
  cont_b, _ = _run(restored, 5)
  for a, b in zip(jax.tree_util.tree_leaves(cont_a.params), jax.tree_util.tree_leaves(cont_b.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nanogpt_get_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int,
                   lr_decay_iters: int) -> float:
  """nanoGPT's get_lr (original form: warmup `lr * it / warmup_iters`, i.e. from 0 as optax)."""
  if it < warmup_iters:
    return learning_rate * it / warmup_iters
  if it > lr_decay_iters:
    return min_lr
  decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize('preset', ['', 'cpu'])
def test_schedule_matches_nanogpt_formula(preset):
  t = shakespeare.get_config(preset).train
  optax_lr = optim.lr_schedule(t)
  args = (t.learning_rate, t.min_learning_rate, t.warmup_steps, t.lr_decay_steps)
  steps = [0, 1, t.warmup_steps // 2, t.warmup_steps - 1, t.warmup_steps, t.warmup_steps + 1,
           (t.warmup_steps + t.lr_decay_steps) // 2, t.lr_decay_steps - 1, t.lr_decay_steps,
           t.lr_decay_steps + 1, 2 * t.lr_decay_steps]
  for s in steps:
    want = nanogpt_get_lr(s, *args)
    assert float(optax_lr(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s
  assert float(optax_lr(0)) == 0.0  # Warmup from 0: the first update only fills the moments.
  assert float(optax_lr(t.warmup_steps)) == pytest.approx(t.learning_rate, rel=1e-6)
  assert float(optax_lr(10 * t.lr_decay_steps)) == pytest.approx(t.min_learning_rate, rel=1e-6)


def test_constant_schedule_without_warmup():
  t = _train_cfg('adamw_by_hand', warmup_steps=0, learning_rate=3e-5, min_learning_rate=3e-5)
  for s in (0, 1, 100, 10_000):
    assert float(optim.lr_schedule(t)(s)) == pytest.approx(3e-5, rel=1e-6)


def test_decay_mask_selects_matrices_and_embeddings():
  params = _state('adamw').params
  mask = optim.decay_mask(params)
  assert mask['wte'] and mask['wpe']
  assert mask['h_0']['attn']['c_attn']['kernel'] and mask['h_1']['mlp']['c_proj']['kernel']
  assert not mask['h_0']['attn']['c_attn']['bias'] and not mask['h_0']['mlp']['c_fc']['bias']
  assert not mask['h_0']['ln_1']['scale'] and not mask['h_0']['ln_1']['bias']
  assert not mask['ln_f']['scale'] and not mask['ln_f']['bias']


@pytest.mark.parametrize('optimizer', ['adamw', 'adamw_by_hand'])
def test_weight_decay_only_shrinks_masked_params(optimizer):
  """With zero gradients the Adam term is 0, so one step is pure decoupled decay: p *= 1 - lr*wd."""
  lr, wd = 0.1, 0.5
  state = _state(optimizer, warmup_steps=0, learning_rate=lr, min_learning_rate=lr, weight_decay=wd)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  new = _apply(state, zeros).params
  mask = optim.decay_mask(state.params)
  for p, q, m in zip(*(jax.tree_util.tree_leaves(t) for t in (state.params, new, mask))):
    np.testing.assert_allclose(np.asarray(q), np.asarray(p) * ((1 - lr * wd) if m else 1.0),
                               rtol=1e-6)


def test_clip_by_global_norm():
  grads = {'a': jnp.full((3, 4), 2.0), 'b': {'c': -jnp.arange(5.0)}}
  norm = float(optim.global_norm(grads))
  assert norm == pytest.approx(math.sqrt(12 * 4 + sum(i * i for i in range(5))))
  clipped = optim.clip_by_global_norm(grads, 1.0)
  assert float(optim.global_norm(clipped)) <= 1.0 + 1e-6
  # The direction is kept: every leaf is scaled by the same factor.
  np.testing.assert_allclose(np.asarray(clipped['a']), np.asarray(grads['a']) / norm, rtol=1e-6)
  # Below the threshold nothing changes.
  same = optim.clip_by_global_norm(grads, 2 * norm)
  for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Zero gradients stay zero (no 0/0).
  zero = optim.clip_by_global_norm({'a': jnp.zeros(3)}, 1.0)
  np.testing.assert_array_equal(np.asarray(zero['a']), np.zeros(3))


@pytest.mark.slow
def test_clipping_caps_the_by_hand_update_like_the_optax_chain():
  """Both optimizers clip alike, over steps whose gradient norms swing far above and below the cap.

  One step can't show it (Adam's first step is about sign(g), clipped or not), so this runs several
  with scales from 1e-3 to 1e4 times the clip threshold. Adam's moments then depend on the *clipped*
  magnitudes, so an optimizer that skipped clipping lands somewhere else (checked: with no clipping
  the same steps end measurably apart).
  """
  scales = [1e4, 1e-3, 30.0, 1e-2, 3e3, 0.5, 1e2, 1e-3]
  template = jax.tree_util.tree_map(jnp.ones_like, _init_params())
  leaves, treedef = jax.tree_util.tree_flatten(template)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  direction = jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  unit = optax.tree.norm(direction)

  def run(optimizer, **overrides):
    state = _state(optimizer, warmup_steps=0, **overrides)
    for i, scale in enumerate(scales):
      g = jax.tree_util.tree_map(lambda d, scale=scale, i=i: d * (scale * 0.8 / unit) * (1 + 0.1 * i),
                                 direction)
      state = _apply(state, g)
    return jax.tree_util.tree_map(jnp.subtract, state.params, _init_params())  # The total update.

  want = run('adamw')
  assert _max_rel_diff(run('adamw_by_hand'), want) < 1e-5
  unclipped = run('adamw', grad_clip=0.0)
  assert _max_rel_diff(unclipped, want) > 1e-3  # The test can tell clipping from no clipping.


def test_unknown_optimizer_is_a_user_error():
  with pytest.raises(UserError, match="train.optimizer must be one of"):
    optim.make_optimizer(_train_cfg('sgd'))
  with pytest.raises(UserError, match=r"\('adamw', 'adamw_by_hand', 'muon'\) \(got 'Optax'\)"):
    optim.optimizer_name('Optax')


@pytest.mark.parametrize('old, new', [('optax', 'adamw'), ('scratch', 'adamw_by_hand')])
def test_old_optimizer_names_build_the_same_optimizer(old, new):
  """Runs saved before the rename stored 'optax' and 'scratch': each still names its optimizer, with
  the same state tree (so their checkpoints restore; tests/test_checkpoint_compat.py resumes some)."""
  assert optim.optimizer_name(old) == new and optim.optimizer_name(new) == new
  params = _init_params()
  trees = [jax.tree_util.tree_structure(jax.eval_shape(optim.make_optimizer(_train_cfg(name)).init, params))
           for name in (old, new)]
  assert trees[0] == trees[1]


@pytest.mark.parametrize('decay', [0.9, 0.95, 0.99, 0.999])
def test_bias_correction_is_accurate_in_float32(decay):
  """1 - decay**t within 3e-7 relative of float64 for 20k steps; the textbook float32 form is not."""
  t = np.arange(1, 20_001)
  exact = -np.expm1(t * np.log1p(-(1.0 - decay)))  # float64
  ours = np.asarray(jax.jit(functools.partial(optim.bias_correction, decay))(jnp.asarray(t, jnp.int32)))
  assert ours.dtype == np.float32
  rel = np.abs(ours.astype(np.float64) / exact - 1)
  assert rel.max() < 3e-7, (decay, rel.max(), int(rel.argmax()) + 1)
  if decay == 0.99:  # optax's form: float32(0.99) = 0.99000001 alone makes step 1 off by 9.5e-7.
    textbook = np.asarray(jax.jit(lambda t: 1 - decay ** t)(jnp.asarray(t, jnp.int32)), np.float64)
    assert np.abs(textbook / exact - 1).max() > 5e-7


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['adamw', 'adamw_by_hand'])
def test_adamw_is_optax_adamw_up_to_the_bias_correction(optimizer):
  """Fed the same gradients, both optimizers give optax.adamw's updates to within the error of its
  float32 bias correction, and the production chain keeps optax.adamw's state (same moments, same
  tree, so checkpoints restore either way)."""
  t = _train_cfg(optimizer)
  stock = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(
      optim.lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=optim.ADAM_EPS, weight_decay=t.weight_decay,
      mask=optim.decay_mask))
  ours = optim.make_optimizer(t)
  params = _init_params()
  s_ours, s_stock = ours.init(params), stock.init(params)
  if optimizer == 'adamw':
    assert jax.tree_util.tree_structure(s_ours) == jax.tree_util.tree_structure(s_stock)

  @jax.jit
  def both(key, s_ours, s_stock):
    # Gradients of varying scale and sign, some clipped: 0.02 * N(0, 1) * (1 + 50 * U).
    k1, k2 = jax.random.split(key)
    leaves, tree = jax.tree_util.tree_flatten(params)
    grads = tree.unflatten([0.02 * jax.random.normal(jax.random.fold_in(k1, i), p.shape)
                            * (1 + 50 * jax.random.uniform(k2)) for i, p in enumerate(leaves)])
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_stock, s_stock = stock.update(grads, s_stock, params)
    return u_ours, s_ours, u_stock, s_stock

  worst = 0.0
  for step in range(1, 31):  # lr 0 at step 0 (warmup from 0); compare from step 1 on.
    u_ours, s_ours, u_stock, s_stock = both(jax.random.PRNGKey(step), s_ours, s_stock)
    if step > 1:
      worst = max(worst, _max_rel_diff(u_ours, u_stock))
  print(f'{optimizer} vs optax.adamw over 30 updates: max per-tensor relative difference {worst:.2e}')
  assert 0 < worst < 3e-6  # Not identical (the corrections differ), but only by float32 rounding.
  if optimizer == 'adamw':  # Same moments, bit for bit.
    for a, b in zip(jax.tree_util.tree_leaves(s_ours), jax.tree_util.tree_leaves(s_stock)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
