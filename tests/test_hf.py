"""GPT-2 weights both ways (gpt_jax.hf), against transformers' own GPT2LMHeadModel. No downloads:
the reference models are small random GPT-2s built and saved locally."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import gpt2 as gpt2_configs
from gpt_jax import hf, model as model_lib
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.errors import UserError
from gpt_jax.model import GPT

from conftest import REPO, make_synthetic_text

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

LOGITS_ATOL = 1e-5


def _hf_model(seed: int = 0, **overrides):
  """A random GPT2LMHeadModel with every parameter perturbed (biases, LayerNorms not trivial)."""
  kwargs = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64,
                bos_token_id=None, eos_token_id=None)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
  with torch.no_grad():
    for p in model.parameters():  # wte and lm_head are one tied Parameter: the tie survives.
      p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def _tokens(shape, vocab=101, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _save_old_style_bin(model, path: pathlib.Path) -> None:
  """pytorch_model.bin as OpenAI's original upload: no `transformer.` prefix, the causal-mask
  buffers `h.N.attn.bias` / `h.N.attn.masked_bias`, and an explicit (tied) lm_head.weight."""
  path.mkdir()
  sd = {k[len('transformer.'):] if k.startswith('transformer.') else k: v.clone()
        for k, v in model.state_dict().items()}
  n = model.config.n_positions
  for i in range(model.config.n_layer):
    sd[f'h.{i}.attn.bias'] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
    sd[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
  sd['lm_head.weight'] = sd['wte.weight'].clone()
  torch.save(sd, path / 'pytorch_model.bin')
  model.config.to_json_file(str(path / 'config.json'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One random HF GPT-2, saved as safetensors (HF's default) and as an old-style .bin."""
  model = _hf_model()
  root = tmp_path_factory.mktemp('hf')
  model.save_pretrained(str(root / 'safetensors'))
  assert (root / 'safetensors' / 'model.safetensors').exists()
  _save_old_style_bin(model, root / 'bin')
  return model, root


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['safetensors', 'bin'])
def test_imported_logits_equal_hf(reference, variant):
  hf_model, root = reference
  model, params = hf.load_gpt2(str(root / variant))
  cfg = model.config
  assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (101, 64, 2, 2, 32)
  assert cfg.bias and cfg.gelu_approximate and cfg.dropout == 0.0  # 'gelu_new' = tanh GELU.
  worst = 0.0
  for seed, shape in enumerate([(3, 64), (2, 17), (1, 1)]):
    tokens = _tokens(shape, seed=seed)
    ours = np.asarray(jax.jit(model.apply)({'params': params}, tokens))
    assert ours.shape == (*shape, 101)
    worst = max(worst, float(np.max(np.abs(ours - _hf_logits(hf_model, tokens)))))
  print(f'{variant}: max |logits gpt_jax - HF| = {worst:.2e}')
  assert worst < LOGITS_ATOL


def test_both_file_formats_give_identical_params(reference):
  _, root = reference
  a = hf.load_gpt2(str(root / 'safetensors'))[1]
  b = hf.load_gpt2(str(root / 'bin'))[1]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_greedy_generation_equals_hf(reference):
  from gpt_jax import sampling
  hf_model, root = reference
  model, params = hf.load_gpt2(str(root / 'safetensors'))
  prompt = _tokens((2, 6), seed=7)
  new = 40  # 46 tokens in all: within the 64-position window, so no sliding is involved.
  ours = np.asarray(sampling.generate(params, model.config, prompt, new, jax.random.PRNGKey(0),
                                    temperature=0.0))
  with torch.no_grad():
    theirs = hf_model.generate(torch.from_numpy(prompt.astype(np.int64)),
                               attention_mask=torch.ones(prompt.shape, dtype=torch.int64),
                               do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0).numpy()
  assert theirs.shape == ours.shape == (2, 6 + new)
  np.testing.assert_array_equal(ours, theirs)
  assert len(np.unique(ours[:, 6:])) > 3  # Not a degenerate repeat-one-token continuation.


def _random_params(cfg: ModelConfig, seed: int = 0):
  """GPT-2 init plus noise on every tensor (so zero biases / unit scales don't hide mistakes)."""

  @jax.jit  # One program: eager, each op of the init would be compiled on its own.
  def make():
    params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  return make()


@pytest.mark.slow
@pytest.mark.parametrize('gelu_approximate', [True, False])
def test_export_reimport_is_lossless_and_hf_agrees(tmp_path, gelu_approximate):
  cfg = ModelConfig(vocab_size=101, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                    bias=True, gelu_approximate=gelu_approximate)
  params = _random_params(cfg)
  hf.save_gpt2(GPT(cfg), params, str(tmp_path))
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['activation_function'] == ('gelu_new' if gelu_approximate else 'gelu')

  model2, params2 = hf.load_gpt2(str(tmp_path))
  assert model2.config == cfg
  assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Bit-identical.

  hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  tokens = _tokens((2, 64), seed=3)
  ours = np.asarray(jax.jit(GPT(cfg).apply)({'params': params}, tokens))
  diff = float(np.max(np.abs(ours - _hf_logits(hf_model, tokens))))
  print(f'export gelu_approximate={gelu_approximate}: max |logits HF(export) - gpt_jax| = {diff:.2e}')
  assert diff < LOGITS_ATOL


@pytest.mark.slow
def test_export_without_biases_writes_zero_biases(tmp_path):
  cfg = ModelConfig(vocab_size=101, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                    bias=False, gelu_approximate=False)
  params = _random_params(cfg)
  hf.save_gpt2(GPT(cfg), params, str(tmp_path))
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  assert float(hf_model.transformer.h[0].attn.c_attn.bias.detach().abs().max()) == 0.0
  tokens = _tokens((2, 40), seed=4)
  ours = np.asarray(jax.jit(GPT(cfg).apply)({'params': params}, tokens))
  assert float(np.max(np.abs(ours - _hf_logits(hf_model, tokens)))) < LOGITS_ATOL
  model2, params2 = hf.load_gpt2(str(tmp_path))  # Comes back as a bias=True model, biases zero.
  assert model2.config == dataclasses.replace(cfg, bias=True)
  np.testing.assert_array_equal(np.asarray(params2['ln_f']['bias']), 0.0)


def test_hf_config_checks():
  assert hf.config_from_hf({'activation_function': 'gelu'}).gelu_approximate is False
  assert hf.config_from_hf({}).vocab_size == 50257  # Missing keys take GPT2Config's defaults.
  with pytest.raises(UserError, match='layer_norm_epsilon'):
    hf.config_from_hf({'layer_norm_epsilon': 1e-6})
  with pytest.raises(UserError, match='activation_function'):
    hf.config_from_hf({'activation_function': 'relu'})
  with pytest.raises(UserError, match='n_inner'):
    hf.config_from_hf({'n_inner': 100})


def test_untied_lm_head_is_refused(reference, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, root = reference
  sd = load_file(str(root / 'safetensors' / 'model.safetensors'))
  sd['lm_head.weight'] = sd['transformer.wte.weight'] + 1.0
  save_file(sd, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text((root / 'safetensors' / 'config.json').read_text())
  with pytest.raises(UserError, match='lm_head.weight differs'):
    hf.load_gpt2(str(tmp_path))


def test_missing_directory_is_a_user_error(tmp_path):
  cfg = ModelConfig.from_dict(gpt2_configs.get_config('gpt2').model.to_dict())
  for call in (lambda: hf.load_gpt2(str(tmp_path / 'nope')),
               lambda: hf.init_params_from(str(tmp_path / 'nope'), cfg)):
    with pytest.raises(UserError, match='never downloads') as e:
      call()
    assert 'huggingface-cli download' in str(e.value)
  with pytest.raises(UserError, match='no config.json'):
    hf.load_gpt2(str(tmp_path))


def test_init_params_from_checks_the_model_config(reference):
  _, root = reference
  cfg, params = hf.load_gpt2(str(root / 'safetensors'))
  cfg = cfg.config
  same = hf.init_params_from(str(root / 'safetensors'), dataclasses.replace(cfg, dropout=0.1,
                                                                             attention='xla'))
  for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError) as e:
    hf.init_params_from(str(root / 'safetensors'),
                        dataclasses.replace(cfg, n_layer=3, bias=False, vocab_size=128))
  msg = str(e.value)
  for field in ('model.n_layer: weights 2, config 3', 'model.bias', 'model.vocab_size'):
    assert field in msg, msg


@pytest.mark.parametrize('preset,count', [('gpt2', 124_439_808), ('gpt2-medium', 354_823_168),
                                          ('gpt2-large', 774_030_080), ('gpt2-xl', 1_557_611_200)])
def test_gpt2_presets(preset, count):
  c = gpt2_configs.get_config(preset)
  cfg = ModelConfig.from_dict(c.model.to_dict())
  assert cfg.bias and cfg.gelu_approximate and cfg.dropout == 0.0
  assert (cfg.vocab_size, cfg.block_size) == (50257, 1024)
  assert c.init_from == ''
  assert num_params(cfg) == count
  if preset == 'gpt2':  # The model's own count, without allocating 124M floats.
    abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract)) == count


def test_gpt2_config_builds_on_shakespeare():
  from configs import shakespeare
  a, b = gpt2_configs.get_config('gpt2'), shakespeare.get_config('')
  assert set(a.keys()) == set(b.keys()) | {'init_from'}
  for section in ('model', 'data', 'train', 'checkpoint', 'sample'):
    assert set(a[section].keys()) == set(b[section].keys()), section
  t = a.train
  assert (t.learning_rate, t.min_learning_rate, t.warmup_steps) == (3e-5, 3e-5, 0)  # Constant lr.
  with pytest.raises(ValueError, match='unknown preset'):
    gpt2_configs.get_config('gpt3')


@pytest.fixture(scope='module')
def bpe_hf_dir(tmp_path_factory):
  """A HF directory with a small trained BPE (vocab.json + merges.txt) and a model to match."""
  from gpt_jax.data import bpe
  tok = bpe.train_bpe(make_synthetic_text(5000), 300, special_tokens=[bpe.ENDOFTEXT],
                      progress=False)
  path = tmp_path_factory.mktemp('hf_bpe')
  _hf_model(seed=1, vocab_size=300).save_pretrained(str(path))
  assert hf.write_hf_tokenizer(tok.to_dict(), str(path))
  return path, tok


def test_convert_sample_and_export_round_trip(bpe_hf_dir, tmp_path):
  from gpt_jax import sample_run
  hf_dir, tok = bpe_hf_dir
  out = tmp_path / 'run'
  hf.convert_to_checkpoint(str(hf_dir), str(out))
  texts = sample_run.sample_from_checkpoint(str(out), prompt='ROMEO:', max_new_tokens=8,
                                            temperature=0.0, verbose=False)
  assert texts[0].startswith('ROMEO:') and len(texts[0]) > len('ROMEO:')

  with pytest.raises(UserError, match='already holds checkpoints'):
    hf.convert_to_checkpoint(str(hf_dir), str(out))

  hf.export_checkpoint(str(out), str(tmp_path / 'back'))
  a, b = hf.load_gpt2(str(hf_dir))[1], hf.load_gpt2(str(tmp_path / 'back'))[1]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tok2 = hf.load_hf_tokenizer(str(tmp_path / 'back'))
  assert tok2.to_dict()['encoder'] == tok.to_dict()['encoder']
  assert tok2.to_dict()['merges'] == tok.to_dict()['merges']
  text = 'the king and queen of rome'
  assert tok2.encode(text) == tok.encode(text)


def test_convert_without_tokenizer_files_needs_them(reference, tmp_path):
  _, root = reference
  with pytest.raises(UserError, match='--encoder_json'):
    hf.convert_to_checkpoint(str(root / 'safetensors'), str(tmp_path / 'run'))


def _script(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=900)


@pytest.mark.slow
def test_scripts_convert_then_sample(bpe_hf_dir, tmp_path):
  hf_dir, _ = bpe_hf_dir
  out = tmp_path / 'run'
  r = _script('scripts/convert_hf.py', '--hf_dir', str(hf_dir), '--out_dir', str(out))
  assert r.returncode == 0, r.stderr
  r = _script('scripts/sample.py', '--ckpt_dir', str(out), '--prompt', 'Hello',
              '--max_new_tokens', '5', '--temperature', '0')
  assert r.returncode == 0, r.stderr
  assert 'Hello' in r.stdout
  r = _script('scripts/convert_hf.py', '--hf_dir', str(tmp_path / 'missing'), '--out_dir',
              str(tmp_path / 'x'))
  assert r.returncode == 1 and r.stderr.startswith('error: no GPT-2 directory')
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_training_can_start_from_hf_weights(tmp_path, tiny_config):
  """`init_from` (nanoGPT's finetune): the run's step-0 eval scores the imported weights."""
  from gpt_jax.data import batches as batches_lib, text as text_lib
  from gpt_jax.training import loop as loop_lib, step as step_lib
  vocab = text_lib.prepare(tiny_config.data, verbose=False)['vocab_size']
  hf_model = _hf_model(seed=3, vocab_size=vocab, n_positions=tiny_config.model.block_size,
                       n_embd=tiny_config.model.n_embd, n_layer=tiny_config.model.n_layer,
                       n_head=tiny_config.model.n_head)
  hf_model.save_pretrained(tmp_path / 'hf')
  tiny_config.model.update(bias=True, gelu_approximate=True)
  with tiny_config.unlocked():
    tiny_config.init_from = str(tmp_path / 'hf')
  tiny_config.train.update(max_steps=1, eval_iters=2)
  tiny_config.sample.eval_tokens = 0  # The losses are the point: no sampler to compile.
  loop_lib.train_and_evaluate(tiny_config)
  first = json.loads((pathlib.Path(tiny_config.out_dir) / 'metrics.jsonl').read_text().splitlines()[0])
  # The same eval batches scored directly with the imported parameters.
  model, params = hf.load_gpt2(str(tmp_path / 'hf'))
  ds = text_lib.Dataset(tiny_config.data.data_dir)
  key = jax.random.fold_in(jax.random.PRNGKey(tiny_config.train.seed), batches_lib.EVAL_KEY_SALT)
  val = batches_lib.to_device(ds.val)
  # Jitted, as the run's own eval step: eagerly, each op of the forward pass compiles on its own.
  score = jax.jit(functools.partial(step_lib.eval_step, model=model, batch_size=tiny_config.train.batch_size))
  direct = np.mean([float(score(params, val, jax.random.fold_in(key, i))) for i in range(2)])
  np.testing.assert_allclose(first['val_loss'], direct, rtol=1e-5)
