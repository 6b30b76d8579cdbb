"""Checkpoints written before the optimizers were renamed still sample, load and resume identically.

tests/fixtures/checkpoints_v1/ holds three tiny runs made by that earlier code (train.optimizer 'optax',
'scratch', and 'muon' with batched Newton-Schulz, an EMA of the weights and the model variants), each
stopped at step 4, with the sample they gave and the losses of resuming them to step 6 (expected.json).
Every figure is compared exactly: a checkpoint that loads into a differently shaped state, or an
optimizer that drifts by one rounding, fails here.
"""

import json
import pathlib
import shutil

import pytest

from configs import shakespeare
from gpt_jax import sample_run
from gpt_jax.training import loop as loop_lib

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'checkpoints_v1'
EXPECTED = json.loads((FIXTURES / 'expected.json').read_text(encoding='utf-8'))
# train.py's flags for the resumed runs (README.md beside the fixtures), after the run's own flags.
RESUME_FLAGS = ('--config.train.max_steps=6', '--config.train.eval_interval=2', '--config.train.eval_iters=1',
                '--config.train.log_interval=1', '--config.checkpoint.async_save=False',
                '--config.train.resume=True')


def _copy(run: str, tmp_path: pathlib.Path) -> pathlib.Path:
  """The fixture run copied to tmp_path (a resume writes into its out_dir)."""
  out_dir = tmp_path / run
  shutil.copytree(FIXTURES / run, out_dir)
  return out_dir


def _set_flag(config, flag: str) -> None:
  """Applies one `--config.section.field=value` flag, parsed by the type of the field it sets."""
  key, value = flag.removeprefix('--config.').split('=', 1)
  *sections, field = key.split('.')
  node = config
  for name in sections:
    node = node[name]
  old = node[field]
  node[field] = (value == 'True') if isinstance(old, bool) else type(old)(value)


def _resume(run: str, tmp_path: pathlib.Path, *flags: str) -> list[dict]:
  """Resumes the fixture run to step 6 in-process, as train.py would; the metrics it appended."""
  out_dir = _copy(run, tmp_path)
  before = len((out_dir / 'metrics.jsonl').read_text(encoding='utf-8').splitlines())
  config = shakespeare.get_config('tiny')
  for flag in (*EXPECTED['runs'][run]['flags'], *flags, *RESUME_FLAGS):
    _set_flag(config, flag)
  config.out_dir = str(out_dir)
  config.data.data_dir = str(tmp_path / 'data')
  config.train.peak_flops = 1e12  # Skips measuring the CPU's matmul speed; only the MFU reads it.
  loop_lib.train_and_evaluate(config)
  lines = (out_dir / 'metrics.jsonl').read_text(encoding='utf-8').splitlines()
  return [json.loads(line) for line in lines[before:]]


def _check_resumed(run: str, records: list[dict]) -> None:
  want = EXPECTED['runs'][run]
  train = {r['step']: r['train_loss'] for r in records if 'grad_norm' in r}  # The per-step log records.
  evals = {r['step']: r['val_loss'] for r in records if 'val_loss' in r}
  assert {s: train[s] for s in (5, 6)} == {int(s): v for s, v in want['resumed_train_loss'].items()}
  assert evals[6] == want['resumed_val_loss_6']


@pytest.mark.slow
@pytest.mark.parametrize('run', sorted(EXPECTED['runs']))
def test_old_checkpoint_samples_the_same_text(run, tmp_path):
  out_dir = _copy(run, tmp_path)
  texts = sample_run.sample_from_checkpoint(
      str(out_dir), prompt=EXPECTED['prompt'], max_new_tokens=EXPECTED['max_new_tokens'],
      temperature=EXPECTED['temperature'], top_k=EXPECTED['top_k'], seed=EXPECTED['seed'], verbose=False)
  assert texts == [EXPECTED['runs'][run]['sample']]


@pytest.mark.slow
@pytest.mark.parametrize('run,new_name', [('optax', None), ('scratch', None), ('muon', None),
                                          ('optax', 'adamw'), ('scratch', 'adamw_by_hand')])
def test_old_checkpoint_resumes_to_the_same_losses(run, new_name, tmp_path):
  """Resumed under the name it was saved with, and (for the renamed AdamWs) under today's name."""
  flags = () if new_name is None else (f'--config.train.optimizer={new_name}',)
  _check_resumed(run, _resume(run, tmp_path, *flags))
