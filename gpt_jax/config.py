"""The model's hyperparameters as a small frozen dataclass, and checks on the whole run config.

The run config (optimizer, data, checkpoints, ...) is an `ml_collections.ConfigDict` built by a
`configs/*.py` file. The model part is turned into a frozen `ModelConfig`: hashable (so it can be a
static attribute of Flax modules and jitted functions) and saved as JSON beside every checkpoint, so
sampling needs nothing but the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

import ml_collections

from gpt_jax.errors import UserError

ATTENTION_BACKENDS = ('manual', 'xla', 'cudnn', 'auto')  # See model.attention_implementation.
DTYPES = ('float32', 'bfloat16', 'float16')
POSITIONS = ('learned', 'rotary')
ACTIVATIONS = ('gelu', 'relu2')
# The pieces `ModelConfig.ablate` can take out of GPT-2, to see what each one is for.
ABLATIONS = ('attention', 'positions', 'residual', 'layernorm', 'heads', 'mlp')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPT-2 shape and behaviour. Defaults are nanoGPT's `shakespeare_char` model."""
  vocab_size: int = 65
  block_size: int = 256         # Longest context; also the size of the position table `wpe`.
  n_layer: int = 6
  n_head: int = 6
  n_embd: int = 384
  dropout: float = 0.2
  bias: bool = False            # Biases in Linear and LayerNorm (GPT-2: True; nanoGPT char: False).
  gelu_approximate: bool = False  # False: exact erf GELU (nanoGPT); True: tanh form (GPT-2).
  attention: str = 'manual'     # Full forwards and prefills: 'manual' (written out), 'xla' / 'cudnn'
                                # (jax.nn.dot_product_attention's implementations) or 'auto' (cuDNN
                                # where it applies, else XLA); model.attention_implementation decides.
                                # Decode steps always use model.cached_attention.
  attention_dropout: bool = True  # Dropout on the attention probabilities (GPT-2). False keeps only the
                                # embedding and residual dropout, which lets fused kernels train.
  dtype: str = 'float32'        # Compute dtype of the matmuls; parameters and the residual stream
                                # always stay float32 (as torch.autocast keeps them).
  remat: bool = False           # Recompute each block's activations in the backward pass (saves memory).
  # Speedrun options (issue 14), all off by default: the defaults are GPT-2 / nanoGPT exactly, and a
  # saved config without these fields (an older checkpoint) means exactly that model.
  position: str = 'learned'     # 'learned' (GPT-2's table `wpe`) or 'rotary' (RoPE on q, k; no wpe).
  rope_base: float = 10000.0    # position='rotary': the wavelength base of the rotary frequencies.
  qk_norm: bool = False         # RMS-normalise q and k per head (learned scale) before q k^T.
  activation: str = 'gelu'      # MLP nonlinearity: 'gelu' (GPT-2) or 'relu2' (ReLU squared).
  zero_init_proj: bool = False  # attn.c_proj and mlp.c_proj kernels start at zero (init only).
  # Ablations, to learn what each piece of GPT-2 is for by training without it: a comma-separated
  # subset of ABLATIONS ('' = none). attention: each position attends only to itself; positions: no
  # position information; residual: no residual connections; layernorm: ln_1, ln_2, ln_f are the
  # identity; heads: one head of size n_embd; mlp: no MLP sub-layer. See `ablated`.
  ablate: str = ''

  def __post_init__(self):
    problems = []
    for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
      if int(getattr(self, name)) < 1:
        problems.append(f'model.{name} must be >= 1 (got {getattr(self, name)})')
    if self.n_head >= 1 and self.n_embd % self.n_head:
      problems.append(f'model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})')
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f'model.dropout must be in [0, 1) (got {self.dropout})')
    if self.attention not in ATTENTION_BACKENDS:
      problems.append(f'model.attention must be one of {ATTENTION_BACKENDS} (got {self.attention!r})')
    if self.dtype not in DTYPES:
      problems.append(f'model.dtype must be one of {DTYPES} (got {self.dtype!r})')
    unknown = sorted(self.ablated - set(ABLATIONS))
    if unknown:
      problems.append(f'model.ablate: unknown piece(s) {unknown}; it takes a comma-separated subset of '
                      f'{ABLATIONS}, e.g. \'attention,mlp\' (\'\' = the whole model)')
    if self.position not in POSITIONS:
      problems.append(f'model.position must be one of {POSITIONS} (got {self.position!r})')
    elif self.position == 'rotary' and self.n_head >= 1 and self.head_size % 2:
      problems.append(f'model.position=\'rotary\' rotates pairs of head dimensions, so the head size '
                      f'n_embd // n_head must be even (got {self.head_size})')
    if not self.rope_base > 0:
      problems.append(f'model.rope_base must be > 0 (got {self.rope_base})')
    if self.activation not in ACTIVATIONS:
      problems.append(f'model.activation must be one of {ACTIVATIONS} (got {self.activation!r})')
    if problems:
      raise UserError('invalid model config: ' + '; '.join(problems))

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
    unknown = sorted(set(d) - fields)
    if unknown:
      raise UserError(f'unknown model config field(s) {unknown}; known fields are {sorted(fields)}')
    return cls(**{k: d[k] for k in d})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def non_gpt2_options(self) -> list[str]:
    """The options set that change the function away from GPT-2's (empty for a GPT-2 model).

    zero_init_proj is not among them: it only changes the starting point, not the architecture.
    """
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

  def diff(self, other: 'ModelConfig') -> list[str]:
    """Human-readable list of fields where `other` differs from `self`."""
    return [f'{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}'
            for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
  """Parameter count from the architecture alone (the model's own count must agree).

  Per block: two LayerNorms, c_attn (C x 3C), attn.c_proj (C x C), mlp.c_fc (C x 4C), mlp.c_proj
  (4C x C) = 12 C^2 weights, plus 13 C biases when `bias`, plus two head-size scales with `qk_norm`.
  The LM head is tied to `wte`, so it adds nothing. Like nanoGPT, `non_embedding=True` leaves out the
  position table `wpe` (the token table is kept because it is also the output layer); a rotary model
  has no such table. Ablations remove what they name: the LayerNorms, the MLP (with its ln_2), `wpe`.
  """
  C, L, off = cfg.n_embd, cfg.n_layer, cfg.ablated
  ln = 0 if 'layernorm' in off else 2 * C if cfg.bias else C
  qk = 2 * cfg.head_size if cfg.qk_norm else 0  # attn.q_norm and attn.k_norm scales.
  attn = ln + 4 * C * C + (4 * C if cfg.bias else 0) + qk  # ln_1, c_attn, c_proj.
  mlp = 0 if 'mlp' in off else ln + 8 * C * C + (5 * C if cfg.bias else 0)  # ln_2, c_fc, c_proj.
  per_block = attn + mlp
  wpe = cfg.block_size * C if cfg.position == 'learned' and 'positions' not in off else 0
  n = cfg.vocab_size * C + wpe + L * per_block + ln
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


def load_config_file(path: str, preset: str = '') -> ml_collections.ConfigDict:
  """`get_config(preset)` of a config file given by path, as `config_flags` would load it.

  Config files are plain files, not a package, so one preset file builds on another through this
  (e.g. configs/shakespeare_bpe.py starts from configs/shakespeare.py).
  """
  name = '_gpt_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)
