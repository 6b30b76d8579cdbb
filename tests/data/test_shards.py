"""Sharded token datasets: streaming writer, checksums, deterministic per-process memmap batches,
and training from them (train/val splits, exact resume, 4 simulated devices against 1).

The 4-device half runs this very file as a subprocess (`python tests/data/test_shards.py SPEC.json`,
with tests/multidevice.py's helpers).
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc

# Also run as a script: tests/ (conftest, multidevice) and the checkout (gpt_jax) must be importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt_jax.data import batches as batches_lib, shards, text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import loop as loop_lib

from conftest import REPO, make_synthetic_text


@pytest.fixture
def corpus(tmp_path):
  """A folder of text files (nested, one non-.txt file that must be ignored), ~60k characters."""
  root = tmp_path / 'corpus'
  (root / 'b').mkdir(parents=True)
  for i, rel in enumerate(['a1.txt', 'a2.txt', 'b/b1.txt', 'b/b2.txt', 'c.txt']):
    text = make_synthetic_text(12_000, seed=i) + ('é ✓\n' if i == 2 else '')  # Multi-byte chars.
    (root / rel).write_text(text, encoding='utf-8')
  (root / 'notes.md').write_text('not part of the corpus', encoding='utf-8')
  return root


def _stream(out_dir, index):
  return np.concatenate([np.fromfile(os.path.join(out_dir, s['file']), np.uint16)
                         for s in index['shards']])


def test_shards_hold_the_corpus_exactly(corpus, tmp_path):
  out = tmp_path / 'shards'
  # Small chunks and shards, so that chunk edges fall inside multi-byte characters' neighbourhood
  # and the stream spans many shard files.
  index = shards.write_shards(str(corpus), str(out), 'char', shard_tokens=7_000, chunk_chars=777,
                              verbose=False)
  text = text_lib.read_text(str(corpus))  # The same files, order and separators as data.py.
  tok = shards.ShardedTokens(str(out)).tokenizer
  assert tok.chars == sorted(set(text))
  assert tok.decode(_stream(out, index)) == text
  assert index['total_tokens'] == len(text) == index['chars']
  assert [s['tokens'] for s in index['shards'][:-1]] == [7_000] * (len(index['shards']) - 1)
  assert 0 < index['shards'][-1]['tokens'] <= 7_000
  assert sorted(os.listdir(out)) == sorted([s['file'] for s in index['shards']] + ['index.json'])
  for s in index['shards']:
    assert hashlib.sha256((out / s['file']).read_bytes()).hexdigest() == s['sha256']
  assert index['source_files'] == ['a1.txt', 'a2.txt', 'b/b1.txt', 'b/b2.txt', 'c.txt']
  assert index['source_sha256'] == text_lib.source_sha256(text_lib.source_files(str(corpus)))


def test_writer_memory_stays_flat(tmp_path):
  """Peak allocations do not grow with the corpus: 2 MB and 4 MB of text need the same, and far less
  than the text itself (one chunk of text and one shard buffer)."""
  block = make_synthetic_text(200_000, seed=1)
  peaks = []
  for n_files in (10, 20):
    root = tmp_path / f'corpus{n_files}'
    root.mkdir()
    for i in range(n_files):
      (root / f'part{i:02d}.txt').write_text(block, encoding='utf-8')
    tracemalloc.start()
    try:
      index = shards.write_shards(str(root), str(tmp_path / f'out{n_files}'), 'char',
                                  shard_tokens=1 << 17, chunk_chars=1 << 15, verbose=False)
      peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    assert index['total_tokens'] > n_files * 200_000
  assert peaks[1] < 1.1 * peaks[0] + 100_000, peaks
  assert peaks[1] < 2_000_000, peaks  # The 4 MB corpus as one str alone would be > 4 MB.


def test_subword_tokenizer_object(corpus, tmp_path):
  from gpt_jax.data import bpe
  text = text_lib.read_text(str(corpus))
  tok = bpe.train_bpe(text[:20_000], 300, progress=False)
  index = shards.write_shards(str(corpus), str(tmp_path / 's'), tok, shard_tokens=5_000,
                              chunk_chars=1_000, verbose=False)
  loaded = shards.ShardedTokens(str(tmp_path / 's')).tokenizer
  assert loaded.to_dict() == tok.to_dict()
  assert loaded.decode(_stream(tmp_path / 's', index).tolist()) == text  # Lossless, chunk by chunk.
  assert index['total_tokens'] < len(text)  # It really is a subword vocabulary.


@pytest.fixture
def dataset(corpus, tmp_path):
  out = tmp_path / 'shards'
  shards.write_shards(str(corpus), str(out), 'char', shard_tokens=5_000, chunk_chars=4_096,
                      verbose=False)
  return out


def test_batches_are_windows_of_the_stream_and_a_pure_function_of_seed_and_step(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=7)
  stream = _stream(dataset, ds.index).astype(np.int32)
  x, y = ds.host_batch(3, 16, 32)
  assert x.shape == y.shape == (16, 32) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  shard, offset = ds.windows(3, 16, 32)
  starts = np.concatenate([[0], np.cumsum(ds.sizes)])[shard] + offset
  for row, s in zip(range(16), starts):
    np.testing.assert_array_equal(x[row], stream[s:s + 32])
    np.testing.assert_array_equal(y[row], stream[s + 1:s + 33])
  assert np.all(offset + 33 <= ds.sizes[shard])  # Windows never cross a shard boundary.

  # Resumption: a fresh loader (a restarted run) gives the same batch for the same step ...
  again = shards.ShardedTokens(str(dataset), seed=7)
  for step in (0, 3, 1000):
    np.testing.assert_array_equal(again.host_batch(step, 16, 32)[0], ds.host_batch(step, 16, 32)[0])
  # ... and other steps / seeds give other batches.
  assert not np.array_equal(ds.host_batch(4, 16, 32)[0], x)
  assert not np.array_equal(shards.ShardedTokens(str(dataset), seed=8).host_batch(3, 16, 32)[0], x)


def test_processes_read_disjoint_rows_of_one_global_batch(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=1, verify=False)
  whole = ds.host_batch(5, 12, 16, process_index=0, process_count=1)[0]
  parts = [ds.host_batch(5, 12, 16, process_index=p, process_count=3)[0] for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(UserError, match='does not split over 5 processes'):
    ds.host_batch(5, 12, 16, process_index=0, process_count=5)


def test_global_batch_is_a_sharded_jax_array(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=1)
  mesh = mesh_lib.make_mesh(None)
  x, y = ds.global_batch(2, 8, 16, mesh_lib.batch_sharding(mesh))
  assert isinstance(x, jax.Array) and x.shape == (8, 16)
  assert x.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(x), ds.host_batch(2, 8, 16)[0])
  np.testing.assert_array_equal(np.asarray(y), ds.host_batch(2, 8, 16)[1])


def test_process_rows_follow_the_sharding():
  mesh = mesh_lib.make_mesh(None)
  assert shards.process_rows(mesh_lib.batch_sharding(mesh), (8, 4)).tolist() == list(range(8))
  assert shards.process_rows(NamedSharding(mesh, P()), (6, 4)).tolist() == list(range(6))


def test_damaged_truncated_or_missing_shards_are_detected(dataset):
  index = json.loads((dataset / 'index.json').read_text())
  name = index['shards'][1]['file']
  path = dataset / name
  good = path.read_bytes()

  damaged = bytearray(good)
  damaged[100] ^= 0x01  # One flipped bit, size unchanged.
  path.write_bytes(bytes(damaged))
  with pytest.raises(UserError, match=f'{name} .*damaged.*SHA-256'):
    shards.ShardedTokens(str(dataset))
  shards.ShardedTokens(str(dataset), verify=False)  # The size check alone cannot see a flipped bit.

  path.write_bytes(good[:-2])
  with pytest.raises(UserError, match=f'{name} .*truncated'):
    shards.ShardedTokens(str(dataset), verify=False)
  path.unlink()
  with pytest.raises(UserError, match=f'{name} .*missing'):
    shards.ShardedTokens(str(dataset), verify=False)
  path.write_bytes(good)
  shards.ShardedTokens(str(dataset))  # Restored: fine again.

  (dataset / 'index.json').unlink()  # An interrupted writer leaves no index.
  with pytest.raises(UserError, match='index.json is missing'):
    shards.ShardedTokens(str(dataset))


def test_existing_output_is_not_overwritten_silently(corpus, dataset):
  with pytest.raises(UserError, match='already holds a sharded dataset.*overwrite'):
    shards.write_shards(str(corpus), str(dataset), verbose=False)
  before = sorted(os.listdir(dataset))
  index = shards.write_shards(str(corpus), str(dataset), shard_tokens=50_000, overwrite=True,
                              verbose=False)
  assert len(index['shards']) < len(before) - 1  # Fewer, bigger shards; the old ones are gone.
  assert sorted(os.listdir(dataset)) == sorted([s['file'] for s in index['shards']] + ['index.json'])


@pytest.mark.slow
def test_prepare_shards_script(corpus, tmp_path):
  out = tmp_path / 'script_shards'
  run = lambda *a: subprocess.run([sys.executable, str(REPO / 'scripts' / 'prepare_shards.py'), *a],
                                  capture_output=True, text=True, timeout=600)
  r = run(f'--source={corpus}', f'--out_dir={out}', '--shard_tokens=25000')
  assert r.returncode == 0, r.stderr
  assert 'wrote 3 shard(s)' in r.stdout
  r = run(f'--check={out}')
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr
  r = run(f'--source={corpus}', f'--out_dir={out}')
  assert r.returncode == 1 and r.stderr.startswith('error: ') and 'overwrite' in r.stderr


# --- training from shards -------------------------------------------------------------------------

def shard_config(root, corpus, mesh=(-1, 1)):
  """A 1-layer model trained from the shards of `corpus` in root/shards (prepared on first use)."""
  from configs import shakespeare
  root = str(root)
  c = shakespeare.get_config('tiny')
  c.out_dir = os.path.join(root, 'out')
  c.data.update(text_path=str(corpus), data_dir=os.path.join(root, 'data'),
                cache_dir=os.path.join(root, 'cache'), shards_dir=os.path.join(root, 'shards'),
                shard_tokens=5_000)
  c.model.update(n_layer=1, n_head=2, n_embd=32, block_size=16)
  c.train.update(max_steps=30, eval_interval=15, log_interval=1, peak_flops=1e12)
  c.checkpoint.update(save='always', async_save=False)
  c.sample.eval_tokens = 0
  c.mesh.update(data=mesh[0], fsdp=mesh[1])
  return c


def test_splits_are_the_in_memory_splits(corpus, tmp_path):
  """With the char tokenizer, the train/val shards hold exactly data.py's train.bin / val.bin."""
  cfg = shard_config(tmp_path, corpus)
  indexes = shards.prepare(cfg.data, verbose=False)
  ds = text_lib.load(cfg.data, verbose=False)
  opened = shards.ShardedSplits(cfg.data.shards_dir)
  assert opened.tokenizer.to_dict() == ds.tokenizer.to_dict()
  for split in ('train', 'val'):
    np.testing.assert_array_equal(_stream(tmp_path / 'shards' / split, indexes[split]),
                                  np.asarray(getattr(ds, split)))
    assert indexes[split]['split'] == split
  assert len(indexes['train']['shards']) > 1  # Several shard files, windows drawn across them.
  assert indexes['train']['split_chars'][1] == indexes['val']['split_chars'][0] == ds.meta['train_chars']
  assert indexes['train']['settings'] == text_lib.tokenizer_settings(cfg.data)


@pytest.mark.slow
def test_host_fed_step_is_the_device_drawn_step():
  """train_step fed the very rows it would draw itself (ShardBatches' draw: the host's batch, the key
  unused) makes the resident-split update, with accumulation (2 micro-batches) and dropout (the same
  dropout keys)."""
  import jax.numpy as jnp

  from configs import shakespeare
  from gpt_jax import optim
  from gpt_jax.config import ModelConfig
  from gpt_jax.model import GPT
  from gpt_jax.training import step as step_lib
  model_cfg = ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
  train_cfg = shakespeare.get_config('tiny').train
  kw = dict(model=GPT(model_cfg), schedule=optim.lr_schedule(train_cfg), batch_size=4,
            grad_accum_steps=2)
  data = jnp.asarray(np.random.RandomState(0).randint(0, 20, 3000), jnp.uint16)
  state = step_lib.init_train_state(model_cfg, train_cfg)
  ref, m_ref = jax.jit(functools.partial(step_lib.train_step, **kw))(state, data)
  batch_key, _ = jax.random.split(jax.random.fold_in(state.key, state.step))
  x, y = batches_lib.get_batch(data, batch_key, 8, 16)
  host_fed = batches_lib.ShardBatches.draw  # Unbound: (self, inputs, key, rows) -> inputs.
  got, m_got = jax.jit(functools.partial(step_lib.train_step, draw=functools.partial(host_fed, None),
                                         **kw))(state, (x, y))
  np.testing.assert_allclose(float(m_got['loss']), float(m_ref['loss']), rtol=1e-6)
  np.testing.assert_allclose(float(m_got['grad_norm']), float(m_ref['grad_norm']), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_training_from_shards_learns_and_resumes_exactly(corpus, tmp_path):
  from gpt_jax import checkpoint as checkpoint_lib
  from gpt_jax.data import tokenizer as tokenizer_lib

  from multidevice import run_losses
  cfg = shard_config(tmp_path, corpus)
  cfg.model.dropout = 0.1  # The dropout key stream must continue too.
  cfg.train.grad_accum_steps = 2  # batch_size * 2 rows drawn per step, in two micro-batches.
  loop_lib.train_and_evaluate(cfg)  # Prepares root/shards first.
  straight = run_losses(cfg.out_dir)
  assert straight['val']['0'] > straight['val']['30'] + 0.3  # It learns.
  assert straight['train']['30'] < straight['train']['1'] - 0.3

  # The step-0 evals are of the initial parameters on the val shards' and the train shards' own
  # batches: a direct eval_step on each split gives the logged figures, and the two differ.
  from gpt_jax import config as config_lib
  from gpt_jax.model import GPT
  from gpt_jax.training import step as step_lib
  ds = shards.load(cfg.data, seed=cfg.train.seed, verbose=False)
  model_cfg = config_lib.model_config_from(cfg, ds.tokenizer.vocab_size)
  params = step_lib.init_train_state(model_cfg, cfg.train).params
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(cfg.mesh, jax.devices()))
  eval_seed = cfg.train.seed + (batches_lib.EVAL_KEY_SALT << 32)
  eval_step = jax.jit(functools.partial(step_lib.eval_step, model=GPT(model_cfg),
                                        batch_size=cfg.train.batch_size, draw=lambda b, key, rows: b))

  def direct(split):
    tokens = getattr(ds, split).with_seed(eval_seed)
    total = np.float32(0)
    for i in range(cfg.train.eval_iters):
      batch = tokens.global_batch(i, cfg.train.batch_size, model_cfg.block_size, sharding)
      total += np.float32(eval_step(params, batch, jax.random.PRNGKey(0)))
    return float(total / np.float32(cfg.train.eval_iters))

  val, train = direct('val'), direct('train')
  assert abs(val - train) > 1e-3  # Distinct batches, or the comparison below could not tell.
  assert abs(straight['val']['0'] - val) <= 1e-6

  # The same run as if it had stopped after its checkpoint at step 15, continued by a new run.
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(cfg.out_dir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '30')
  (resumed_dir / 'metrics.jsonl').unlink()  # So that only resumed steps are read.
  cfg.out_dir = str(resumed_dir)
  cfg.train.resume = True
  loop_lib.train_and_evaluate(cfg)
  resumed = run_losses(cfg.out_dir)
  assert sorted(resumed['train'], key=int) == [str(s) for s in range(16, 31)]
  for s in resumed['train']:
    assert abs(resumed['train'][s] - straight['train'][s]) <= 1e-6, s
  assert abs(resumed['val']['30'] - straight['val']['30']) <= 1e-6

  # The checkpoint records the tokenizer (from the shard index): sampling needs only the run dir.
  ckpt = checkpoint_lib.Checkpointer(str(resumed_dir / 'checkpoints'))
  meta = ckpt.meta(ckpt.latest_step())
  ckpt.close()
  index = shards.read_index(str(tmp_path / 'shards' / 'train'))
  assert meta['tokenizer'] == index['tokenizer']
  assert tokenizer_lib.tokenizer_from_dict(meta['tokenizer']).vocab_size == meta['model']['vocab_size']
  assert meta['data']['shards_dir'] == str(tmp_path / 'shards')


def test_bad_shards_dir_is_a_user_error(corpus, tmp_path):

  cfg = shard_config(tmp_path, corpus)
  shards_dir = tmp_path / 'shards'
  run = lambda: loop_lib.train_and_evaluate(cfg)

  shards_dir.write_text('not a folder')
  with pytest.raises(UserError, match='is a file'):
    run()
  shards_dir.unlink()
  shards_dir.mkdir()
  (shards_dir / 'notes.txt').write_text('someone else\'s folder')
  with pytest.raises(UserError, match=r'holds no sharded dataset.*prepare_data.py .*--force'):
    run()
  (shards_dir / 'notes.txt').unlink()
  shards.write_shards(str(corpus), str(shards_dir), verbose=False)  # One set, no train/val.
  with pytest.raises(UserError, match='single shard set'):
    run()
  shutil.rmtree(shards_dir)

  shards.prepare(cfg.data, verbose=False)
  (shards_dir / 'val' / 'index.json').unlink()  # An interrupted preparation.
  with pytest.raises(UserError, match=r'incomplete.*val/index.json missing.*prepare_data.py'):
    run()
  shards.prepare(cfg.data, force=True, verbose=False)
  shard = shards_dir / 'train' / 'shard_000001.bin'
  good = shard.read_bytes()
  shard.write_bytes(good[:10] + bytes([good[10] ^ 1]) + good[11:])
  with pytest.raises(UserError, match=r'shard_000001.bin .*damaged.*--force'):
    run()
  shard.write_bytes(good)
  cfg.model.block_size = 6_000  # Longer than every shard.
  with pytest.raises(UserError, match=r'at most 5,000 tokens each.*block_size = 6000'):
    run()
  cfg.model.block_size = 16
  cfg.data.val_fraction = 0.2
  with pytest.raises(UserError, match=r'other data settings \(val_fraction: 0.1 -> 0.2\).*--force'):
    run()
  cfg.data.update(val_fraction=0.1, tokenizer='bpe', bpe_vocab_size=300)
  with pytest.raises(UserError, match="'bpe' cannot be used with data.shards_dir"):
    run()


@pytest.mark.slow
def test_prepare_data_script_writes_shards_and_train_reports_errors(corpus, tmp_path):
  out = tmp_path / 'script_shards'
  run = lambda script, *a: subprocess.run(
      [sys.executable, str(REPO / 'scripts' / script), *a], capture_output=True, text=True,
      timeout=600, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  args = [f'--config.data.text_path={corpus}', f'--config.data.shards_dir={out}',
          '--config.data.shard_tokens=20000']
  r = run('prepare_data.py', *args)
  assert r.returncode == 0, r.stderr
  assert 'wrote' in r.stdout and 'train /' in r.stdout
  index = json.loads((out / 'train' / 'index.json').read_text())
  assert [s['tokens'] for s in index['shards']] == [20_000, 20_000, index['total_tokens'] - 40_000]
  assert json.loads((out / 'val' / 'index.json').read_text())['split'] == 'val'
  r = run('prepare_data.py', *args)
  assert r.returncode == 0 and 'is prepared' in r.stdout, r.stderr
  r = run('prepare_shards.py', f'--check={out / "val"}')  # Each split is a plain shard set.
  assert r.returncode == 0 and 'ok: 1 shard(s)' in r.stdout, r.stderr

  (out / 'val' / 'index.json').unlink()
  r = run('train.py', '--config', str(REPO / 'configs' / 'shakespeare.py') + ':tiny', *args,
          f'--config.out_dir={tmp_path / "out"}')
  assert r.returncode == 1 and r.stderr.startswith('error: ') and 'Traceback' not in r.stderr
  assert 'incomplete' in r.stderr and f'--config.data.shards_dir={out}' in r.stderr


# --- 4 simulated devices against 1 ----------------------------------------------------------------

def worker(spec: dict) -> dict:
  """The 4-device half: the same run from the same shards on a data=2 x fsdp=2 mesh."""

  from multidevice import run_losses
  assert jax.device_count() == 4, jax.devices()
  cfg = shard_config(spec['root'], spec['corpus'], mesh=(2, 2))
  cfg.train.update(spec['train'])
  cfg.out_dir = os.path.join(spec['root'], 'out4')
  loop_lib.train_and_evaluate(cfg)
  return run_losses(cfg.out_dir)


@pytest.mark.slow
def test_training_from_shards_on_4_devices_matches_1_device(corpus, tmp_path):

  from multidevice import RESULT, max_delta, run_losses, worker_env
  cfg = shard_config(tmp_path, corpus)
  cfg.train.update(max_steps=10, eval_interval=5)
  loop_lib.train_and_evaluate(cfg)  # One device; prepares the shards the worker then reads.
  ref = run_losses(cfg.out_dir)
  spec = {'root': str(tmp_path), 'corpus': str(corpus),
          'train': {'max_steps': 10, 'eval_interval': 5}}
  spec_path = tmp_path / 'spec.json'
  spec_path.write_text(json.dumps(spec))
  r = subprocess.run([sys.executable, __file__, str(spec_path)], capture_output=True,
                     text=True, env=worker_env(4), timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  got = json.loads([l for l in r.stdout.splitlines() if l.startswith(RESULT)][-1][len(RESULT):])
  d_train, d_val = max_delta(got['train'], ref['train']), max_delta(got['val'], ref['val'])
  print(f'shards, data=2 x fsdp=2 vs 1 device: max |dloss| {d_train:.2e} (train), {d_val:.2e} (eval)')
  assert d_train < 1e-5 and d_val < 1e-5


if __name__ == '__main__':
  from multidevice import RESULT
  with open(sys.argv[1]) as f:
    print(RESULT + json.dumps(worker(json.load(f))), flush=True)
