"""Character-level GPT on TinyShakespeare: `base()` is nanoGPT's `shakespeare_char` recipe.

    python scripts/train.py --config configs/shakespeare.py          # nanoGPT's shakespeare_char (GPU)
    python scripts/train.py --config configs/shakespeare.py:cpu --config.train.max_steps=500

The recipe: 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2, lr 1e-3 -> 1e-4 over 5000
steps, warmup 100, beta2 0.99 (val loss ~1.47 on a GPU, hours on a CPU). Each preset in PRESETS lists
only the fields it changes (docs/configuration.md; the speedrun presets' runs: docs/speedrun.md).
"""

import dataclasses

import ml_collections

from gpt_jax.config import ModelConfig, SampleConfig
from gpt_jax.config_files import preset_config

ConfigDict = ml_collections.ConfigDict


def base() -> ml_collections.ConfigDict:
  """nanoGPT's shakespeare_char recipe. Model and sample fields: see ModelConfig and SampleConfig."""
  return ConfigDict(dict(
      out_dir='out/shakespeare_char',
      init_from='',              # '' = GPT-2 init; else a local Hugging Face GPT-2 directory to fine-tune.
      model=ConfigDict(dict(dataclasses.asdict(ModelConfig()), vocab_size=0)),  # 0 = from the data.
      data=ConfigDict(dict(
          text_path='',          # A local text file or folder; '' = the copy shipped with gpt_jax.
          url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
          sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
          cache_dir='~/.cache/gpt_jax',
          data_dir='data/shakespeare_char',  # Where train.bin / val.bin / meta.json are written.
          tokenizer='char',      # 'char', 'gpt2' (GPT-2's BPE) or 'bpe' (trained on the train split).
          gpt2_dir='',           # tokenizer='gpt2': folder with encoder.json + vocab.bpe; '' = shipped copy.
          bpe_vocab_size=0,      # tokenizer='bpe': vocabulary size to train (e.g. 1024).
          val_fraction=0.1,      # The last 10% of the text is the val split.
          shards_dir='',         # '' = in-memory splits; else token shards here (gpt_jax/data/shards.py).
          shard_tokens=1 << 24,  # shards_dir: tokens per shard file when preparing (16M = 32 MB).
      )),
      train=ConfigDict(dict(
          batch_size=64,         # Sequences per micro-batch (per optimizer step: x grad_accum_steps).
          grad_accum_steps=1, max_steps=5000,
          steps_per_call=1,      # Train steps per jitted call: > 1 dispatches less (docs/gpu.md).
          learning_rate=1e-3, min_learning_rate=1e-4,  # Peak, and the floor the schedule decays to.
          warmup_steps=100, lr_decay_steps=5000, beta1=0.9, beta2=0.99, weight_decay=0.1,
          grad_clip=1.0,         # Global-norm clip of the gradients; 0 = none.
          optimizer='adamw',     # 'adamw' (optax), 'adamw_by_hand', 'muon' (block matrices; AdamW the rest).
          lr_schedule='cosine',  # 'cosine' (nanoGPT) or 'wsd': constant peak, 1-sqrt cooldown (any length).
          cooldown_fraction=0.2,  # wsd: cooldown over this last part of lr_decay_steps (Hagele et al.).
          muon_learning_rate=0.02,  # muon: peak lr of the block matrices, on learning_rate's schedule.
          muon_momentum=0.95,    # muon: Nesterov momentum of the matrices before orthogonalisation.
          muon_ns_steps=5,       # muon: Newton-Schulz iterations per update (fewer: cheaper, rougher).
          muon_weight_decay=0.0,  # muon: decoupled decay of the matrices (x muon lr); 0 as modded-nanogpt.
          muon_batched=False,    # muon: each shape's matrices as one batch (same update; faster on a CPU).
          ema_decay=0.0,         # > 0: evals and the kept checkpoint use an EMA of the weights (opt state).
          seed=1337, eval_interval=250, eval_iters=200, log_interval=10, resume=False,
          eval_at_start=True,    # Evaluate before step 1 (nanoGPT); False spares a speedrun a known answer.
          val_full_pass=False,   # True: evals' val loss is a full pass (every val token once, no noise).
          resume_from_last_good=False,  # Skip a damaged newest checkpoint (moved aside, never deleted).
          peak_flops=0.0,        # For the MFU estimate; 0 = look up the device or measure a matmul.
          layer_stats_interval=0,  # Every N steps log per-layer statistics (0 = off); see scripts/plot.py.
          tensorboard=False,     # Also write TensorBoard event files to out_dir/tensorboard (tensorboardX).
          target_val_loss=0.0,   # > 0: report when an eval's val loss first reaches it (time to target).
          compilation_cache_dir='',  # JAX's persistent compilation cache for every program; '' = not set.
      )),
      # Device mesh (gpt_jax/parallel/mesh.py): `data` splits the batch (parameters replicated), `fsdp`
      # the batch *and* the parameters and optimizer state; -1 = all the remaining devices.
      mesh=ConfigDict(dict(data=-1, fsdp=1)),
      distributed=ConfigDict(dict(  # Multi-process runs (gpt_jax/parallel/distributed.py; docs/gpu.md).
          coordinator_address='',  # HOST:PORT of process 0; '' = JAX_COORDINATOR_ADDRESS or auto-detect.
          num_processes=0,       # 0 = JAX_NUM_PROCESSES, a launcher's (Slurm, MPI, TPU), or 1 process.
          process_id=-1,         # -1 = JAX_PROCESS_ID or the launcher's.
          local_device_ids='',   # This process's GPUs ('0,1'); '' = JAX_LOCAL_DEVICE_IDS, launcher's or all.
      )),
      checkpoint=ConfigDict(dict(
          save='best',           # 'best': when val loss improves (nanoGPT); 'always': every eval.
          keep_last=2, async_save=True,  # The newest 2 kept beside the best; written in the background.
      )),
      sample=ConfigDict(dataclasses.asdict(SampleConfig())),
  ))


PRESETS = {
    '': {},
    # One NVIDIA GPU: bf16 matmuls; attention dropout in the Pallas flash kernel, cuDNN in evals (docs/gpu.md).
    'gpu': {'out_dir': 'out/shakespeare_char_gpu', 'model.dtype': 'bfloat16', 'model.attention': 'auto',
            'train.target_val_loss': 1.47,
            'train.compilation_cache_dir': '~/.cache/gpt_jax/jax_compilation_cache'},  # A rerun compiles nothing.
    'speedrun': {  # Record 4: val loss <= 1.47 in the fewest CPU steps found, every lever on.
        'out_dir': 'out/shakespeare_char_speedrun',
        'model.n_head': 4, 'model.n_embd': 256, 'model.dropout': 0.0, 'model.position': 'rotary',
        'model.qk_norm': True, 'model.activation': 'relu2', 'model.zero_init_proj': True,
        'train.batch_size': 16, 'train.learning_rate': 1.5e-3, 'train.min_learning_rate': 1.5e-4,
        'train.optimizer': 'muon', 'train.muon_batched': True, 'train.lr_schedule': 'wsd',
        'train.cooldown_fraction': 0.5, 'train.ema_decay': 0.99, 'train.max_steps': 700,
        'train.lr_decay_steps': 700, 'train.eval_interval': 700, 'train.eval_at_start': False,
        'train.eval_iters': 5, 'train.val_full_pass': True, 'train.log_interval': 50,
        'train.target_val_loss': 1.47, 'sample.eval_tokens': 0,
    },
    'gpu_speedrun': {  # The speedrun levers on one GPU: bf16, cuDNN attention, batch 64 (docs/gpu.md).
        'out_dir': 'out/shakespeare_char_gpu_speedrun', 'model.dtype': 'bfloat16', 'model.attention': 'auto',
        'model.n_head': 4, 'model.n_embd': 256, 'model.dropout': 0.0, 'model.position': 'rotary',
        'model.qk_norm': True, 'model.activation': 'relu2', 'model.zero_init_proj': True,
        'train.batch_size': 64, 'train.learning_rate': 1.5e-3, 'train.min_learning_rate': 1.5e-4,
        'train.optimizer': 'muon', 'train.muon_batched': True, 'train.lr_schedule': 'wsd',
        'train.cooldown_fraction': 0.5, 'train.ema_decay': 0.99, 'train.max_steps': 300,
        'train.lr_decay_steps': 300, 'train.eval_interval': 300, 'train.eval_at_start': False,
        'train.eval_iters': 5, 'train.val_full_pass': True, 'train.log_interval': 50,
        'train.target_val_loss': 1.47, 'sample.eval_tokens': 0, 'train.steps_per_call': 10,
        'train.compilation_cache_dir': '~/.cache/gpt_jax/jax_compilation_cache'},
    'speedrun_gpt2': {  # Record 1: the same target with GPT-2 and AdamW, sized to a CPU hour.
        'out_dir': 'out/shakespeare_char_speedrun_gpt2',
        'model.n_head': 4, 'model.n_embd': 256, 'model.dropout': 0.1,
        'train.batch_size': 16, 'train.learning_rate': 1.5e-3, 'train.min_learning_rate': 1.5e-4,
        'train.max_steps': 5600, 'train.lr_decay_steps': 5600, 'train.eval_interval': 500,
        'train.eval_iters': 40, 'train.log_interval': 50, 'train.target_val_loss': 1.47,
    },
    'cpu': {  # nanoGPT's small CPU model, trained 3.5x longer at twice the lr.
        'out_dir': 'out/shakespeare_char_cpu',
        'model.n_layer': 4, 'model.n_head': 4, 'model.n_embd': 128, 'model.block_size': 64,
        'model.dropout': 0.0, 'train.batch_size': 12, 'train.learning_rate': 2e-3,
        'train.min_learning_rate': 2e-4, 'train.max_steps': 7000, 'train.lr_decay_steps': 7000,
        'train.eval_interval': 500, 'train.eval_iters': 50, 'train.log_interval': 100,
    },
    'nanogpt_cpu': {  # nanoGPT's own CPU recipe, as its README gives it; no samples.
        'out_dir': 'out/shakespeare_char_nanogpt_cpu',
        'model.n_layer': 4, 'model.n_head': 4, 'model.n_embd': 128, 'model.block_size': 64,
        'model.dropout': 0.0, 'train.batch_size': 12, 'train.max_steps': 2000,
        'train.lr_decay_steps': 2000, 'train.eval_iters': 20, 'train.log_interval': 100,
        'sample.eval_tokens': 0,
    },
    'tiny': {  # A toy model that trains in seconds; used by the test-suite.
        'out_dir': 'out/shakespeare_char_tiny',
        'model.n_layer': 2, 'model.n_head': 2, 'model.n_embd': 32, 'model.block_size': 32,
        'model.dropout': 0.0, 'train.batch_size': 8, 'train.max_steps': 50, 'train.lr_decay_steps': 50,
        'train.warmup_steps': 5, 'train.eval_interval': 25, 'train.eval_iters': 4,
        'sample.eval_tokens': 32, 'sample.max_new_tokens': 64,
    },
}


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """The run config of `preset` ('' = nanoGPT's shakespeare_char recipe)."""
  return preset_config(base, PRESETS, preset)
