"""Pictures of training runs and of attention (matplotlib, Agg backend: PNG files, no display needed).

`read_run` turns a run directory's metrics.jsonl into per-step tables, resolving resumes: a
{'event': 'resume', 'step': s} line means the run restarted from its checkpoint at step s, so records
written earlier for steps after s belong to the abandoned timeline and are dropped; for the same step,
later records win. A resume record with a 'time' comes from a run whose clock goes on from its
checkpoint (gpt_jax/training/loop.py), so its times are read as they are. In older runs the clock
restarted at 0 in a resumed process; their times are shifted to continue from the time of the
checkpoint step. Either way 'loss vs time' reads as the training time to reach each step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use('Agg')  # Headless: render straight to PNG. Must precede pyplot's import.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax import files  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402

PANELS = ('loss', 'loss_time', 'lr', 'grad_norm', 'grad_heatmap', 'update_ratio', 'act_rms',
          'attn_entropy')


@dataclasses.dataclass
class Run:
  """One run's records by step. `train`: per-step log lines; `evals`: eval lines; `layer_stats`."""
  name: str
  train: dict[int, dict]
  evals: dict[int, dict]
  layer_stats: dict[int, dict]
  target_val_loss: float = 0.0  # The run config's train.target_val_loss (0 = none).

  def series(self, table: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in train/evals/layer_stats, sorted by step, missing values skipped."""
    rows = getattr(self, table)
    steps = [s for s in sorted(rows) if key in rows[s]]
    return np.array(steps, np.int64), np.array([rows[s][key] for s in steps], np.float64)


def _record_problem(rec: dict) -> str:
  """What makes a metrics record unusable ('' if nothing): a step or time that is not a number."""
  for key in ('step', 'time'):
    if key in rec and (isinstance(rec[key], bool) or not isinstance(rec[key], (int, float))):
      return f'has {key}={rec[key]!r}, not a number'
  return ''


def image_path(out: str) -> str:
  """The file an image written to `out` lands in: PNG unless `out` ends in a format matplotlib writes."""
  ext = os.path.splitext(out)[1].lower().lstrip('.')
  if not ext:
    return out + '.png'  # What savefig does with a name without an extension.
  from matplotlib.backend_bases import FigureCanvasBase
  formats = FigureCanvasBase.get_supported_filetypes()
  if ext not in formats:
    raise UserError(f'cannot write a picture as {out}: .{ext} is not an image format; end the name in '
                    '.png (or .' + ', .'.join(f for f in ('pdf', 'svg', 'jpg') if f in formats) + ').')
  return out


def read_run(run_dir: str, name: Optional[str] = None) -> Run:
  """Parses run_dir/metrics.jsonl (see the module docstring for how resumes are handled)."""
  path = os.path.join(run_dir, 'metrics.jsonl') if os.path.isdir(run_dir) else run_dir
  if not os.path.exists(path):
    raise UserError(f'no metrics.jsonl in {run_dir}; pass the out_dir of a training run.')
  records: list[dict] = []
  offset = 0.0  # Wall-clock seconds already spent before the current process started.
  for n, line in enumerate(files.read_text(path, 'the metrics file').split('\n'), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut short by a crash mid-write; everything else is still usable.
    if not isinstance(rec, dict):
      continue
    problem = _record_problem(rec)
    if problem:
      raise UserError(f'line {n} of {path} {problem}; fix or delete that line.')
    if rec.get('event') == 'resume' and 'step' in rec:
      s = int(rec['step'])
      records = [r for r in records if r['step'] <= s]  # Drop the abandoned timeline.
      times = [r['time'] for r in records if 'time' in r]
      offset = 0.0 if 'time' in rec else max(times) if times else 0.0
      continue
    if 'step' not in rec or 'event' in rec:
      continue
    if 'time' in rec:
      rec = dict(rec, time=rec['time'] + offset)
    records.append(rec)
  run = Run(name or os.path.basename(os.path.normpath(os.path.dirname(path))), {}, {}, {})
  for rec in records:  # In file order, so later records for a step overwrite earlier ones.
    table = run.layer_stats if 'layer_stats' in rec else run.evals if 'val_loss' in rec else run.train
    table[int(rec['step'])] = rec
  for s, rec in run.layer_stats.items():  # Also train records (loss, lr, grad_norm): denser curves.
    run.train.setdefault(s, rec)
  run.train = dict(sorted(run.train.items()))
  config_path = os.path.join(os.path.dirname(path), 'config.json')
  if os.path.exists(config_path):  # Written by the training loop beside metrics.jsonl.
    try:
      with open(config_path, encoding='utf-8') as f:
        run.target_val_loss = float(json.load(f).get('train', {}).get('target_val_loss', 0.0) or 0.0)
    except (OSError, ValueError, AttributeError):
      pass  # The target line is an extra; a missing or unreadable config only drops it.
  return run


def _layers(run: Run, metric: str) -> list[str]:
  """Layer names of a per-layer statistic in model order: wte, wpe / embed, h_0 ... h_{L-1}, ln_f."""
  names: list[str] = []
  for rec in run.layer_stats.values():
    for k in rec['layer_stats'].get(metric, {}):
      if k not in names:
        names.append(k)

  first = ['embed', 'wte', 'wpe']

  def order(k: str) -> tuple[int, int]:
    if k in first:
      return (0, first.index(k))
    if k.startswith('h_') and k[2:].isdigit():
      return (1, int(k[2:]))
    return (2, 0)  # ln_f, after the blocks.
  return sorted(names, key=order)


def layer_stats_matrix(run: Run, metric: str) -> tuple[np.ndarray, list[str], np.ndarray]:
  """(steps, layer names, values (layers, steps)) of a per-layer statistic; NaN where absent."""
  steps = np.array(sorted(run.layer_stats), np.int64)
  layers = _layers(run, metric)
  m = np.full((len(layers), len(steps)), np.nan)
  for j, s in enumerate(steps):
    d = run.layer_stats[int(s)]['layer_stats'].get(metric, {})
    for i, k in enumerate(layers):
      if k in d:
        m[i, j] = np.mean(d[k])  # attn_entropy holds one value per head: their mean.
  return steps, layers, m


def _colors(n: int) -> list:
  return [plt.get_cmap('tab10')(i % 10) for i in range(n)]


def plot_loss(ax: Any, runs: Sequence[Run], x: str = 'step') -> None:
  """Train (thin) and val (markers) loss of each run against step or wall-clock minutes."""
  for run, color in zip(runs, _colors(len(runs))):
    for table, key, style in (('train', 'train_loss', '-'), ('evals', 'val_loss', 'o-')):
      rows = getattr(run, table)
      steps = [s for s in sorted(rows) if key in rows[s] and (x == 'step' or 'time' in rows[s])]
      if not steps:
        continue
      xs = steps if x == 'step' else [rows[s]['time'] / 60 for s in steps]
      ys = [rows[s][key] for s in steps]
      label = f'{run.name} {"train" if key == "train_loss" else "val"}'
      ax.plot(xs, ys, style, color=color, label=label, lw=1 if key == 'train_loss' else 1.8,
              ms=4, alpha=0.6 if key == 'train_loss' else 1.0)
  for target in sorted({r.target_val_loss for r in runs if r.target_val_loss > 0}):
    ax.axhline(target, ls='--', lw=1, color='gray', label=f'target val {target:g}')
  ax.set_xlabel('step' if x == 'step' else 'wall-clock minutes')
  ax.set_ylabel('loss (nats/token)')
  ax.set_title('loss vs ' + ('step' if x == 'step' else 'time'))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot_scalar(ax: Any, runs: Sequence[Run], key: str, title: str, log: bool = False) -> None:
  """A per-step train-log scalar (lr, grad_norm, ...) of each run."""
  for run, color in zip(runs, _colors(len(runs))):
    steps, vals = run.series('train', key)
    if len(steps):
      ax.plot(steps, vals, color=color, label=run.name, lw=1.2)
  ax.set_xlabel('step')
  ax.set_title(title)
  if log:
    ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot_heatmap(ax: Any, run: Run, metric: str = 'grad_norm', log: bool = True,
                 title: Optional[str] = None) -> None:
  """A per-layer statistic as a layer x step image (log10 colour scale by default)."""
  steps, layers, m = layer_stats_matrix(run, metric)
  if not len(steps):
    ax.text(0.5, 0.5, f'{run.name}: no layer_stats records\n(train with '
            '--config.train.layer_stats_interval=N)', ha='center', va='center', transform=ax.transAxes)
    ax.set_axis_off()
    return
  vals = np.log10(np.maximum(m, 1e-12)) if log else m
  half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
  im = ax.imshow(vals, aspect='auto', interpolation='nearest', cmap='viridis', origin='upper',
                 extent=(steps[0] - half, steps[-1] + half, len(layers) - 0.5, -0.5))
  ax.set_yticks(range(len(layers)))
  ax.set_yticklabels(layers, fontsize=8)
  ax.set_xlabel('step')
  ax.set_title(title or f'{run.name}: {metric}' + (' (log10)' if log else ''))
  ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def plot_layers(ax: Any, run: Run, metric: str, title: str, log: bool = True,
                reference: Optional[float] = None, ref_label: str = '') -> None:
  """One line per layer of a per-layer statistic against step (blue = early layers, yellow = late)."""
  steps, layers, m = layer_stats_matrix(run, metric)
  cmap = plt.get_cmap('viridis')
  for i, k in enumerate(layers):
    ax.plot(steps, m[i], color=cmap(i / max(len(layers) - 1, 1)), label=k, lw=1.3, marker='.', ms=3)
  if reference is not None:
    ax.axhline(reference, color='grey', ls='--', lw=1, label=ref_label)
  ax.set_xlabel('step')
  ax.set_title(title)
  if log:
    ax.set_yscale('log')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7, ncol=2)


def _uniform_entropy(run: Run) -> Optional[float]:
  for rec in run.layer_stats.values():
    if 'attn_entropy_uniform' in rec['layer_stats']:
      return rec['layer_stats']['attn_entropy_uniform']
  return None


def draw_panel(ax: Any, panel: str, runs: Sequence[Run], run: Optional[Run] = None) -> None:
  """Draws one named panel (see PANELS); per-run panels use `run`."""
  if panel == 'loss':
    plot_loss(ax, runs, 'step')
  elif panel == 'loss_time':
    plot_loss(ax, runs, 'time')
  elif panel == 'lr':
    plot_scalar(ax, runs, 'lr', 'learning rate')
  elif panel == 'grad_norm':
    plot_scalar(ax, runs, 'grad_norm', 'global gradient norm (before clipping)')
  elif panel == 'grad_heatmap':
    plot_heatmap(ax, run, 'grad_norm', title=f'{run.name}: gradient norm per layer (log10)')
  elif panel == 'update_ratio':
    plot_layers(ax, run, 'update_ratio', f'{run.name}: update / parameter norm per layer',
                reference=1e-3, ref_label='1e-3')
  elif panel == 'act_rms':
    plot_layers(ax, run, 'act_rms', f'{run.name}: residual-stream RMS after each block', log=False)
  elif panel == 'attn_entropy':
    plot_layers(ax, run, 'attn_entropy', f'{run.name}: attention entropy (nats, mean over heads)',
                log=False, reference=_uniform_entropy(run), ref_label='uniform')
  else:
    raise UserError(f'unknown panel {panel!r}; choose from {", ".join(PANELS)}')


PER_RUN = ('grad_heatmap', 'update_ratio', 'act_rms', 'attn_entropy')


def overview(runs: Sequence[Run], out: str, panels: Optional[Sequence[str]] = None,
             dpi: int = 90) -> str:
  """Writes a PNG with the chosen panels (default: all that have data); returns the path.

  Shared panels (loss, loss_time, lr, grad_norm) overlay every run; per-run panels (the layer statistics)
  get one copy per run that has layer_stats records.
  """
  if not runs:
    raise UserError('no runs to plot')
  has_dyn = [r for r in runs if r.layer_stats]
  if panels is None:
    panels = [p for p in PANELS if p not in PER_RUN or has_dyn]
  for p in panels:
    if p not in PANELS:
      raise UserError(f'unknown panel {p!r}; choose from {", ".join(PANELS)}')
  cells: list[tuple[str, Optional[Run]]] = []
  for p in panels:
    if p in PER_RUN:
      cells += [(p, r) for r in (has_dyn or runs[:1])]
    else:
      cells.append((p, None))
  ncols = 1 if len(cells) == 1 else 2
  nrows = math.ceil(len(cells) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
  for ax, (p, r) in zip(axes.flat, cells):
    draw_panel(ax, p, runs, r)
  for ax in list(axes.flat)[len(cells):]:
    ax.set_axis_off()
  fig.tight_layout()
  out = image_path(out)
  files.make_dir(os.path.dirname(os.path.abspath(out)), 'the folder of the plot')
  try:
    with files.guard(out, 'write the plot'):
      fig.savefig(out, dpi=dpi)
  finally:
    plt.close(fig)
  return out


def axis_label(s: str) -> str:
  """Tick label for a token: whitespace shown visibly (␣ for space, \\n for newline)."""
  return s.replace(' ', '␣').replace('\n', '\\n').replace('\t', '\\t') or '∅'


def attention_grid(probs: np.ndarray, labels: Sequence[str], out: str, title: str = '',
                   dpi: int = 80, head_titles: Optional[Sequence[Sequence[str]]] = None) -> str:
  """Heatmaps of attention probabilities, one per layer (rows) and head (columns).

  probs: (L, H, T, T), row = query position, column = key position. Labels name the tokens; with
  more than 48 tokens only every k-th is printed so they stay readable. head_titles[l][h] replaces
  'layer l, head h' (e.g. probes.best_pattern's names).
  """
  L, H, T, _ = probs.shape
  size = min(4.5, max(2.4, 0.13 * T + 0.6))  # Inches per heatmap: ~0.13 in per token, bounded.
  fig, axes = plt.subplots(L, H, figsize=(size * H + 0.6, size * L + 0.8), squeeze=False)
  every = max(1, math.ceil(T / 32))
  ticks = list(range(0, T, every))
  fontsize = 7 if len(ticks) <= 32 else 5
  shown = [axis_label(labels[i]) for i in ticks]
  for l in range(L):
    for h in range(H):
      ax = axes[l, h]
      ax.imshow(probs[l, h], cmap='magma', vmin=0.0, vmax=1.0, interpolation='nearest')
      ax.set_xticks(ticks)
      ax.set_yticks(ticks)
      ax.set_xticklabels(shown, fontsize=fontsize, rotation=90)
      ax.set_yticklabels(shown, fontsize=fontsize)
      ax.tick_params(length=1, pad=1)
      ax.set_title(head_titles[l][h] if head_titles else f'layer {l}, head {h}', fontsize=8)
      if h == 0:
        ax.set_ylabel('query (attends from)', fontsize=7)
      if l == L - 1:
        ax.set_xlabel('key (attends to)', fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  height = size * L + 0.8
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # Leave the top 0.35 in to the title.
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  plt.close(fig)
  return out
