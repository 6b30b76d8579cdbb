"""GPT-2's real shapes, to fine-tune OpenAI's weights on TinyShakespeare (as nanoGPT's finetune).

    python scripts/train.py --config configs/gpt2.py:gpt2 --config.init_from=/path/to/hf/gpt2
    python scripts/train.py --config configs/gpt2.py:gpt2-xl --config.init_from=/path/to/hf/gpt2-xl

Presets (n_layer / n_head / n_embd; all with vocab 50257, block 1024, biases, tanh GELU):
  gpt2         12 / 12 /  768   124M parameters
  gpt2-medium  24 / 16 / 1024   350M
  gpt2-large   36 / 20 / 1280   774M
  gpt2-xl      48 / 25 / 1600   1558M
  gpt2_gpu     gpt2 on one GPU: bf16, cuDNN attention, the 32 x 1024 tokens of a step as one batch

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

from gpt_jax.config_files import load_config_file, preset_config, with_overrides


def base() -> ml_collections.ConfigDict:
  """configs/shakespeare.py's recipe with GPT-2 (124M) and nanoGPT's finetune_shakespeare training."""
  shakespeare = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'))
  return with_overrides(shakespeare, {
      'out_dir': 'out/shakespeare_gpt2',
      'model.n_layer': 12, 'model.n_head': 12, 'model.n_embd': 768, 'model.block_size': 1024,
      'model.vocab_size': 50257,      # GPT-2's BPE vocabulary (not padded: the weights have 50257 rows).
      'model.dropout': 0.0,           # nanoGPT fine-tunes without dropout.
      'model.bias': True,             # GPT-2 has biases in every Linear and LayerNorm.
      'model.gelu_approximate': True,  # GPT-2 was trained with the tanh GELU (HF's 'gelu_new').
      'data.tokenizer': 'gpt2', 'data.data_dir': 'data/shakespeare_gpt2',
      # nanoGPT's config/finetune_shakespeare.py: 32 x 1 x 1024 tokens per step, 20 steps, lr 3e-5
      # constant (decay_lr=False: here warmup 0 and min = max), evaluated every 5 steps.
      'train.batch_size': 1, 'train.grad_accum_steps': 32, 'train.max_steps': 20,
      'train.learning_rate': 3e-5, 'train.min_learning_rate': 3e-5, 'train.warmup_steps': 0,
      'train.lr_decay_steps': 20, 'train.beta2': 0.95,
      'train.eval_interval': 5, 'train.eval_iters': 40, 'train.log_interval': 1,
      'sample.eval_tokens': 0,        # Sampling 1558M parameters at every eval is slow on a CPU.
  })


PRESETS = {  # The other sizes change only the shape (and their out_dir).
    '': {},
    'gpt2': {},
    'gpt2-medium': {'model.n_layer': 24, 'model.n_head': 16, 'model.n_embd': 1024,
                    'out_dir': 'out/shakespeare_gpt2-medium'},
    'gpt2-large': {'model.n_layer': 36, 'model.n_head': 20, 'model.n_embd': 1280,
                   'out_dir': 'out/shakespeare_gpt2-large'},
    'gpt2-xl': {'model.n_layer': 48, 'model.n_head': 25, 'model.n_embd': 1600,
                'out_dir': 'out/shakespeare_gpt2-xl'},
    # The 124M model's fastest one-GPU step as expected, for scripts/gpu_check.py's step_gpt2_best
    # sweep to confirm (docs/gpu.md): bf16 matmuls, cuDNN attention (no dropout to need the written-out
    # softmax), and the recipe's 32 rows of 1024 tokens per step as one batch instead of 32 accumulated.
    'gpt2_gpu': {'out_dir': 'out/shakespeare_gpt2_gpu', 'model.dtype': 'bfloat16', 'model.attention': 'auto',
                 'train.batch_size': 32, 'train.grad_accum_steps': 1},
}


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """The run config of a GPT-2 size ('' = 'gpt2', the 124M model)."""
  return preset_config(base, PRESETS, preset)
