"""Step cost of a run's variants (its levers), measured side by side in one process.

  python scripts/bench_variants.py --config configs/shakespeare.py:speedrun_gpt2
  python scripts/bench_variants.py --config configs/shakespeare.py:speedrun_gpt2 \\
      --variants 'base:;muon:train.optimizer=muon;muon_ns3:train.optimizer=muon,train.muon_ns_steps=3'

Each variant is the config with the given fields changed (`NAME:KEY=VALUE,KEY=VALUE`, variants joined
by `;`; the first is the baseline of the ratios). Every train step is compiled first, then the variants
are timed in turns, `--rounds` rounds of `--steps` steps each (each round starting one variant later),
and the best round counts: a load that changes slowly falls on every variant alike
(gpt_jax/lab/bench.py: train_side_by_side). Listing a variant twice under two names shows the noise.
XLA's cost analysis gives each step's flops and bytes accessed, which do not depend on the machine.
Prints one table and a final line `BENCH_JSON {...}` with every figure.
"""

from __future__ import annotations

import json

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

LEVERS = ('base:;rotary:model.position=rotary;qk_norm:model.qk_norm=True;relu2:model.activation=relu2;'
          'muon:train.optimizer=muon;muon_ns3:train.optimizer=muon,train.muon_ns_steps=3')
_CONFIG = cli.define_config_file('config', None, 'The run config, PATH[:PRESET].')
_VARIANTS = flags.DEFINE_string('variants', LEVERS,
                                 'NAME:KEY=VALUE,...;NAME:... (the first is the baseline).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timing rounds; the best counts.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps per variant per round.')


def parse_variants(text: str, base) -> dict:
  """{name: config} from 'NAME:KEY=VALUE,KEY=VALUE;...', each value read as its field's type."""
  from gpt_jax.errors import UserError
  out = {}
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, sep, changes = part.partition(':')
    if not sep or not name:
      raise UserError(f'--variants: {part!r} is not NAME:KEY=VALUE,...; e.g. "muon:train.optimizer=muon"')
    if name in out:
      raise UserError(f'--variants: the name {name!r} is used twice')
    cfg = base.copy_and_resolve_references()
    for change in filter(None, changes.split(',')):
      key, eq, value = change.partition('=')
      section, dot, field = key.partition('.')
      if not eq or not dot or section not in cfg or field not in cfg[section]:
        raise UserError(f'--variants: {change!r} in {name!r} is not SECTION.FIELD=VALUE of the config '
                        '(e.g. model.position=rotary)')
      old = cfg[section][field]
      try:
        if isinstance(old, bool):
          if value.lower() not in ('true', 'false'):
            raise ValueError(value)
          new = value.lower() == 'true'
        else:
          new = type(old)(value)
      except ValueError:
        raise UserError(f'--variants: {key} takes a {type(old).__name__}, not {value!r}') from None
      cfg[section][field] = new
    out[name] = cfg
  if not out:
    raise UserError('--variants: no variant given')
  return out


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax import config as config_lib
  from gpt_jax.errors import UserError
  from gpt_jax.lab import bench  # Imported after flag parsing so --help is instant.

  def run() -> None:
    if _CONFIG.value is None:
      raise UserError('--config is required, e.g. --config configs/shakespeare.py:speedrun_gpt2')
    configs = parse_variants(_VARIANTS.value, _CONFIG.value)
    variants = {name: (config_lib.model_config_from(c, bench.VOCAB), c.train) for name, c in configs.items()}
    result = {'env': bench.environment(),
              'variants': bench.train_side_by_side(variants, _ROUNDS.value, _STEPS.value)}
    env = result['env']
    first = next(iter(configs))
    print(f'JAX {env["jax"]} on {env["backend"]} ({env["device"]}, {env["cpu_count"]} cores); '
          f'{flags.FLAGS["config"].config_filename}, best of {_ROUNDS.value} rounds of {_STEPS.value} steps')
    print(f'{"variant":<16} {"ms/step":>9} {"vs " + first:>10} {"tokens/s":>9} {"GFLOP":>8} {"GB":>7} '
          f'{"compile s":>9}')
    for name, r in result['variants'].items():
      print(f'{name:<16} {r["ms_per_step"]:>9.1f} {r["vs_first"]:>9.3f}x {r["tokens_per_s"]:>9,.0f} '
            f'{r["gflop"]:>8.2f} {r["gb_accessed"]:>7.3f} {r["compile_s"]:>9.1f}')
    print('BENCH_JSON ' + json.dumps(result, sort_keys=True))

  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
