"""The model's and the sampler's settings as small frozen dataclasses.

`ModelConfig` is hashable (a static attribute of Flax modules and jitted functions) and saved as JSON
beside every checkpoint, so sampling needs nothing but the checkpoint directory. The rest of a run's
config is an `ml_collections.ConfigDict` built by a configs/*.py file (gpt_jax/config_files.py); every
check of every section is in gpt_jax/config_checks.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from gpt_jax.errors import UserError

ABLATIONS = ('attention', 'positions', 'residual', 'layernorm', 'heads', 'mlp')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPT-2's shape, how it runs, and the departures from it. Defaults: nanoGPT's `shakespeare_char`."""
  # GPT-2's shape.
  vocab_size: int = 65
  block_size: int = 256         # Longest context; also the size of the position table `wpe`.
  n_layer: int = 6
  n_head: int = 6
  n_embd: int = 384
  dropout: float = 0.2
  bias: bool = False            # Biases in Linear and LayerNorm (GPT-2: True; nanoGPT char: False).
  gelu_approximate: bool = False  # False: exact erf GELU (nanoGPT); True: tanh form (GPT-2).
  # How it runs: none of these changes the parameters.
  dtype: str = 'float32'        # Compute dtype of the matmuls; parameters and the residual stream
                                # always stay float32 (as torch.autocast keeps them).
  attention: str = 'manual'     # Full forwards and prefills: 'manual' (written out), 'xla' / 'cudnn'
                                # (jax.nn.dot_product_attention's), 'flash' (our Pallas kernel) or 'auto'
                                # (attention.attention_implementation). Decode: attention.cached_attention.
  attention_dropout: bool = True  # Dropout on the attention probabilities (GPT-2). False keeps only the
                                # embedding and residual dropout, which lets cuDNN attention train.
  remat: bool = False           # Recompute each block's activations in the backward pass (saves memory).
  # Departures from GPT-2 (gpt_jax/model_variants.py), all off by default: the defaults are GPT-2 /
  # nanoGPT exactly, and a saved config without these fields (an older checkpoint) means that model.
  # Speedrun options, for a model that trains faster:
  position: str = 'learned'     # 'learned' (GPT-2's table `wpe`) or 'rotary' (RoPE on q, k; no wpe).
  rope_base: float = 10000.0    # position='rotary': the wavelength base of the rotary frequencies.
  qk_norm: bool = False         # RMS-normalise q and k per head (learned scale) before q k^T.
  activation: str = 'gelu'      # MLP nonlinearity: 'gelu' (GPT-2) or 'relu2' (ReLU squared).
  zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj kernels start at zero (init only).
  # Ablations, to learn what each piece of GPT-2 is for by training without it: a comma-separated
  # subset of ABLATIONS ('' = none). attention: each position attends only to itself; positions: no
  # position information; residual: no residual connections; layernorm: ln_1, ln_2, ln_f are the
  # identity; heads: one head of size n_embd; mlp: no MLP sub-layer.
  ablate: str = ''

  def __post_init__(self):
    from gpt_jax import config_checks  # Lazily: config_checks builds on this module.
    config_checks.raise_problems(config_checks.model_config_problems(self), 'invalid model config')

  @property
  def ablated(self) -> frozenset[str]:
    """The pieces `ablate` names, as a set (empty for the whole model)."""
    return frozenset(a.strip() for a in self.ablate.split(',') if a.strip())

  @property
  def heads(self) -> int:
    """How many heads attention splits into: n_head, or 1 with the 'heads' ablation."""
    return 1 if 'heads' in self.ablated else self.n_head

  @property
  def head_size(self) -> int:
    return self.n_embd // self.heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Builds from a mapping (a ConfigDict section or saved JSON); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - fields):
      raise UserError(f'unknown model config field(s) {unknown}; known fields are {sorted(fields)}')
    return cls(**{k: d[k] for k in d})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def non_gpt2_options(self) -> list[str]:
    """The options that change the function away from GPT-2's (not zero_init_proj: only the start)."""
    out = []
    if self.position != 'learned':
      out.append(f'model.position={self.position!r}')
    if self.qk_norm:
      out.append('model.qk_norm=True')
    if self.activation != 'gelu':
      out.append(f'model.activation={self.activation!r}')
    if self.ablated:
      out.append(f'model.ablate={self.ablate!r}')
    return out

  def diff(self, other: ModelConfig) -> list[str]:
    """Human-readable list of fields where `other` differs from `self`."""
    return [f'{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}'
            for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Text generation: the defaults of scripts/sample.py's flags and of the sample printed at each eval."""
  prompt: str = '\n'           # Text to continue.
  num_samples: int = 1          # scripts/sample.py: samples generated together as one batch.
  max_new_tokens: int = 500     # scripts/sample.py: tokens generated per sample.
  temperature: float = 0.8      # Softmax temperature; 0 = greedy.
  top_k: int = 200              # Sample only from the k most likely tokens (0 = all).
  seed: int = 1337
  eval_tokens: int = 200        # Length of the sample printed at every eval (0 = none).
  window_shift: int = 0         # Re-encode every N tokens past block_size (0 = block_size // 4; 1 = nanoGPT).


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
  """Parameter count from the architecture alone (the model's own count must agree).

  Per block: two LayerNorms, c_attn (C x 3C), attn.c_proj (C x C), mlp.c_fc (C x 4C), mlp.c_proj
  (4C x C) = 12 C^2 weights, plus 13 C biases when `bias`, plus two head-size scales with `qk_norm`.
  The LM head is tied to `wte`, so it adds nothing. Like nanoGPT, `non_embedding=True` leaves out the
  position table `wpe` (the token table is kept because it is also the output layer); a rotary model
  has no such table. Ablations remove what they name: the LayerNorms, the MLP (with its ln_2), `wpe`.
  """
  C, off = cfg.n_embd, cfg.ablated
  ln = 0 if 'layernorm' in off else 2 * C if cfg.bias else C
  qk = 2 * cfg.head_size if cfg.qk_norm else 0  # attn.q_norm and attn.k_norm scales.
  attn = ln + 4 * C * C + (4 * C if cfg.bias else 0) + qk  # ln_1, c_attn, c_proj.
  mlp = 0 if 'mlp' in off else ln + 8 * C * C + (5 * C if cfg.bias else 0)  # ln_2, c_fc, c_proj.
  wpe = cfg.block_size * C if cfg.position == 'learned' and 'positions' not in off else 0
  n = cfg.vocab_size * C + wpe + cfg.n_layer * (attn + mlp) + ln
  return n - wpe if non_embedding else n


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT's estimate_mfu."""
  n = num_params(cfg, non_embedding=True)
  return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run; `model.vocab_size = 0` means 'take it from the data'."""
  m = config.model.to_dict()
  if not m['vocab_size']:
    m['vocab_size'] = vocab_size
  elif m['vocab_size'] < vocab_size:
    raise UserError(f'model.vocab_size={m["vocab_size"]} is smaller than the tokenizer\'s vocabulary '
                    f'({vocab_size}); set it to 0 (automatic) or at least {vocab_size}.')
  return ModelConfig.from_dict(m)
