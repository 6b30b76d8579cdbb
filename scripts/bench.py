"""Speed and memory of training and generation, optionally side by side with PyTorch.

  python scripts/bench.py --vs_torch                 # everything the performance section reports
  python scripts/bench.py --settings baby --steps 50 --no_generate
  python scripts/bench.py --settings char --dtype bfloat16 --no_generate
  python scripts/bench.py --config configs/shakespeare.py:speedrun_gpt2 --config.model.position=rotary --no_generate

Train: the project's jitted train_step (on-device batch, AdamW, clipping) on the 'baby' (nanoGPT's
CPU config) and 'char' (shakespeare_char) settings: ms/step, tokens/s, model TFLOP/s, MFU against a
measured float32 matmul, XLA compile time, first step, peak RSS. Generation: the jitted KV-cache loop,
500 new tokens at batch 1, 8, 64 with the 'char' model. --vs_torch runs the project's PyTorch
reference (gpt_jax/lab/torch_ref.py: nanoGPT-style eager model, AdamW, no-cache generate) in this same
process, so each ratio compares two runs on the same machine under the same load.
Prints one table and a final line `BENCH_JSON {...}` with every figure.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

_SETTINGS = flags.DEFINE_string('settings', 'baby,char', 'Comma-separated: baby, char (tiny: tests).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Timed steps per round (0: 40 baby, 2 char).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', "Compute dtype of the JAX model ('bfloat16').")
_CONFIG = cli.define_config_file(
    'config', None,
    'Instead of --settings: time the train step of a run config, PATH[:PRESET] (its model, batch size '
    "and optimizer; the vocabulary is TinyShakespeare's). Override fields with --config.KEY=VALUE.")
_VS_TORCH = flags.DEFINE_boolean('vs_torch', False, 'Also time the PyTorch reference.')
_NO_GENERATE = flags.DEFINE_boolean('no_generate', False, 'Skip the generation benchmark.')
_GEN_SETTING = flags.DEFINE_string('gen_setting', 'char', 'Model used for generation.')
_GEN_BATCHES = flags.DEFINE_string('gen_batches', '1,8,64', 'Batch sizes for KV-cache generation.')
_GEN_TOKENS = flags.DEFINE_integer('gen_tokens', 500, 'New tokens per generation.')
_TORCH_GEN_BATCHES = flags.DEFINE_string('torch_gen_batches', '1',
                                         'Batch sizes for PyTorch no-cache generate.')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax import config as config_lib
  from gpt_jax.config_files import load_config_file
  from gpt_jax.errors import UserError
  from gpt_jax.lab import bench  # Imported after flag parsing so --help is instant.
  # nanoGPT's shakespeare_char optimizer settings (the speed does not depend on them).
  train_cfg = load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                            'shakespeare.py')).train

  def run() -> None:
    result = {'env': bench.environment(), 'matmul_peak_tflops': bench.matmul_peak_tflops(),
              'train': {}, 'generate': {}}
    peak = result['matmul_peak_tflops']
    rows = []
    if _CONFIG.value is not None:  # One run config: its model, batch and optimizer.
      run_config = _CONFIG.value
      cfg = config_lib.model_config_from(run_config, bench.VOCAB)
      todo = [(flags.FLAGS['config'].config_filename, cfg, int(run_config.train.batch_size),
               run_config.train)]
      muon = run_config.train.optimizer == 'muon'
      if _VS_TORCH.value and (cfg.non_gpt2_options() or muon):
        raise UserError('--vs_torch: the PyTorch reference is GPT-2 with AdamW; this config uses '
                        + ', '.join(cfg.non_gpt2_options() + ['Muon'] * muon)
                        + '. Time it without --vs_torch.')
    else:
      todo = [(name, *bench.setting(name, _DTYPE.value), train_cfg)
              for name in filter(None, _SETTINGS.value.split(','))]
    for name, cfg, batch, tcfg in todo:
      steps = _STEPS.value or (2 if cfg.block_size * batch >= 8192 else 40)
      r = {'jax': bench.jax_train(cfg, tcfg, batch, steps)}
      r['jax']['mfu'] = r['jax']['model_tflops'] / peak
      if _VS_TORCH.value:
        r['torch'] = bench.torch_train(cfg, tcfg, batch, steps)
        r['speedup'] = r['torch']['ms_per_step'] / r['jax']['ms_per_step']
      result['train'][name] = r
      j = r['jax']
      rows.append((f'train {name} ({cfg.n_layer}/{cfg.n_head}/{cfg.n_embd}, T={cfg.block_size}, '
                   f'B={batch}, dropout {cfg.dropout}, {cfg.dtype}'
                   + ''.join(f', {o}' for o in cfg.non_gpt2_options())
                   + (', Muon' if tcfg.optimizer == 'muon' else '') + ')',
                   f'{j["ms_per_step"]:.1f} ms/step', r.get('torch', {}).get('ms_per_step'),
                   r.get('speedup'),
                   f'compile {j["compile_s"]:.1f}s, 1st step {j["first_step_s"]:.1f}s, '
                   f'MFU {100 * j["mfu"]:.0f}%, RSS {j["peak_rss_mb"]:.0f} MB'))
    if not _NO_GENERATE.value:
      cfg, _ = bench.setting(_GEN_SETTING.value, _DTYPE.value)
      torch_batches = {int(b) for b in _TORCH_GEN_BATCHES.value.split(',') if b}
      # Batch 1 reads every weight once per token: bytes / streaming rate bounds its tokens/s.
      gbs = bench.weight_stream_gbs(cfg)
      result['generate']['weight_stream_gbs'] = gbs
      result['generate']['batch1_ceiling_tok_s'] = ceiling = gbs * 1e9 / bench.weight_bytes(cfg)
      for b in (int(b) for b in _GEN_BATCHES.value.split(',') if b):
        g = {'jax': bench.jax_generate(cfg, b, _GEN_TOKENS.value)}
        if _VS_TORCH.value and b in torch_batches:
          g['torch'] = bench.torch_generate(cfg, b, _GEN_TOKENS.value)
          g['speedup'] = g['jax']['tokens_per_s'] / g['torch']['tokens_per_s']
        result['generate'][f'batch_{b}'] = g
        bound = ''
        if b == 1:
          bound = f', weight-streaming ceiling {ceiling:,.0f} tok/s ({gbs:.0f} GB/s)'
          if 'torch' in g:
            bound += f' = {ceiling / g["torch"]["tokens_per_s"]:.1f}x PyTorch'
        rows.append((f'generate {_GEN_SETTING.value}, batch {b}, {_GEN_TOKENS.value} new tokens',
                     f'{g["jax"]["tokens_per_s"]:,.0f} tok/s',
                     g.get('torch', {}).get('tokens_per_s'), g.get('speedup'),
                     f'first call (compile + run) {g["jax"]["first_call_s"]:.1f}s, '
                     f'RSS {g["jax"]["peak_rss_mb"]:.0f} MB{bound}'))

    env = result['env']
    print(f'JAX {env["jax"]} on {env["backend"]} ({env["device"]}, {env["cpu_count"]} cores)'
          + (f', PyTorch {env["torch"]}' if 'torch' in env else '')
          + f'; float32 matmul peak {peak:.2f} TFLOP/s')
    print(f'{"benchmark":<68} {"gpt_jax":>16} {"PyTorch":>16} {"ratio":>7}  notes')
    for what, ours, theirs, ratio, notes in rows:
      unit = ' ms/step' if 'ms/step' in ours else ' tok/s'
      t = '-' if theirs is None else (f'{theirs:.1f}{unit}' if unit == ' ms/step' else f'{theirs:,.1f}{unit}')
      print(f'{what:<68} {ours:>16} {t:>16} {"-" if ratio is None else f"{ratio:.2f}x":>7}  {notes}')
    print('BENCH_JSON ' + json.dumps(result, sort_keys=True))

  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
