"""GPT-2 weights both ways: Hugging Face directories <-> gpt_jax parameters and checkpoints.

A Hugging Face GPT-2 directory holds `config.json` and the weights as `model.safetensors` (or
sharded `model-0000x-of-0000n.safetensors` + `model.safetensors.index.json`, or the older
`pytorch_model.bin`), usually with the tokenizer files `vocab.json` + `merges.txt` (the same formats
as OpenAI's encoder.json + vocab.bpe). Nothing is downloaded here: the directory must be local.

The parameter layouts already agree, because gpt_jax's names and shapes follow GPT-2's:
  * GPT-2's Conv1D stores its weight as (in, out), which is our Linear kernel layout: no transpose;
  * c_attn's output is [q | k | v] along the last axis, heads contiguous, as in our attention;
  * LayerNorm `weight` is our `scale`; the LM head is tied to `wte` (an `lm_head.weight`, if
    present, must equal `wte`);
  * `h.N.attn.bias` / `h.N.attn.masked_bias` in old checkpoints are the causal-mask buffers, not
    parameters, and are skipped.
Keys may carry a `transformer.` prefix (GPT2LMHeadModel) or not (OpenAI's original upload, GPT2Model).

GPT-2 always has biases (in every Linear and LayerNorm) and LayerNorm epsilon 1e-5. `save_gpt2` of a
`bias=False` model therefore writes zero biases, which compute the same function; importing that
directory again gives a `bias=True` model whose biases are zero. A model that uses an option GPT-2
does not have (rotary positions, QK-norm, ReLU^2: `ModelConfig.non_gpt2_options`) has no GPT-2 form,
and exporting it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import files as files_lib
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, init_params

# HF activation_function -> our gelu_approximate. 'gelu_new' and 'gelu_pytorch_tanh' are both the
# tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) GPT-2 was trained with; 'gelu' is erf.
ACTIVATIONS = {'gelu_new': True, 'gelu_pytorch_tanh': True, 'gelu': False}

# GPT2Config's defaults: an HF config.json may leave out values equal to them.
HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   add_cross_attention=False, tie_word_embeddings=True)
LAYER_NORM_EPS = 1e-5  # gpt_jax.model.LayerNorm's epsilon.
EOT_ID = 50256         # <|endoftext|> in GPT-2's vocabulary.

SHAPE_FIELDS = ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'bias', 'gelu_approximate')

_HOW_TO_GET = ('gpt_jax never downloads weights at run time. On a machine with internet, fetch a '
               'Hugging Face GPT-2 directory, e.g. `huggingface-cli download openai-community/gpt2 '
               '--local-dir DIR` (weights, config.json, vocab.json, merges.txt), or in Python '
               '`transformers.GPT2LMHeadModel.from_pretrained("gpt2").save_pretrained(DIR)` (plus '
               '`transformers.AutoTokenizer.from_pretrained("gpt2").save_pretrained(DIR)` for the '
               'tokenizer files), and copy DIR here.')


# --- config ---------------------------------------------------------------------------------------

def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of a local HF directory (UserError if the directory or file is missing/invalid)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f'no GPT-2 directory at {path}. {_HOW_TO_GET}')
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise UserError(f'{path} has no config.json, so it is not a Hugging Face model directory. '
                    f'{_HOW_TO_GET}')
  try:
    with files_lib.guard(cfg_path, 'read'), open(cfg_path, encoding='utf-8') as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f'{cfg_path} is not valid JSON ({e}); re-copy the model directory.') from None
  if not isinstance(hf, dict):
    raise UserError(f'{cfg_path} should hold a JSON object; re-copy the model directory.')
  return hf


_SIZES = ('vocab_size', 'n_positions', 'n_layer', 'n_head', 'n_embd')  # Whole numbers >= 1.


def config_from_hf(hf: Mapping[str, Any], where: str = 'config.json') -> ModelConfig:
  """Maps a GPT2Config dict to ModelConfig(bias=True, dropout=0.0); UserError for what we can't run."""
  c = dict(HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k == 'n_inner'})
  problems = [f'{key} is {c[key]!r}, not a whole number >= 1' for key in _SIZES
              if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1]
  if c['n_inner'] is not None and (isinstance(c['n_inner'], bool) or not isinstance(c['n_inner'], int)):
    problems.append(f"n_inner is {c['n_inner']!r}, not a whole number")
  if isinstance(c['layer_norm_epsilon'], bool) or not isinstance(c['layer_norm_epsilon'], (int, float)):
    problems.append(f"layer_norm_epsilon is {c['layer_norm_epsilon']!r}, not a number")
  if problems:
    raise UserError(f'{where} is not a usable GPT-2 config: ' + '; '.join(problems) + '; re-copy the '
                    'model directory.')
  if c.get('model_type', 'gpt2') != 'gpt2':
    problems.append(f"model_type is {c['model_type']!r}, not 'gpt2'")
  if c['activation_function'] not in ACTIVATIONS:
    problems.append(f"activation_function {c['activation_function']!r} is not one of "
                    f'{sorted(ACTIVATIONS)}')
  if not math.isclose(float(c['layer_norm_epsilon']), LAYER_NORM_EPS, rel_tol=1e-6):
    problems.append(f"layer_norm_epsilon is {c['layer_norm_epsilon']}, but gpt_jax's LayerNorm uses "
                    f'{LAYER_NORM_EPS} (GPT-2\'s value)')
  if c['n_inner'] is not None and c['n_inner'] != 4 * c['n_embd']:
    problems.append(f"n_inner is {c['n_inner']}, but gpt_jax's MLP is 4 * n_embd = {4 * c['n_embd']}")
  for key, want in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                    ('add_cross_attention', False), ('tie_word_embeddings', True)):
    if bool(c[key]) != want:
      problems.append(f'{key} is {c[key]}, gpt_jax supports only {want}')
  if problems:
    raise UserError(f'{where} describes a model gpt_jax cannot run: ' + '; '.join(problems))
  return ModelConfig(vocab_size=int(c['vocab_size']), block_size=int(c['n_positions']),
                     n_layer=int(c['n_layer']), n_head=int(c['n_head']), n_embd=int(c['n_embd']),
                     dropout=0.0, bias=True,
                     gelu_approximate=ACTIVATIONS[c['activation_function']])


def check_gpt2(cfg: ModelConfig, what: str) -> None:
  """UserError naming every option of `cfg` that GPT-2 (and so Hugging Face's GPT2LMHeadModel) lacks."""
  options = cfg.non_gpt2_options()
  if options:
    raise UserError(f'{what}: the model uses {", ".join(options)}, which GPT-2 does not have, so it has '
                    'no Hugging Face GPT-2 form. Only models trained with those options off (their '
                    'defaults) can be exported.')


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json of `cfg` as a GPT2LMHeadModel (biases always on: see the module docstring)."""
  check_gpt2(cfg, 'cannot write a GPT-2 config.json')
  eot = EOT_ID if cfg.vocab_size > EOT_ID else None  # A small vocabulary has no <|endoftext|> id.
  return {
      'architectures': ['GPT2LMHeadModel'],
      'model_type': 'gpt2',
      'vocab_size': cfg.vocab_size,
      'n_positions': cfg.block_size,
      'n_ctx': cfg.block_size,  # Read by old transformers versions.
      'n_embd': cfg.n_embd,
      'n_layer': cfg.n_layer,
      'n_head': cfg.n_head,
      'n_inner': None,
      'activation_function': 'gelu_new' if cfg.gelu_approximate else 'gelu',
      'layer_norm_epsilon': LAYER_NORM_EPS,
      'resid_pdrop': cfg.dropout, 'embd_pdrop': cfg.dropout, 'attn_pdrop': cfg.dropout,
      'initializer_range': 0.02,
      'scale_attn_weights': True,
      'scale_attn_by_inverse_layer_idx': False,
      'reorder_and_upcast_attn': False,
      'tie_word_embeddings': True,
      'use_cache': True,
      'bos_token_id': eot,
      'eos_token_id': eot,
      'torch_dtype': 'float32',
  }


# --- weights --------------------------------------------------------------------------------------

def _hf_name(path: tuple[str, ...]) -> str:
  """('h_3', 'attn', 'c_attn', 'kernel') -> 'h.3.attn.c_attn.weight'; ('wte',) -> 'wte.weight'."""
  if len(path) == 1:  # wte, wpe: embedding tables.
    return f'{path[0]}.weight'
  parts = [('h.' + p[2:]) if p.startswith('h_') else p for p in path[:-1]]
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[path[-1]]
  return '.'.join(parts + [leaf])


def _param_paths(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter of GPT(cfg) as path -> shape, without allocating (jax.eval_shape)."""
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _weight_files(path: str) -> tuple[str, list[str]]:
  """('safetensors' | 'bin', files) of a HF directory, single-file or sharded."""
  for kind, single, index in (('safetensors', 'model.safetensors', 'model.safetensors.index.json'),
                              ('bin', 'pytorch_model.bin', 'pytorch_model.bin.index.json')):
    if os.path.isfile(os.path.join(path, single)):
      return kind, [os.path.join(path, single)]
    if os.path.isfile(os.path.join(path, index)):
      with open(os.path.join(path, index), encoding='utf-8') as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return kind, [os.path.join(path, s) for s in shards]
  raise UserError(f'{path} has no model.safetensors or pytorch_model.bin (nor a sharded index). '
                  f'{_HOW_TO_GET}')


def _safetensors_numpy() -> Any:
  try:
    import safetensors.numpy
  except ImportError:
    raise UserError('GPT-2 weight files need the safetensors package: pip install safetensors') from None
  return safetensors.numpy


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF directory as float32 numpy arrays, by their HF names."""
  kind, files = _weight_files(path)
  out: dict[str, np.ndarray] = {}
  for file in files:
    if not os.path.isfile(file):
      raise UserError(f'weight shard {file} is missing; re-copy the model directory.')
    if kind == 'safetensors':
      try:
        tensors = _safetensors_numpy().load_file(file)
      except Exception as e:  # safetensors raises its own error types for corrupt files.
        raise UserError(f'cannot read {file} ({e}); re-copy the model directory.') from None
      out.update({k: np.asarray(v, np.float32) for k, v in tensors.items()})
    else:
      try:
        import torch  # Lazily: only .bin files need torch.
      except ImportError:
        raise UserError(f'{file} is a PyTorch pickle and reading it needs torch (a CPU build is '
                        'enough), or a copy of the model saved as model.safetensors.') from None
      try:
        tensors = torch.load(file, map_location='cpu', weights_only=True)
      except Exception as e:  # Unpickling errors come in many types.
        raise UserError(f'cannot read {file} ({e}); re-copy the model directory.') from None
      out.update({k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()})
  return out


def params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> Any:
  """HF tensors -> a gpt_jax params tree for `cfg` (float32 jax arrays); checks every name/shape."""
  sd = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in sd.items()}
  wte, lm_head = sd.get('wte.weight'), sd.pop('lm_head.weight', None)
  if lm_head is not None:
    if wte is None or lm_head.shape != wte.shape or not np.array_equal(lm_head, wte):
      raise UserError(f'{where}: lm_head.weight differs from wte.weight, but gpt_jax ties the output '
                      'layer to the token embedding; this is not a GPT-2 checkpoint it can load.')
  # The causal-mask buffers of old GPT-2 checkpoints (not parameters).
  for k in [k for k in sd if k.endswith(('.attn.bias', '.attn.masked_bias'))]:
    del sd[k]
  params: dict = {}
  missing, wrong = [], []
  for path, shape in _param_paths(cfg).items():
    name = _hf_name(path)
    if name not in sd:
      missing.append(name)
      continue
    value = sd.pop(name)
    if value.shape != shape:
      wrong.append(f'{name} {value.shape} (expected {shape})')
      continue
    _set(params, path, jnp.asarray(value, jnp.float32))
  problems = ([f'missing {", ".join(missing[:8])}' + (' ...' if len(missing) > 8 else '')]
              if missing else [])
  problems += [f'wrong shape {", ".join(wrong[:8])}'] if wrong else []
  problems += [f'unexpected {", ".join(sorted(sd)[:8])}'] if sd else []
  if problems:
    raise UserError(f'the weights in {where} do not fit its config.json ({"; ".join(problems)}); '
                    're-copy the model directory.')
  return params


def state_dict_from_params(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """gpt_jax params -> GPT2LMHeadModel tensors (`transformer.` names; zero biases if bias=False).

  No `lm_head.weight`: it is tied to `transformer.wte.weight`, and Hugging Face restores the tie.
  """
  check_gpt2(cfg, 'cannot convert to GPT-2 weights')
  flat = {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  full = _param_paths(dataclasses.replace(cfg, bias=True))
  sd = {}
  for path, shape in full.items():
    value = flat.pop(path, None)
    if value is None:
      if path[-1] != 'bias' or cfg.bias:
        raise ValueError(f'params have no {"/".join(path)} for {cfg}')
      value = np.zeros(shape, np.float32)  # bias=False model: a zero bias is the same function.
    value = np.asarray(value, np.float32)
    if value.shape != shape:
      raise ValueError(f'{"/".join(path)} has shape {value.shape}, expected {shape}')
    sd['transformer.' + _hf_name(path)] = np.ascontiguousarray(value)
  if flat:
    raise ValueError(f'params have entries GPT-2 does not: {sorted(flat)}')
  return sd


# --- public API -----------------------------------------------------------------------------------

def load_gpt2(path: str) -> tuple[GPT, Any]:
  """Reads a local Hugging Face GPT-2 directory -> (GPT model, params).

  `model.apply({'params': params}, tokens)` then gives the same logits (B, T, vocab) as
  transformers' GPT2LMHeadModel, to float32 rounding.
  """
  path = os.path.abspath(os.path.expanduser(path))
  cfg = config_from_hf(read_hf_config(path), os.path.join(path, 'config.json'))
  params = params_from_state_dict(read_state_dict(path), cfg, path)
  return GPT(cfg), params


def save_gpt2(model: GPT, params: Any, path: str) -> None:
  """Writes config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained(path)` loads.

  A bias=False model is written with zero biases (GPT-2 always has them). Existing files of those
  names in `path` are replaced.
  """
  cfg = model.config
  check_gpt2(cfg, 'cannot export to Hugging Face GPT-2')  # Before anything is written.
  path = os.path.abspath(os.path.expanduser(path))
  files_lib.make_dir(path, 'the Hugging Face folder')
  sd = state_dict_from_params(params, cfg)
  weights = os.path.join(path, 'model.safetensors')
  tmp = f'{weights}.{os.getpid()}.tmp'
  try:
    with files_lib.guard(weights, 'write'):
      # metadata format=pt: transformers expects it on safetensors files it loads.
      _safetensors_numpy().save_file(sd, tmp, metadata={'format': 'pt'})
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)  # The usual permissions of a new file (the writer may use 0600).
      os.replace(tmp, weights)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  files_lib.write_text(os.path.join(path, 'config.json'), json.dumps(hf_config_from(cfg), indent=2),
                   'the Hugging Face config.json')


def init_params_from(path: str, model_cfg: ModelConfig) -> Any:
  """Parameters for fine-tuning from a local HF GPT-2 directory, checked against `model_cfg`.

  Fields that shape the parameters or the function (vocab/block size, depth, width, heads, bias,
  GELU form) must match, and the model must be a GPT-2 (no non-GPT-2 option); dropout, attention
  backend and compute dtype are free.
  """
  check_gpt2(model_cfg, f'init_from={path} holds GPT-2 weights')
  path = os.path.abspath(os.path.expanduser(path))
  hf_cfg = config_from_hf(read_hf_config(path), os.path.join(path, 'config.json'))
  diffs = [f'model.{k}: weights {getattr(hf_cfg, k)!r}, config {getattr(model_cfg, k)!r}'
           for k in SHAPE_FIELDS if getattr(hf_cfg, k) != getattr(model_cfg, k)]
  if diffs:
    raise UserError(f'init_from={path} does not fit the configured model ({"; ".join(diffs)}). '
                    'Use the preset of configs/gpt2.py that matches the weights, or set those '
                    'model.* fields to the weights\' values.')
  return params_from_state_dict(read_state_dict(path), hf_cfg, path)


def load_hf_tokenizer(hf_dir: str, encoder_json: Optional[str] = None,
                      vocab_bpe: Optional[str] = None) -> Any:
  """GPT-2's BPE from `hf_dir`'s vocab.json + merges.txt, else from the given encoder.json/vocab.bpe."""
  from gpt_jax.data import bpe  # Lazily: needs the `regex` package.
  vocab, merges = os.path.join(hf_dir, 'vocab.json'), os.path.join(hf_dir, 'merges.txt')
  if os.path.isfile(vocab) and os.path.isfile(merges):
    return bpe.load_gpt2_tokenizer(vocab, merges)
  if encoder_json and vocab_bpe:
    return bpe.load_gpt2_tokenizer(encoder_json, vocab_bpe)
  raise UserError(f'{hf_dir} has no vocab.json + merges.txt; pass --encoder_json and --vocab_bpe '
                  '(GPT-2\'s encoder.json and vocab.bpe) so samples can be encoded and decoded.')


def write_hf_tokenizer(tok_dict: Mapping[str, Any], hf_dir: str) -> bool:
  """Writes a saved BPE tokenizer as HF's vocab.json + merges.txt; False for other tokenizers."""
  if tok_dict.get('type') != 'bpe':
    return False
  encoder = dict(tok_dict['encoder'], **tok_dict.get('special_tokens', {}))
  files_lib.write_text(os.path.join(hf_dir, 'vocab.json'), json.dumps(encoder, ensure_ascii=False),
                   'the Hugging Face vocab.json')
  files_lib.write_text(os.path.join(hf_dir, 'merges.txt'),
                   '#version: 0.2\n' + ''.join(m + '\n' for m in tok_dict['merges']), 'the merges.txt')
  return True


def convert_to_checkpoint(hf_dir: str, out_dir: str, encoder_json: Optional[str] = None,
                          vocab_bpe: Optional[str] = None) -> str:
  """HF directory -> a gpt_jax checkpoint in out_dir/checkpoints (step 0, parameters only).

  `scripts/sample.py --ckpt_dir out_dir` samples from it with GPT-2's BPE. It holds no optimizer
  state: fine-tune through `init_from` (configs/gpt2.py) instead of resuming it.
  """
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  model, params = load_gpt2(hf_dir)
  tok = load_hf_tokenizer(hf_dir, encoder_json, vocab_bpe)
  if tok.vocab_size > model.config.vocab_size:
    raise UserError(f'the tokenizer has {tok.vocab_size} tokens but the model only '
                    f'{model.config.vocab_size} embeddings; use the tokenizer the model was trained '
                    'with.')
  ckpt_dir = os.path.join(os.path.abspath(os.path.expanduser(out_dir)), 'checkpoints')
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f'{ckpt_dir} already holds checkpoints; pick an empty --out_dir '
                    '(nothing was overwritten).')
  files_lib.check_writable(os.path.join(ckpt_dir, 'x'), 'the checkpoint')
  meta = {'model': model.config.to_dict(), 'tokenizer': tok.to_dict(),
          'source': {'hf_dir': hf_dir}}
  _save_params_checkpoint(ckpt_dir, params, meta)
  return ckpt_dir


def _save_params_checkpoint(ckpt_dir: str, params: Any, meta: dict[str, Any]) -> None:
  """A gpt_jax checkpoint of parameters only, which `load_for_inference` and sampling read."""
  from gpt_jax import checkpoint as checkpoint_lib
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  ckpt.save_params(0, params, meta)
  ckpt.close()


def export_checkpoint(ckpt_dir: str, hf_dir: str, step: Optional[int] = None) -> list[str]:
  """A gpt_jax checkpoint (default: its best step) -> HF directory; returns the files written.

  Writes config.json and model.safetensors, plus vocab.json + merges.txt when the checkpoint's
  tokenizer is a BPE (a character vocabulary has no Hugging Face GPT-2 form).
  """
  from gpt_jax import checkpoint as checkpoint_lib
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  if os.path.isfile(os.path.join(hf_dir, 'model.safetensors')):
    raise UserError(f'{hf_dir} already holds a model.safetensors; pick an empty --hf_dir '
                    '(nothing was overwritten).')
  files_lib.check_writable(os.path.join(hf_dir, 'config.json'), 'the Hugging Face files')  # Before loading.
  cfg, params, meta = checkpoint_lib.load_for_inference(ckpt_dir, step)
  check_gpt2(cfg, f'cannot export the checkpoint in {ckpt_dir} to Hugging Face GPT-2')
  save_gpt2(GPT(cfg), params, hf_dir)
  files = ['config.json', 'model.safetensors']
  if write_hf_tokenizer(meta.get('tokenizer', {}), hf_dir):
    files += ['vocab.json', 'merges.txt']
  return [os.path.join(hf_dir, f) for f in files]
