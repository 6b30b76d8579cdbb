"""Full-pass evaluation: exact per-token scoring, bits per character, the checkpoint tokenizer, CLI."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare, shakespeare_bpe_compact
from gpt_jax import checkpoint as checkpoint_lib, config as config_lib, sample_run, scoring
from gpt_jax.config import ModelConfig
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, init_params
from gpt_jax.training import loop as loop_lib, step as step_lib

from conftest import make_synthetic_text

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(root: pathlib.Path, config_module):
  """The `tiny` preset of `config_module` on synthetic text under `root`."""
  root.mkdir(parents=True, exist_ok=True)
  text_path = root / 'input.txt'
  if not text_path.exists():
    text_path.write_text(make_synthetic_text(), encoding='utf-8')
  c = config_module.get_config('tiny')
  c.out_dir = str(root / 'out')
  c.data.update(text_path=str(text_path), data_dir=str(root / 'data'), cache_dir=str(root / 'cache'))
  c.train.update(max_steps=4, eval_interval=4, eval_iters=1, peak_flops=1e12)
  c.sample.eval_tokens = 0
  return c


@pytest.fixture(scope='module')
def char_run(tmp_path_factory):
  """An untrained char-model checkpoint, saved as train.py saves one (no train step to compile)."""
  c = _tiny_config(tmp_path_factory.mktemp('char'), shakespeare)
  ds = text_lib.load(c.data, verbose=False)
  model_cfg = config_lib.model_config_from(c, ds.tokenizer.vocab_size)
  state = step_lib.init_train_state(model_cfg, c.train)
  meta = {'model': model_cfg.to_dict(), 'tokenizer': ds.tokenizer.to_dict(),
          'data': {k: ds.meta[k] for k in ('tokenizer', 'vocab_size', 'source_sha256')},
          'config': json.loads(c.to_json_best_effort())}
  ckpt = checkpoint_lib.Checkpointer(os.path.join(c.out_dir, 'checkpoints'), c.checkpoint)
  ckpt.save(1, state, meta, math.inf)
  ckpt.close()
  return pathlib.Path(c.out_dir)


@pytest.fixture(scope='module')
def bpe_run(tmp_path_factory):
  """A compact-BPE model after a few real training steps (train.py end to end)."""
  c = _tiny_config(tmp_path_factory.mktemp('bpe'), shakespeare_bpe_compact)
  loop_lib.train_and_evaluate(c)
  return pathlib.Path(c.out_dir)


@pytest.mark.parametrize('n,T', [(2, 4), (5, 4), (9, 4), (50, 16), (17, 16)])
def test_windows_score_every_token_exactly_once(n, T):
  tokens = np.arange(100, 100 + n)
  x, y, mask = scoring.make_windows(tokens, T)
  np.testing.assert_array_equal(y[mask], tokens[1:])  # Each target once, in order.
  np.testing.assert_array_equal(x[mask], tokens[:-1])  # Each predicted from its predecessor ...
  assert x.shape[0] == math.ceil((n - 1) / T)
  np.testing.assert_array_equal(x[:, 0], tokens[::T][:x.shape[0]])  # ... in windows starting at w*T.


@pytest.mark.slow
def test_full_pass_equals_brute_force_per_token():
  cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  # Make the padded rows (ids 50..63) likely, so that forgetting to mask them would show.
  params = dict(params, wte=params['wte'].at[50:].multiply(40.0))
  limit = 50
  tokens = np.random.RandomState(0).randint(0, limit, 50)  # 49 targets: windows of 16, 16, 16, 1.
  # Brute force: every target on its own, from exactly the tokens of its window before it. Each
  # prefix is right-padded with random tokens to one shape (the model is causal), and scored in
  # float64 with numpy.
  T = cfg.block_size
  rng = np.random.RandomState(1)
  prefixes, lengths = [], []
  for j in range(1, len(tokens)):
    start = (j - 1) // T * T  # The window that holds target j.
    prefixes.append(np.concatenate([tokens[start:j], rng.randint(0, limit, T - (j - start))]))
    lengths.append(j - start)
  logits = jax.jit(GPT(cfg).apply)({'params': params}, np.stack(prefixes))
  logits = np.asarray(logits, np.float64)[np.arange(len(lengths)), np.array(lengths) - 1]

  def nll(logits):
    top = logits.max(-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    return float(np.sum(lse - logits[np.arange(len(lengths)), tokens[1:]]))

  brute = nll(logits[:, :limit])
  assert nll(logits) > brute + 1.0  # Unmasked padded rows would change the result: the test has teeth.
  for batch_size in (3, 64):
    total, n = scoring.score_tokens(params, cfg, tokens, batch_size=batch_size, vocab_limit=limit)
    assert n == 49
    np.testing.assert_allclose(total, brute, rtol=2e-6)


def _evals(out_dir: str) -> list[dict]:
  lines = pathlib.Path(out_dir, 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines if '"val_loss"' in line]


@pytest.mark.slow
def test_training_evals_with_val_full_pass_give_evaluate_py_figure(tmp_path):
  """train.val_full_pass: every eval's val loss is the full pass scripts/evaluate.py computes on the
  checkpoint of that step (here 3,000 val tokens in 94 windows: the last batch of 8 is padded)."""
  c = _tiny_config(tmp_path, shakespeare)
  c.train.update(val_full_pass=True, eval_interval=2, target_val_loss=10.0)
  c.checkpoint.save = 'always'
  summary = loop_lib.train_and_evaluate(c)
  evals = _evals(c.out_dir)
  assert [e['step'] for e in evals] == [0, 2, 4]
  for e in evals[1:]:
    full = scoring.evaluate_checkpoint(c.out_dir, step=e['step'], output='', verbose=False)
    assert full['scored_tokens'] == 3000
    assert e['val_loss'] == pytest.approx(full['loss'], rel=1e-5), e['step']
  assert summary['target_reached']['val_loss'] == evals[0]['val_loss']
  # The train loss is still the estimate on eval_iters random batches: the same as without the option.
  c2 = _tiny_config(tmp_path / 'off', shakespeare)
  c2.train.update(eval_interval=2)
  loop_lib.train_and_evaluate(c2)
  evals_off = _evals(c2.out_dir)
  assert [e['train_loss'] for e in evals_off] == [e['train_loss'] for e in evals]
  assert all(a['val_loss'] != b['val_loss'] for a, b in zip(evals_off, evals))


def test_val_full_pass_refuses_token_shards(tmp_path):
  c = _tiny_config(tmp_path, shakespeare)
  c.train.val_full_pass = True
  c.data.shards_dir = str(tmp_path / 'shards')
  with pytest.raises(UserError, match='val_full_pass'):
    loop_lib.train_and_evaluate(c)


def test_char_model_bits_per_char_is_loss_over_ln2(char_run):
  r = scoring.evaluate_checkpoint(str(char_run), verbose=False)
  assert r['tokenizer'] == 'char' and r['scored_tokens'] == r['val_tokens'] == r['val_chars'] == 3000
  assert r['step'] == 1
  assert r['bits_per_char'] == pytest.approx(r['loss'] / math.log(2), rel=1e-12)
  assert r['perplexity'] == pytest.approx(math.exp(r['loss']))
  assert json.loads((char_run / 'eval.json').read_text())['bits_per_char'] == r['bits_per_char']
  # Deterministic, and the batch size does not change the result.
  again = scoring.evaluate_checkpoint(str(char_run / 'checkpoints'), batch_size=5, output='',
                                           verbose=False)
  assert again['total_nats'] == pytest.approx(r['total_nats'], rel=1e-6)


@pytest.mark.slow
def test_bpe_model_uses_the_checkpoint_tokenizer_and_saved_data(bpe_run, char_run, tmp_path):
  r = scoring.evaluate_checkpoint(str(bpe_run), output='', verbose=False)
  assert r['tokenizer'] == 'bpe' and r['vocab_size'] == 320 and r['model_vocab_size'] == 320
  assert r['scored_tokens'] == r['val_tokens'] < r['val_chars'] == 3000
  assert r['bits_per_char'] == pytest.approx(r['total_nats'] / math.log(2) / 3000)
  # Without --data_dir the saved data section is used: a deleted preparation is rebuilt (the BPE
  # training is deterministic) and gives the same numbers.
  shutil.rmtree(bpe_run.parent / 'data')
  again = scoring.evaluate_checkpoint(str(bpe_run), output='', verbose=False)
  assert again['total_nats'] == pytest.approx(r['total_nats'], rel=1e-6)
  # Data prepared with another tokenizer is refused, not silently mis-scored.
  with pytest.raises(UserError, match='another tokenizer'):
    scoring.evaluate_checkpoint(str(bpe_run), data_dir=str(char_run.parent / 'data'),
                                     output='', verbose=False)
  other = shakespeare_bpe_compact.get_config('tiny').data
  other.update(text_path=str(bpe_run.parent / 'input.txt'), data_dir=str(tmp_path / 'd300'),
               bpe_vocab_size=300)
  text_lib.prepare(other, verbose=False)
  with pytest.raises(UserError, match='another tokenizer'):
    scoring.evaluate_checkpoint(str(bpe_run), data_dir=str(tmp_path / 'd300'), output='',
                                     verbose=False)


@pytest.mark.slow
def test_bpe_model_samples_through_the_checkpoint(bpe_run):
  texts = sample_run.sample_from_checkpoint(str(bpe_run), prompt='ROMEO:', num_samples=2,
                                              max_new_tokens=12, verbose=False)
  assert len(texts) == 2 and all(t.startswith('ROMEO:') and len(t) > 12 for t in texts)


@pytest.mark.slow
def test_evaluate_script(bpe_run, tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  out = tmp_path / 'e.json'
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / 'evaluate.py'), f'--ckpt_dir={bpe_run}',
                      f'--output={out}', '--batch_size=3'],
                     capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert r.returncode == 0, r.stderr
  assert 'bits/character' in r.stdout and 'perplexity' in r.stdout
  assert json.loads(out.read_text())['batch_size'] == 3
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / 'evaluate.py'),
                      f'--ckpt_dir={tmp_path / "nothing"}'],
                     capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert r.returncode == 1 and 'error: no checkpoint directory' in r.stderr
  assert 'Traceback' not in r.stderr
