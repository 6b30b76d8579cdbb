"""Behaviour held fixed: the train and val losses of fixed-seed 50-step runs, recorded before a refactor.

`tests/golden/losses.json` holds, for 50 steps of the `tiny` and `nanogpt_cpu` presets (nanoGPT's own
CPU recipe, which stays fixed while `cpu` follows the best 3-minute recipe) on the shipped
TinyShakespeare, from the in-memory splits and from token shards, and of one `tiny` run with dropout and
gradient accumulation: the train loss of every step and the val loss of the evals at steps 0 and 50.

Refactors of the training code must reproduce them: bit for bit where the bits are determined, that is
with the same CPU features (XLA:CPU compiles for the host's instruction sets, so the flags of
/proc/cpuinfo choose the kernels and their rounding), the same jaxlib build and the same XLA_FLAGS.
Elsewhere the losses must agree within `TOLERANCE`: rounding differences of another build grow with
the steps of training but stay well under it, while a real change to the model, data or optimizer
(one token of the batch, one step of the schedule) moves the losses far beyond it.

    python tests/test_golden_losses.py --record    # only when a change is *meant* to move the losses
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden' / 'losses.json'
STEPS = 50
# (name, preset, token shards, overrides). The last one also holds dropout's keys and the
# accumulation's micro-batch split fixed.
RUNS = [('tiny/memory', 'tiny', False, {}), ('tiny/shards', 'tiny', True, {}),
        ('nanogpt_cpu/memory', 'nanogpt_cpu', False, {}), ('nanogpt_cpu/shards', 'nanogpt_cpu', True, {}),
        ('tiny/dropout_accum', 'tiny', False, {'model.dropout': 0.1, 'train.grad_accum_steps': 2})]
# Absolute, on every train and val loss: between what another CPU's rounding does to these runs and
# what the smallest real change does (both measured in docs/faithfulness.md, "Golden losses").
TOLERANCE = 5e-5


def bits_key() -> dict:
  """What decides the bits of the losses: the CPU's feature flags, the jaxlib build, XLA_FLAGS."""
  flags = ''
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text(encoding='utf-8').splitlines():
      if line.startswith(('flags', 'Features')):  # x86, ARM.
        flags = ' '.join(sorted(line.split(':', 1)[1].split()))
        break
  except OSError:
    flags = platform.processor() or platform.machine()
  import jaxlib.version
  return {'machine': platform.machine(),
          'cpu_flags_sha256': hashlib.sha256(flags.encode()).hexdigest(),
          'jaxlib': jaxlib.version.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def run_losses(name: str, workdir: str) -> dict:
  """{'train': losses of steps 1..STEPS, 'val': [val loss at step 0, at STEPS]} of run `name`."""
  _, preset, sharded, overrides = next(r for r in RUNS if r[0] == name)
  sys.path.insert(0, str(REPO))
  from configs import shakespeare
  from gpt_jax.training import loop as loop_lib
  c = shakespeare.get_config(preset)
  c.out_dir = f'{workdir}/{name.replace("/", "_")}/out'
  c.data.data_dir = f'{workdir}/data_{preset}'
  if sharded:
    c.data.shards_dir = f'{workdir}/shards'
  c.train.update(max_steps=STEPS, log_interval=1, eval_interval=STEPS, eval_iters=2,
                 peak_flops=1e12)
  c.sample.eval_tokens = 0
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  loop_lib.train_and_evaluate(c)
  recs = [json.loads(l) for l in pathlib.Path(f'{c.out_dir}/metrics.jsonl').read_text('utf-8').splitlines()]
  losses = {r['step']: r['train_loss'] for r in recs if 'ms_per_step' in r}
  assert sorted(losses) == list(range(1, STEPS + 1))
  val = {r['step']: r['val_loss'] for r in recs if 'val_loss' in r}
  assert sorted(val) == [0, STEPS]
  return {'train': [losses[s] for s in range(1, STEPS + 1)], 'val': [val[0], val[STEPS]]}


def compare(got: dict, want: dict, exact: bool) -> None:
  """Fails naming the first differing losses: any difference if `exact`, else beyond TOLERANCE."""
  for what in ('train', 'val'):
    pairs = list(zip(got[what], want[what]))
    bad = [(i, g, w) for i, (g, w) in enumerate(pairs) if (g != w if exact else abs(g - w) > TOLERANCE)]
    assert not bad, (f'{what} losses {"not bit for bit" if exact else f"off by more than {TOLERANCE}"} '
                     f'(index, got, recorded): {bad[:5]}')


@pytest.mark.slow
@pytest.mark.parametrize('name', [r[0] for r in RUNS])
def test_losses_match_the_recorded_ones(name, tmp_path):
  golden = json.loads(GOLDEN.read_text())
  compare(run_losses(name, str(tmp_path)), golden['runs'][name], exact=bits_key() == golden['bits'])


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
  import jax
  with tempfile.TemporaryDirectory() as d:
    runs = {r[0]: run_losses(r[0], d) for r in RUNS}
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(json.dumps({'bits': bits_key(), 'jax': jax.__version__, 'steps': STEPS, 'runs': runs},
                               indent=1) + '\n')
  print(f'wrote {GOLDEN}')
