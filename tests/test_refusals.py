"""Refusals: a bad resume or bad input gives one clear message and leaves every checkpoint intact."""

import pathlib

import jax
import pytest

from gpt_jax import checkpoint as checkpoint_lib, config as config_lib, sample_run
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.training import loop as loop_lib, step as step_lib


def _files(out_dir: str) -> dict[str, tuple[int, int]]:
  """Every file under out_dir/checkpoints: (size, mtime), keyed by relative path."""
  root = pathlib.Path(out_dir) / 'checkpoints'
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob('*') if p.is_file()}


@pytest.fixture
def trained(tiny_config):
  """The tiny preset trained for 10 steps: checkpoints at steps 5 and 10."""
  tiny_config.train.update(max_steps=10, eval_interval=5)
  loop_lib.train_and_evaluate(tiny_config)
  before = _files(tiny_config.out_dir)
  assert any(k.startswith('10/') for k in before)
  tiny_config.train.update(resume=True, max_steps=20)
  return tiny_config, before


@pytest.mark.slow
def test_resume_with_another_tokenizer(trained, tmp_path):
  config, before = trained
  text = pathlib.Path(config.data.text_path).read_text(encoding='utf-8')
  assert 'Q' not in text
  other = tmp_path / 'other.txt'  # The same number of symbols, one of them different.
  other.write_text(text.replace('q', 'Q'), encoding='utf-8')
  config.data.update(text_path=str(other), data_dir=str(tmp_path / 'other_data'))
  with pytest.raises(UserError, match='trained with another vocabulary'):
    loop_lib.train_and_evaluate(config)
  assert _files(config.out_dir) == before


@pytest.mark.slow
def test_resume_of_a_parameters_only_checkpoint(tiny_config):
  ds = text_lib.load(tiny_config.data, verbose=False)
  model_cfg = config_lib.model_config_from(tiny_config, ds.tokenizer.vocab_size)
  params = step_lib.init_train_state(model_cfg, tiny_config.train).params
  ckpt = checkpoint_lib.Checkpointer(f'{tiny_config.out_dir}/checkpoints')
  ckpt.save_params(0, params, {'model': model_cfg.to_dict(), 'tokenizer': ds.tokenizer.to_dict()})
  ckpt.close()
  before = _files(tiny_config.out_dir)
  tiny_config.train.resume = True
  with pytest.raises(UserError, match='holds parameters only.*cannot be resumed.*fresh'):
    loop_lib.train_and_evaluate(tiny_config)
  assert _files(tiny_config.out_dir) == before


@pytest.mark.slow
def test_restoring_a_checkpoint_whose_shapes_do_not_fit(trained):
  config, before = trained
  ckpt = checkpoint_lib.Checkpointer(f'{config.out_dir}/checkpoints', config.checkpoint)
  vocab = ckpt.meta(10)['model']['vocab_size']  # The data's own: only the width below differs.

  def abstract():
    model_cfg = config_lib.model_config_from(config, vocab)
    return jax.eval_shape(lambda: step_lib.init_train_state(model_cfg, config.train))

  ckpt.restore_params(10, abstract().params)  # As configured, the checkpoint fits.
  config.model.n_embd = 48  # The arrays on disk are 32 wide.
  with pytest.raises(UserError, match='checkpoint 10 .* does not fit the configured model'):
    ckpt.restore_state(10, abstract())
  with pytest.raises(UserError, match='checkpoint 10 .* cannot restore parameters'):
    ckpt.restore_params(10, abstract().params)
  ckpt.close()
  assert _files(config.out_dir) == before


def test_vocab_size_smaller_than_the_data(tiny_config):
  tiny_config.model.vocab_size = 5
  with pytest.raises(UserError, match=r'model.vocab_size=5 is smaller than the tokenizer.*at least'):
    loop_lib.train_and_evaluate(tiny_config)
  assert not (pathlib.Path(tiny_config.out_dir) / 'checkpoints').exists() or not _files(
      tiny_config.out_dir)


@pytest.mark.slow
def test_nan_before_any_checkpoint(tiny_config):
  tiny_config.train.update(max_steps=20, eval_interval=10, log_interval=1, learning_rate=1e6,
                           min_learning_rate=1e6, grad_clip=0.0)
  with pytest.raises(UserError, match=r'diverged.*no checkpoint had been written yet.*learning_rate'):
    loop_lib.train_and_evaluate(tiny_config)
  assert _files(tiny_config.out_dir) == {}  # Nothing half-written is left to be mistaken for a run.


SAMPLE_CHECKS = [
    (dict(num_samples=0), '--num_samples must be >= 1'),
    (dict(max_new_tokens=0), '--max_new_tokens must be >= 1'),
    (dict(top_k=-1), '--top_k must be >= 0'),
    (dict(temperature=-0.5), '--temperature must be >= 0'),
    (dict(temperature=float('nan')), r'--temperature must be >= 0 \(got nan\)'),
    (dict(temperature=float('inf')), r'--temperature must be >= 0 \(got inf\)'),
    (dict(window_shift=-1), r'--window_shift must be >= 0 \(got -1\)'),
    (dict(num_samples=0, top_k=-1), r'--num_samples must be >= 1 \(got 0\); --top_k must be >= 0'),
    (dict(prompt=''), 'the prompt is empty'),
    (dict(prompt_file='/no/such/prompt.txt'), 'cannot read --prompt_file /no/such/prompt.txt'),
    (dict(step=999), r'no checkpoint for step 999 .*available: \[5, 10\]'),
    (dict(prompt='Zebra€'), "'€'"),
]


@pytest.mark.slow
def test_every_sample_argument_check(trained):
  """Each check of scripts/sample.py's arguments (the script passes them straight through)."""
  config, before = trained
  for kwargs, message in SAMPLE_CHECKS:
    with pytest.raises(UserError, match=message):
      sample_run.sample_from_checkpoint(config.out_dir, verbose=False, **{'max_new_tokens': 4, **kwargs})
  assert sample_run.sample_from_checkpoint(config.out_dir, verbose=False, max_new_tokens=4,
                                             prompt='the ')[0].startswith('the ')  # Valid: fine.
  # What is not given is the run's own sample setting: its config's prompt and max_new_tokens.
  text, = sample_run.sample_from_checkpoint(config.out_dir, verbose=False, num_samples=1)
  assert config.sample.max_new_tokens == 64  # The tiny preset's, not SampleConfig's 500.
  assert text.startswith(config.sample.prompt)
  assert len(text) == len(config.sample.prompt) + config.sample.max_new_tokens
  assert _files(config.out_dir) == before


def test_sample_refuses_a_directory_without_checkpoints(tmp_path):
  with pytest.raises(UserError, match='no checkpoint directory'):
    sample_run.sample_from_checkpoint(str(tmp_path / 'missing'), verbose=False)
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(UserError, match='no checkpoints in'):
    sample_run.sample_from_checkpoint(str(tmp_path / 'empty'), verbose=False)


def test_an_out_dir_that_cannot_be_made_is_one_clear_message(tiny_config, tmp_path):
  """A file where out_dir (or a folder above it) should be: UserError naming it, not a traceback.
  Mutation caught: the makedirs guard removed (NotADirectoryError escapes)."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder', encoding='utf-8')
  tiny_config.out_dir = str(blocker / 'run')
  with pytest.raises(UserError, match=r'cannot create out_dir .*a_file/run: Not a directory'):
    loop_lib.train_and_evaluate(tiny_config)
  assert blocker.read_text(encoding='utf-8') == 'not a folder'
