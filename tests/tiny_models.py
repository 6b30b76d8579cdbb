"""A tiny model config and the helpers the model and optimizer tests share (tests/test_model_variants.py,
tests/test_optim_variants.py, tests/test_speedrun_options.py)."""

import dataclasses

import jax

from gpt_jax import model as model_lib
from gpt_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=29, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def cfg(**kw) -> ModelConfig:
  """CFG with some fields replaced."""
  return dataclasses.replace(CFG, **kw)


def params(cfg: ModelConfig, seed: int = 0):
  """Fresh parameters, initialised by one jitted program."""
  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def shapes(cfg: ModelConfig):
  """The parameter tree `params` would return, as shapes and dtypes only: nothing is compiled."""
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))


def tokens(shape, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def flat(tree) -> dict[str, jax.Array]:
  """{'h_0.attn.c_attn.kernel': leaf, ...}: a parameter tree by dotted name."""
  return {'.'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
