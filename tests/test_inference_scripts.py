"""sample.py, evaluate.py and convert_hf.py --direction export, run as a user would (subprocesses), on a
run whose best checkpoint is not its latest: the default must load the best one, and --step N step N."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import checkpoint as checkpoint_lib, hf, sample_run
from gpt_jax.data import text as text_lib, tokenizer as tokenizer_lib
from gpt_jax.training import loop as loop_lib

from conftest import REPO, make_synthetic_text

PROMPT = 'ROMEO:\nthe king'


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / 'scripts' / name), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, PYTHONUNBUFFERED='1'))


class Run:
  """A finished run: its out_dir and the val loss of each saved checkpoint, as training recorded it."""

  def __init__(self, out_dir: pathlib.Path):
    self.out_dir = out_dir
    with open(out_dir / 'metrics.jsonl', encoding='utf-8') as f:
      records = [json.loads(line) for line in f]
    self.val = {r['step']: r['val_loss'] for r in records if 'val_loss' in r and r['step'] > 0}
    self.best = min(self.val, key=self.val.get)
    self.latest = max(self.val)
    self.other = next(s for s in sorted(self.val) if s not in (self.best, self.latest))

  def nearest_step(self, loss: float) -> int:
    """The checkpoint whose recorded val loss is nearest `loss`: which weights a full pass scored."""
    return min(self.val, key=lambda s: abs(self.val[s] - loss))


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Run:
  """Checkpoints 100, 200 (best) and 210 (latest): a tiny model trained to step 200, then resumed
  with a learning rate 30x too high for 10 steps, which ruins it (val loss ~0.8 -> ~4). Real
  training, real evals: only the step-210 checkpoint is worse, as in a run that diverged late."""
  root = tmp_path_factory.mktemp('run')
  (root / 'input.txt').write_text(make_synthetic_text(), encoding='utf-8')
  c = shakespeare.get_config('tiny')
  c.out_dir = str(root / 'out')
  c.data.update(text_path=str(root / 'input.txt'), data_dir=str(root / 'data'),
                cache_dir=str(root / 'cache'))
  c.sample.eval_tokens = 0
  c.train.update(peak_flops=1e12, max_steps=200, lr_decay_steps=200, learning_rate=1e-2,
                 min_learning_rate=1e-3, eval_interval=100, log_interval=100)
  c.checkpoint.update(save='always', keep_last=5)  # Every eval saves, and none is dropped.
  loop_lib.train_and_evaluate(c)
  c.train.update(resume=True, max_steps=210, learning_rate=0.3, min_learning_rate=0.3)
  loop_lib.train_and_evaluate(c)
  r = Run(root / 'out')
  saved = sorted(int(p.name) for p in (root / 'out' / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == sorted(r.val) == [100, 200, 210] and (r.best, r.latest, r.other) == (200, 210, 100)
  assert r.val[210] > r.val[100] + 1 > r.val[200] + 1, r.val  # Far apart: a loss names its step.
  return r


def _sample_text(stdout: str) -> str:
  return stdout.split('---------- sample 1/1 ----------\n', 1)[1][:-1]  # print() added the '\n'.


@pytest.mark.slow
def test_evaluate_scores_the_best_checkpoint_by_default_and_step_n_on_request(run, tmp_path):
  for flags, step in (([], run.best), ([f'--step={run.latest}'], run.latest)):
    out = tmp_path / f'{step}.json'
    r = _script('evaluate.py', f'--ckpt_dir={run.out_dir}', f'--output={out}', *flags)
    assert r.returncode == 0, r.stderr
    with open(out, encoding='utf-8') as f:
      result = json.load(f)
    assert result['step'] == step and f'checkpoint step {step},' in r.stdout, (flags, r.stdout)
    # The full pass scored that step's weights: its loss is the one training estimated for it
    # (from 4 batches, so within a few hundredths), and far from every other checkpoint's.
    assert run.nearest_step(result['loss']) == step, (result['loss'], run.val)
    assert result['loss'] == pytest.approx(run.val[step], abs=0.1)


@pytest.mark.slow
def test_sample_loads_the_best_checkpoint_by_default_and_the_seed_fixes_the_text(run):
  args = [f'--ckpt_dir={run.out_dir}', f'--prompt={PROMPT}', '--max_new_tokens=60']
  default = _script('sample.py', *args, '--seed=5')
  assert default.returncode == 0, default.stderr
  assert f'checkpoint step {run.best}, val loss {run.val[run.best]:.4f}:' in default.stdout
  # The same checkpoint and seed in a new process: the same text. Another seed: another text.
  again = _script('sample.py', *args, '--seed=5', f'--step={run.best}')
  other_seed = _script('sample.py', *args, '--seed=6')
  assert again.returncode == 0 and other_seed.returncode == 0, again.stderr + other_seed.stderr
  text = _sample_text(default.stdout)
  assert text.startswith(PROMPT) and len(text) >= len(PROMPT) + 60
  assert _sample_text(again.stdout) == text
  assert _sample_text(other_seed.stdout) != text
  assert f'checkpoint step {run.best},' in other_seed.stdout


@pytest.mark.slow
def test_sample_step_n_and_window_shift_past_the_block(run):
  """Greedy text 60 tokens past the 32-token window, against the full-recomputation reference:
  --window_shift=1 is nanoGPT's crop to the last block_size tokens before every token; 0 (auto)
  re-encodes every block_size // 4 tokens. Both from --step 100, neither the best nor the latest."""
  cfg, params, meta = checkpoint_lib.load_for_inference(str(run.out_dir), run.other)
  tok = tokenizer_lib.tokenizer_from_dict(meta['tokenizer'])
  prompt = np.array([text_lib.encode_text(tok, PROMPT)], np.int32)
  n = cfg.block_size + 60 - prompt.shape[1]
  expected = {shift: tok.decode(sample_run.generate_uncached(params, cfg, prompt, n, window_shift=ref)[0])
              for shift, ref in ((1, 1), (0, cfg.block_size // 4))}
  assert expected[0] != expected[1]  # Otherwise this model could not tell the two rules apart.
  for shift, text in expected.items():
    r = _script('sample.py', f'--ckpt_dir={run.out_dir}', f'--step={run.other}', f'--prompt={PROMPT}',
                f'--max_new_tokens={n}', '--temperature=0', f'--window_shift={shift}')
    assert r.returncode == 0, r.stderr
    assert f'checkpoint step {run.other}, val loss {run.val[run.other]:.4f}:' in r.stdout
    assert _sample_text(r.stdout) == text, shift


def _leaves(params) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_export_script_writes_the_best_checkpoint_by_default_and_step_n_on_request(run, tmp_path):
  for flags, step in (([], run.best), ([f'--step={run.other}'], run.other)):
    hf_dir = tmp_path / f'hf_{step}'
    r = _script('convert_hf.py', '--direction=export', f'--ckpt_dir={run.out_dir}', f'--hf_dir={hf_dir}',
                *flags)
    assert r.returncode == 0, r.stderr
    assert 'wrote config.json, model.safetensors to' in r.stdout  # A character vocabulary: no BPE files.
    assert sorted(os.listdir(hf_dir)) == ['config.json', 'model.safetensors']
    exported = _leaves(hf.load_gpt2(str(hf_dir))[1])
    saved = _leaves(checkpoint_lib.load_for_inference(str(run.out_dir), step)[1])
    assert set(saved) < set(exported)  # The tiny model has no biases; the export writes zero ones.
    for name, value in saved.items():
      np.testing.assert_array_equal(exported[name], value, err_msg=f'{name} of step {step}')
    assert not any(exported[name].any() for name in set(exported) - set(saved))


@pytest.mark.parametrize('given', ['hf_dir', 'ckpt_dir'])
def test_export_without_ckpt_dir_or_hf_dir_is_one_clear_line(given, tmp_path):
  r = _script('convert_hf.py', '--direction=export', f'--{given}={tmp_path / given}')
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
  assert r.stderr == ('error: export needs --ckpt_dir (a gpt_jax run) and --hf_dir (where the HF '
                      'files go).\n')


def test_convert_with_an_unknown_direction_is_one_clear_line(tmp_path):
  r = _script('convert_hf.py', '--direction=sideways', f'--ckpt_dir={tmp_path}', f'--hf_dir={tmp_path}')
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
  assert r.stderr.splitlines()[0].startswith('error: flag --direction=sideways: value should be one of')
