"""Helpers for tests that run scripts/train.py as real processes and damage what they leave on disk
(test_preemption.py, test_chaos.py)."""

import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = str(REPO / 'scripts' / 'train.py')


def train_flags(root, text_path, *extra):
  """scripts/train.py's flags for the tiny preset on `text_path`, writing under `root`."""
  return ['--config', str(REPO / 'configs' / 'shakespeare.py') + ':tiny',
          f'--config.out_dir={root / "out"}', f'--config.data.text_path={text_path}',
          f'--config.data.data_dir={root / "data"}', '--config.train.peak_flops=1e12', *extra]


class Run:
  """scripts/train.py in a subprocess; stdout is read as it comes, so a test can act on a line.

  `freeze()` stops the process (SIGSTOP) and returns, exactly, what it printed before it stopped: this
  side keeps a write end of the stdout pipe and sends a marker down it once the process is stopped, so
  the marker arrives after the last of the process's own lines.
  """

  _MARK = '\x00gpt_jax tests: frozen\n'

  def __init__(self, args, cmd=None, env=None):
    self.err = tempfile.TemporaryFile('w+')  # A file, not a pipe nobody reads while it runs.
    self._err_text = None
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    read_end, self._write_end = os.pipe()
    self.proc = subprocess.Popen(cmd or [sys.executable, TRAIN, *args], stdout=self._write_end,
                                 stderr=self.err, text=True, env=env, cwd=REPO)
    self._stdout = os.fdopen(read_end, encoding='utf-8')
    self.lines, self._queue = [], queue.Queue()
    self._pump = threading.Thread(target=self._read, daemon=True)
    self._pump.start()

  def _read(self):
    partial = ''  # A line the process was stopped in the middle of: it goes on after the marker.
    for line in self._stdout:
      if line.endswith(self._MARK):
        partial += line[:-len(self._MARK)]
        self._queue.put(self._MARK)
        continue
      line, partial = partial + line, ''
      self.lines.append(line)
      self._queue.put(line)
    self._queue.put(None)

  def wait_for(self, pattern, timeout=300):
    """The first line not yet waited for that matches `pattern`."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self._queue.get(timeout=min(max(deadline - time.monotonic(), 0.01), 1))
      except queue.Empty:
        if time.monotonic() > deadline:
          raise AssertionError(f'no {pattern!r} in {timeout}s:\n' + ''.join(self.lines)) from None
        if self.proc.poll() is not None:
          self._end_output()  # This side's write end kept the pipe open past the process's exit.
        continue
      if line is None:
        raise AssertionError(f'exited before {pattern!r}:\n' + ''.join(self.lines) + self.stderr())
      if re.search(pattern, line):
        return line

  def freeze(self, timeout=300):
    """SIGSTOP; returns the lines printed after those already waited for, up to the stop."""
    self.proc.send_signal(signal.SIGSTOP)
    # Returns once the process is stopped (or gone), without reaping it: Popen.wait still can.
    os.waitid(os.P_PID, self.proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    os.write(self._write_end, self._MARK.encode())
    lines = []
    while (line := self._queue.get(timeout=timeout)) != self._MARK:
      assert line is not None, ''.join(self.lines) + self.stderr()
      lines.append(line)
    return lines

  def thaw(self):
    self.proc.send_signal(signal.SIGCONT)

  def finish(self, timeout=300):
    """Waits for the exit; (exit code, stdout, stderr). Closes this side's files (unclosed files
    are ResourceWarnings, which fail the suite)."""
    rc = self.proc.wait(timeout)
    self._end_output()
    self._pump.join(timeout)
    err = self.stderr()
    self._stdout.close()
    self.err.close()
    self._err_text = err
    return rc, ''.join(self.lines), err

  def _end_output(self):
    """Closes this side's write end of the stdout pipe: the reader then sees its end."""
    if self._write_end is not None:
      os.close(self._write_end)
      self._write_end = None

  def stderr(self):
    if self.err.closed:
      return self._err_text
    self.err.seek(0)
    return self.err.read()


def metrics(out_dir):
  """The records of out_dir/metrics.jsonl, in order."""
  with open(os.path.join(out_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(l) for l in f]


# --- damage, as a disk or a crash would do it ------------------------------------------------------

def truncate_largest_array(step_dir):
  """Cuts the largest array data file of a checkpoint's parameters to half its size."""
  files = [p for p in (step_dir / 'params').rglob('*') if p.is_file() and '/d/' in str(p)]
  big = max(files, key=lambda p: p.stat().st_size)
  os.truncate(big, big.stat().st_size // 2)


def garble_meta(step_dir):
  (step_dir / 'meta' / 'metadata').write_text('{"model": {"n_layer": 2,', encoding='utf-8')


def garble_metrics(step_dir):
  (step_dir / 'metrics' / 'metrics').write_text('{"val_lo', encoding='utf-8')
