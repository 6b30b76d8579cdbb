"""The seeing-inside tools on a tiny trained run: layer_stats records, TensorBoard, plots (incl. resumed
runs), the shape-flow table against the model's own counts, attention grids and token traces."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.data.tokenizer import CharTokenizer
from gpt_jax.lab import plots, probes, shape_flow
from gpt_jax.model import GPT
from gpt_jax.training import loop as loop_lib, metrics as metrics_lib

from conftest import make_synthetic_text

REPO = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def run(script, *args, timeout=900):
  return subprocess.run([sys.executable, str(REPO / 'scripts' / script), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONUNBUFFERED='1'))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The `tiny` preset trained for 12 steps on synthetic text, layer statistics every 6 steps, TensorBoard on."""
  from configs import shakespeare
  tmp = tmp_path_factory.mktemp('tiny_run')
  (tmp / 'input.txt').write_text(make_synthetic_text(), encoding='utf-8')
  c = shakespeare.get_config('tiny')
  c.out_dir, c.data.text_path = str(tmp / 'out'), str(tmp / 'input.txt')
  c.data.data_dir, c.data.cache_dir = str(tmp / 'data'), str(tmp / 'cache')
  c.train.update(max_steps=12, eval_interval=6, eval_iters=2, log_interval=3, layer_stats_interval=6,
                 tensorboard=importable('tensorboardX'), peak_flops=1e12)
  c.sample.eval_tokens = 0
  c.checkpoint.save = 'always'
  loop_lib.train_and_evaluate(c)
  return c.out_dir


def importable(name):
  try:
    __import__(name)
    return True
  except ImportError:
    return False


def _records(out_dir):
  with open(os.path.join(out_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(l) for l in f]


def _png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 5000
  return len(data)


# --- the training loop's records --------------------------------------------------------------------

@pytest.mark.slow
def test_run_logs_layer_stats_records(tiny_run):
  recs = _records(tiny_run)
  dyn = [r for r in recs if 'layer_stats' in r]
  assert [r['step'] for r in dyn] == [6, 12]
  d = dyn[-1]['layer_stats']
  for key in ('grad_norm', 'param_norm', 'update_ratio'):
    assert set(d[key]) == {'wte', 'wpe', 'h_0', 'h_1', 'ln_f'} and all(v > 0 for v in d[key].values())
  assert set(d['act_rms']) == {'embed', 'h_0', 'h_1'}
  assert set(d['attn_entropy']) == {'h_0', 'h_1'} and all(len(v) == 2 for v in d['attn_entropy'].values())
  assert d['logit_std'] > 0 and d['attn_entropy_uniform'] > max(max(v) for v in d['attn_entropy'].values())
  # A layer_stats record is also a valid train record: the same loss as that step's log line.
  line = [r for r in recs if r['step'] == 12 and 'ms_per_step' in r][0]
  assert (dyn[-1]['train_loss'], dyn[-1]['grad_norm']) == (line['train_loss'], line['grad_norm'])


@pytest.mark.slow
def test_tensorboard_event_files(tiny_run):
  pytest.importorskip('tensorboardX')
  tb = os.path.join(tiny_run, 'tensorboard')
  events = [f for f in os.listdir(tb) if f.startswith('events.out.tfevents')]
  assert events and os.path.getsize(os.path.join(tb, events[0])) > 1000
  blob = pathlib.Path(tb, events[0]).read_bytes()
  for tag in (b'eval/val_loss', b'train/train_loss', b'layer_stats/grad_norm/h_0',
              b'layer_stats/attn_entropy/h_1/1'):
    assert tag in blob


def test_flatten_for_tensorboard():
  assert metrics_lib.flatten({'a': {'b': 1, 'c': [2.0, 3]}, 's': 'text', 'n': float('nan'), 't': True}
                             ) == {'a/b': 1.0, 'a/c/0': 2.0, 'a/c/1': 3.0}


# --- plots ------------------------------------------------------------------------------------------

def _write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')


def test_read_run_resolves_resumes(tmp_path):
  """Records after the checkpoint step from before a resume are dropped; later records win; wall-clock
  time continues from the checkpoint's."""
  _write_jsonl(tmp_path / 'r' / 'metrics.jsonl', [
      {'step': 0, 'train_loss': 4.0, 'val_loss': 4.1, 'time': 1.0},
      {'step': 10, 'train_loss': 3.0, 'lr': 1e-3, 'grad_norm': 1.0, 'time': 10.0},
      {'step': 10, 'train_loss': 3.1, 'val_loss': 3.2, 'time': 11.0},
      {'step': 20, 'train_loss': 2.5, 'lr': 1e-3, 'grad_norm': 1.0, 'time': 20.0},  # Abandoned.
      {'step': 30, 'train_loss': 2.4, 'lr': 1e-3, 'grad_norm': 1.0, 'time': 30.0},  # Abandoned.
      {'event': 'resume', 'step': 10},
      {'step': 20, 'train_loss': 2.6, 'lr': 9e-4, 'grad_norm': 1.0, 'time': 5.0},
  ])
  r = plots.read_run(str(tmp_path / 'r'))
  assert sorted(r.train) == [10, 20] and r.train[20]['train_loss'] == 2.6
  assert r.train[20]['time'] == 16.0  # 11 s (the checkpoint's eval) + 5 s in the resumed process.
  assert sorted(r.evals) == [0, 10] and not r.layer_stats
  assert list(r.series('train', 'lr')[1]) == [1e-3, 9e-4]


def test_read_run_takes_the_times_of_a_run_whose_clock_went_on(tmp_path):
  """A resume record with a time (the clock continued from the checkpoint's): times are kept as is."""
  _write_jsonl(tmp_path / 'r' / 'metrics.jsonl', [
      {'step': 10, 'train_loss': 3.1, 'val_loss': 3.2, 'time': 11.0},
      {'step': 20, 'train_loss': 2.5, 'lr': 1e-3, 'grad_norm': 1.0, 'time': 20.0},  # Abandoned.
      {'event': 'resume', 'step': 10, 'time': 12.0},
      {'step': 20, 'train_loss': 2.6, 'lr': 9e-4, 'grad_norm': 1.0, 'time': 17.0},
  ])
  assert plots.read_run(str(tmp_path / 'r')).train[20]['time'] == 17.0


def test_loss_panels_draw_the_runs_target(tmp_path):
  """A run whose config sets train.target_val_loss gets a dashed line at it; one without gets none."""
  import matplotlib.pyplot as plt
  records = [{'step': 0, 'train_loss': 4.0, 'val_loss': 4.1, 'time': 1.0},
             {'step': 10, 'train_loss': 1.5, 'val_loss': 1.45, 'time': 60.0}]
  _write_jsonl(tmp_path / 'a' / 'metrics.jsonl', records)
  (tmp_path / 'a' / 'config.json').write_text(json.dumps({'train': {'target_val_loss': 1.47}}))
  _write_jsonl(tmp_path / 'b' / 'metrics.jsonl', records)  # No config.json: no target.
  a, b = plots.read_run(str(tmp_path / 'a')), plots.read_run(str(tmp_path / 'b'))
  assert (a.target_val_loss, b.target_val_loss) == (1.47, 0.0)
  for runs, want in (([a, b], ['target val 1.47']), ([b], [])):
    fig, ax = plt.subplots()
    plots.plot_loss(ax, runs, 'time')
    assert [l.get_label() for l in ax.get_lines() if l.get_linestyle() == '--'] == want
    plt.close(fig)


@pytest.mark.slow
def test_plot_script_overlays_runs(tiny_run, tmp_path):
  other = tmp_path / 'other'  # A second, resumed run without layer_stats records.
  _write_jsonl(other / 'metrics.jsonl', [
      {'step': 0, 'train_loss': 4.2, 'val_loss': 4.2, 'time': 0.5},
      {'step': 6, 'train_loss': 3.5, 'lr': 1e-3, 'grad_norm': 2.0, 'time': 3.0},
      {'event': 'resume', 'step': 6},
      {'step': 12, 'train_loss': 3.0, 'val_loss': 3.1, 'lr': 5e-4, 'time': 2.0},
  ])
  out = tmp_path / 'cmp.png'
  r = run('plot.py', tiny_run, str(other), f'--out={out}')
  assert r.returncode == 0 and 'wrote' in r.stdout, r.stderr
  _png(out)
  r = run('plot.py', tiny_run, '--panels=grad_heatmap,update_ratio', f'--out={tmp_path / "d.png"}')
  assert r.returncode == 0, r.stderr
  _png(tmp_path / 'd.png')
  r = run('plot.py', str(tmp_path / 'nowhere'))
  assert r.returncode == 1 and 'no metrics.jsonl' in r.stderr


@pytest.mark.slow
def test_layer_stats_matrix_orders_layers(tiny_run):
  steps, layers, m = plots.layer_stats_matrix(plots.read_run(tiny_run), 'grad_norm')
  assert list(steps) == [6, 12] and layers == ['wte', 'wpe', 'h_0', 'h_1', 'ln_f']
  assert m.shape == (5, 2) and np.all(m > 0)


# --- shape flow -------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [
    ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True),
], ids=['cpu', 'gpt2'])
@pytest.mark.slow
def test_shape_flow_totals_match_the_models_counts(cfg):
  rows = shape_flow.shape_flow(cfg, batch_size=2)
  n_params, n_flops = shape_flow.totals(rows)
  assert n_params == num_params(cfg)
  assert n_flops == config_lib.flops_per_token(cfg)
  by_name = {r.name: r for r in rows}
  C, T = cfg.n_embd, cfg.block_size
  assert by_name['h_0.attn.c_attn'].output == f'(2,{T},{3 * C})'
  assert by_name['h_0.mlp.c_fc'].output == f'(2,{T},{4 * C})'
  assert by_name['lm_head'].output == f'(2,{T},{cfg.vocab_size})'
  assert by_name['h_0'].subtotal[0] == 12 * C * C + (13 * C if cfg.bias else 2 * C)
  assert len([r for r in rows if r.kind == 'Block']) == cfg.n_layer


def test_inspect_model_script():
  r = run('inspect_model.py', '--config', str(REPO / 'configs' / 'shakespeare.py') + ':nanogpt_cpu',
          '--config.model.vocab_size=65')
  assert r.returncode == 0, r.stderr
  assert '(matches)' in r.stdout and 'c_attn' in r.stdout and 'softmax(qk^T)v' in r.stdout
  total = [l for l in r.stdout.splitlines() if l.startswith('total')][0]
  cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
  assert f'{num_params(cfg):,}' in total and f'{config_lib.flops_per_token(cfg):,}' in total


# --- attention and token traces ---------------------------------------------------------------------

@pytest.mark.slow
def test_attention_script_writes_a_grid(tiny_run, tmp_path):
  out = tmp_path / 'att.png'
  r = run('attention.py', f'--ckpt_dir={tiny_run}', '--text=ROMEO:\nthe king', f'--out={out}')
  assert r.returncode == 0 and '2 layers x 2 heads' in r.stdout, r.stderr
  assert _png(out) < 300_000
  r = run('attention.py', f'--ckpt_dir={tiny_run}', '--text=ROMEO: 7%', f'--out={out}')
  assert r.returncode == 1 and 'not in this model' in r.stderr  # Unknown characters: one clear line.


@pytest.mark.slow
def test_attention_maps_are_causal_distributions(tiny_run):
  cfg, params, tok = probes.load(tiny_run)
  probs = probes.attention_maps(params, cfg, tok.encode('JULIET:\nsweet'))
  assert probs.shape == (2, 2, 13, 13)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(probs, 1) == 0)


@pytest.mark.slow
def test_trace_script_and_values(tiny_run):
  r = run('trace.py', f'--ckpt_dir={tiny_run}', '--text=ROMEO:\nthe king', '--top_k=3')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].split()[:5] == ['pos', 'token', 'next', 'p(next)', 'rank']
  assert len([l for l in lines if l[:4].strip().isdigit()]) == len('ROMEO:\nthe king') - 1
  assert "'\\n'" in r.stdout and 'mean loss' in r.stdout  # Newlines shown escaped.

  cfg, params, tok = probes.load(tiny_run)
  ids = tok.encode('the king')
  rows = probes.token_trace(params, cfg, ids, top_k=4)
  logits = jax.jit(lambda p, i: GPT(cfg).apply({'params': p}, i))(params, np.array([ids[:-1]]))
  p = np.asarray(jax.nn.softmax(logits[0]), np.float64)
  for t, row in enumerate(rows):
    assert row.next_token == ids[t + 1]
    np.testing.assert_allclose(row.prob, p[t, ids[t + 1]], rtol=1e-5)
    assert row.rank == 1 + int(np.sum(p[t] > p[t, ids[t + 1]]))
    assert [j for j, _ in row.top] == list(np.argsort(-p[t], kind='stable')[:4])


def test_token_labels_are_readable():
  char = CharTokenizer(list('\n !ab'))
  assert [probes.token_label(char, i) for i in range(5)] == ["'\\n'", "' '", '!', 'a', 'b']
  from gpt_jax.data import bpe
  tok = bpe.train_bpe('the king and the queen. ' * 20 + 'caf\u00e9', 270, progress=False)
  pieces = [probes.token_label(tok, i) for i in tok.encode(' the king caf\u00e9')]
  assert pieces[0] == "' the'"  # A BPE piece with its leading space, decoded per token.
  assert ''.join(probes.token_text(tok, i) for i in tok.encode('the queen')) == 'the queen'
  assert plots.axis_label(' a\n') == '␣a\\n'


# --- what heads attend to, and copying --------------------------------------------------------------

def test_attention_targets_by_hand():
  labels = list('ab c\nde f')
  #              012345678
  t = probes.attention_targets(labels)
  assert t['previous token'].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7]
  # The newline (4) opens the line: counted for queries past the token after it.
  assert t['line start'].tolist() == [-1] * 6 + [4, 4, 4]
  # The most recent whitespace (the newline too) opens the word; 'c' and 'f' follow theirs directly.
  assert t['word start'].tolist() == [-1] * 6 + [4, -1, -1]


def test_head_scores_find_a_previous_token_head():
  labels = list('ab cd\nef gh')
  T = len(labels)
  prev = np.eye(T, k=-1)
  prev[0, 0] = 1.0
  uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  maps = np.stack([np.stack([prev, uniform])])  # (1 layer, 2 heads, T, T)
  scores = probes.head_scores(maps, labels)
  assert scores['previous token'][0, 0] == 1.0 and scores['previous token'][0, 1] < 0.3
  assert scores['line start'][0, 0] == 0.0 and scores['word start'][0, 0] == 0.0
  targets = probes.attention_targets(labels)['word start']
  queries = np.flatnonzero(targets >= 0)
  assert scores['word start'][0, 1] == pytest.approx(np.mean(1 / (queries + 1)))
  assert probes.best_pattern(scores)[0][0] == 'L0 H0: previous token 1.00'


@pytest.mark.slow
def test_copy_losses_score_each_occurrence(tiny_run, tmp_path):
  cfg, params, tok = probes.load(tiny_run)
  first, second = probes.copy_losses(params, cfg, tok, 'the king', before='ROMEO:\n', between=' ')
  nll = [-np.log(r.prob) for r in probes.token_trace(params, cfg, tok.encode('ROMEO:\nthe king the king'))]
  assert first == pytest.approx(np.mean(nll[7:14]), rel=1e-6)   # 'he king' after 't' at 7
  assert second == pytest.approx(np.mean(nll[16:23]), rel=1e-6)  # the same, at 16
  with pytest.raises(probes.UserError, match='reads at most'):
    probes.copy_losses(params, cfg, tok, 'the king ' * 20)
  maps = probes.attention_maps(params, cfg, tok.encode('ROMEO:\nthe king'))
  titles = probes.best_pattern(probes.head_scores(maps, list('ROMEO:\nthe king')))
  out = plots.attention_grid(maps, list('ROMEO:\nthe king'), str(tmp_path / 'a.png'), head_titles=titles)
  assert _png(out) < 300_000 and titles[0][0].startswith('L0 H0: ')
