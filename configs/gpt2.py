"""GPT-2's real shapes, to fine-tune OpenAI's weights on TinyShakespeare (as nanoGPT's finetune).

    python scripts/train.py --config configs/gpt2.py:gpt2 --config.init_from=/path/to/hf/gpt2
    python scripts/train.py --config configs/gpt2.py:gpt2-xl --config.init_from=/path/to/hf/gpt2-xl

Presets (n_layer / n_head / n_embd; all with vocab 50257, block 1024, biases, tanh GELU):
  gpt2         12 / 12 /  768   124M parameters
  gpt2-medium  24 / 16 / 1024   350M
  gpt2-large   36 / 20 / 1280   774M
  gpt2-xl      48 / 25 / 1600   1558M

`init_from` is '' (train these shapes from scratch) or a local Hugging Face GPT-2 directory
(config.json + model.safetensors) whose weights start the run; nothing is downloaded at run time
(see gpt_jax/hf.py for how to get the files). The data is TinyShakespeare in GPT-2's BPE, prepared
as for configs/shakespeare_bpe.py (encoder.json + vocab.bpe from data.gpt2_dir or the cache), with
the unpadded 50257-row vocabulary of the weights. The training recipe is nanoGPT's
finetune_shakespeare: batch 1 x 32 accumulation steps of 1024 tokens, 20 steps at a constant 3e-5,
no dropout. Every other field is the same as configs/shakespeare.py, which this file builds on.
"""

import os

import ml_collections

from gpt_jax.config import load_config_file

PRESETS = {  # name: (n_layer, n_head, n_embd)
    'gpt2': (12, 12, 768),
    'gpt2-medium': (24, 16, 1024),
    'gpt2-large': (36, 20, 1280),
    'gpt2-xl': (48, 25, 1600),
}


def _shakespeare_config() -> ml_collections.ConfigDict:
  """configs/shakespeare.py's default config."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'))


def get_config(preset: str = 'gpt2') -> ml_collections.ConfigDict:
  """Returns the run config for a GPT-2 size ('' = 'gpt2', the 124M model)."""
  preset = preset or 'gpt2'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: use one of {", ".join(PRESETS)}')
  n_layer, n_head, n_embd = PRESETS[preset]

  c = _shakespeare_config()
  c.out_dir = f'out/shakespeare_{preset}'

  c.model.update(
      n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024,
      vocab_size=50257,        # GPT-2's BPE vocabulary (not padded: the weights have 50257 rows).
      dropout=0.0,             # nanoGPT fine-tunes without dropout.
      bias=True,               # GPT-2 has biases in every Linear and LayerNorm.
      gelu_approximate=True,   # GPT-2 was trained with the tanh GELU (HF's 'gelu_new').
  )
  c.data.update(tokenizer='gpt2', data_dir='data/shakespeare_gpt2')

  # nanoGPT's config/finetune_shakespeare.py: 32 x 1 x 1024 tokens per step, 20 steps, lr 3e-5
  # constant (decay_lr=False: here warmup 0 and min = max), evaluated every 5 steps.
  c.train.update(
      batch_size=1, grad_accum_steps=32, max_steps=20,
      learning_rate=3e-5, min_learning_rate=3e-5, warmup_steps=0, lr_decay_steps=20,
      beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0,
      eval_interval=5, eval_iters=40, log_interval=1,
  )
  c.sample.update(eval_tokens=0)  # Sampling 1558M parameters at every eval is slow on a CPU.
  return c
