"""Behaviour held fixed: the per-step losses of fixed-seed 50-step runs, recorded before a refactor.

`tests/golden/losses.json` holds the train losses of 50 steps of the `tiny` and `nanogpt_cpu` presets
(nanoGPT's own CPU recipe, which stays fixed while `cpu` follows the best 3-minute recipe) on the
shipped TinyShakespeare, from the in-memory splits and from token shards. Refactors of the training
code must reproduce them: bit for bit on the CPU model that recorded them (XLA:CPU is deterministic
there), within 1e-6 on any other CPU, whose kernels may round differently.

    python tests/test_golden_losses.py --record    # only when a change is *meant* to move the losses
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'golden' / 'losses.json'
STEPS = 50
RUNS = [('tiny', False), ('tiny', True), ('nanogpt_cpu', False), ('nanogpt_cpu', True)]


def cpu_model() -> str:
  try:
    for line in open('/proc/cpuinfo', encoding='utf-8'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_losses(preset: str, sharded: bool, workdir: str) -> list[float]:
  """Train losses of steps 1..STEPS of `preset` (seed 1337), one per step, from metrics.jsonl."""
  sys.path.insert(0, str(REPO))
  from configs import shakespeare
  from gpt_jax.training import loop as loop_lib
  c = shakespeare.get_config(preset)
  c.out_dir = f'{workdir}/{preset}_{int(sharded)}/out'
  c.data.data_dir = f'{workdir}/data_{preset}'
  if sharded:
    c.data.shards_dir = f'{workdir}/shards'
  c.train.update(max_steps=STEPS, log_interval=1, eval_interval=STEPS, eval_iters=2,
                 peak_flops=1e12)
  c.sample.eval_tokens = 0
  loop_lib.train_and_evaluate(c)
  recs = [json.loads(l) for l in open(f'{c.out_dir}/metrics.jsonl', encoding='utf-8')]
  losses = {r['step']: r['train_loss'] for r in recs if 'ms_per_step' in r}
  assert sorted(losses) == list(range(1, STEPS + 1))
  return [losses[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize('preset,sharded', RUNS)
def test_losses_match_the_recorded_ones(preset, sharded, tmp_path):
  golden = json.loads(GOLDEN.read_text())
  want = golden['runs'][f'{preset}/{"shards" if sharded else "memory"}']
  got = run_losses(preset, sharded, str(tmp_path))
  if cpu_model() == golden['cpu_model']:
    assert got == want, 'not bit-for-bit on the recording CPU: ' + str(
        [(s + 1, g, w) for s, (g, w) in enumerate(zip(got, want)) if g != w][:5])
  else:
    worst = max(abs(g - w) for g, w in zip(got, want))
    assert worst <= 1e-6, worst


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
  import jax
  with tempfile.TemporaryDirectory() as d:
    runs = {f'{p}/{"shards" if s else "memory"}': run_losses(p, s, d) for p, s in RUNS}
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(json.dumps({'cpu_model': cpu_model(), 'jax': jax.__version__, 'steps': STEPS,
                                'runs': runs}, indent=1) + '\n')
  print(f'wrote {GOLDEN}')
