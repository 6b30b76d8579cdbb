"""Start-up off the critical path: the train step compiles while the run gets ready, JAX's persistent
compilation cache can keep every program for the next run, and the start-up's cost is logged.

  Startup.compile    lowers and compiles the first train-step call ahead of time, `jit(...)
                     .lower(shapes).compile()`, in a background thread, as soon as the shapes are known
                     (after the data: `jax.eval_shape` gives the state's without computing it).
                     Meanwhile the main thread makes or restores the state and runs the step-0 eval,
                     with its own compilation. The first call (multi_step.Steps) waits for that
                     executable and runs it: the very program jit would compile on the first call (the
                     same HLO, so the same entry in the persistent cache). An error in the thread is
                     raised again, the same exception, in the main thread when the call is due.
  persistent_cache   train.compilation_cache_dir: JAX's persistent cache in that folder for the run,
                     with every program cached (JAX's default skips those compiled in under a second),
                     so a second identical run loads every program instead of compiling it.
  Startup.record     the `startup` record of metrics.jsonl, written when the first step is done, and
                     `Startup.line` its printed line: seconds from the start to the first step done, its
                     phases, the train step's compile time, and what came from the cache.

GPT_JAX_STARTUP=sequential compiles as the loop did before (scripts/bench_startup.py compares the
two): the first call when it runs, after the eval; a layer-stats variant up front.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from typing import Any, Iterator, Optional

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

SWITCH = 'GPT_JAX_STARTUP'  # =sequential: no background compilation.

# JAX's monitoring events: a persistent-cache lookup's outcome, then the program's compile (or load).
_HIT, _MISS = '/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'
_COMPILE = '/jax/core/compile/backend_compile_duration'
_CACHE_SETTINGS = {'jax_compilation_cache_dir': None, 'jax_persistent_cache_min_compile_time_secs': 0.0,
                   'jax_persistent_cache_min_entry_size_bytes': -1}  # -1: no minimum, and none imposed.


@contextlib.contextmanager
def persistent_cache(directory: str) -> Iterator[Optional[str]]:
  """Within: JAX's persistent compilation cache in `directory` (~ expanded), every program written to it
  however quickly it compiled; JAX's settings are restored on leaving. '' leaves them alone (the
  scripts' own cache, if any, stays in use: gpt_jax/cli.py)."""
  if not directory:
    yield None
    return
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  _apply(dict(_CACHE_SETTINGS, jax_compilation_cache_dir=path))
  try:
    yield path
  finally:
    _apply(before)


def _apply(settings: dict) -> None:
  for name, value in settings.items():
    jax.config.update(name, value)
  # JAX opens its cache once, at the first compile: forget it, so the next compile opens this folder.
  compilation_cache.reset_cache()


class _Programs:
  """The programs JAX compiles (or loads from the persistent cache) while a `Startup` listens: one
  (label, seconds, from cache: True, False or None = no cache) each, labelled by the job that asked."""

  def __init__(self):
    self.local = threading.local()  # This thread's job label and its last cache lookup.
    self.seen: list[tuple[str, float, Optional[bool]]] = []
    with _LOCK:
      _LISTENING.add(self)

  def close(self) -> None:
    with _LOCK:
      _LISTENING.discard(self)

  @contextlib.contextmanager
  def label(self, name: str) -> Iterator[None]:
    self.local.label = name
    try:
      yield
    finally:
      self.local.label = None

  def event(self, event: str) -> None:
    if event in (_HIT, _MISS):
      self.local.hit = event == _HIT

  def compiled(self, seconds: float) -> None:
    self.seen.append((getattr(self.local, 'label', None) or 'other', seconds,
                      getattr(self.local, 'hit', None)))
    self.local.hit = None


# JAX's listeners are registered once, and report to every `_Programs` listening: until its record
# is written, or until it is garbage (a run that failed before its first step). Compiling threads call
# them while the main thread adds or removes one: hence the lock.
_LISTENING: weakref.WeakSet = weakref.WeakSet()
_LOCK = threading.Lock()
_REGISTERED: list[bool] = []


def _listening() -> list[_Programs]:
  with _LOCK:
    return list(_LISTENING)


def _register_listeners() -> None:
  with _LOCK:
    if _REGISTERED:
      return
    monitoring.register_event_listener(lambda event, **_: [p.event(event) for p in _listening()])
    monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: [p.compiled(seconds) for p in _listening()] if event == _COMPILE else None)
    _REGISTERED.append(True)


class Startup:
  """A run's start-up: its phases (`mark`), its first train-step call compiled in the background
  (`compile`) and, once the first call is done, the `record` and its `line`."""

  def __init__(self, t_start: float):
    _register_listeners()
    self.t_start, self.marks = t_start, {}
    self.background = os.environ.get(SWITCH, '').strip().lower() != 'sequential'
    self.programs = _Programs()
    self.ready: dict[Any, Any] = {}  # key -> the compiled call (from the thread)
    self.errors: dict[Any, BaseException] = {}
    self.seconds: dict[Any, float] = {}  # key -> seconds its compilation took
    self.first_key, self.first_t0, self.waited = None, 0.0, 0.0

  def mark(self, phase: str) -> None:
    """Notes the end of a phase of the start-up (now)."""
    self.marks.setdefault(phase, time.time())

  def compile(self, steps: Any, abstract: Any, t: Any, first_step: int) -> None:
    """Compiles the calls of `steps` (multi_step.Steps) that the run needs first, for the state's
    shapes `abstract`, in a background thread: the first call (from `first_step`: 0, or the newest
    checkpoint's), then the layer-statistics variant if train.layer_stats_interval is set. `steps`
    waits for each at its first use (`Steps.pending`)."""
    self.mark('setup')  # Devices, mesh, data, the checkpoints' scan and the state's shapes: done.
    k = steps.call_length(first_step, t.max_steps)
    with_stats = t.layer_stats_interval > 0 and (first_step + k) % t.layer_stats_interval == 0
    keys = [(k, with_stats)] + [(t.steps_per_call, True)] * (t.layer_stats_interval > 0)
    jobs = {key: (steps.call(*key), (abstract, steps.inputs(first_step, key[0]))) for key in dict.fromkeys(keys)}
    if not self.background:  # As before: the first call compiles when it runs, the variant now.
      steps.pending[keys[0]] = functools.partial(self._first_call, keys[0])
      for key in list(jobs)[1:]:
        self._compile(key, *jobs[key])
        steps.calls[key] = self.ready[key]
      return
    done = {key: threading.Event() for key in jobs}
    for key in jobs:
      steps.pending[key] = functools.partial(self._wait, key, done[key], steps.calls)
    # Not a daemon: an interpreter never exits in the middle of XLA's compilation.
    threading.Thread(target=self._compile_all, args=(jobs, done), name='gpt_jax-compile').start()

  def _compile_all(self, jobs: dict[Any, tuple[Any, tuple]], done: dict[Any, threading.Event]) -> None:
    for key, (fn, args) in jobs.items():
      try:
        self._compile(key, fn, args)
      except BaseException as e:  # noqa: BLE001 (raised again in the main thread, by `_wait`)
        self.errors[key] = e
      finally:
        done[key].set()

  def _compile(self, key: Any, fn: Any, args: tuple) -> None:
    t0 = time.perf_counter()
    with self.programs.label(str(key)):
      self.ready[key] = fn.lower(*args).compile()
    self.seconds[key] = time.perf_counter() - t0

  def _first(self, key: Any) -> None:
    if self.first_key is None:  # The first call is due: the main thread's start-up work is done.
      self.first_key, self.first_t0 = key, time.perf_counter()
      self.mark('eval')

  def _first_call(self, key: Any) -> None:
    """Sequential: the call compiles as it runs, labelled so (until the record)."""
    self._first(key)
    self.programs.local.label = str(key)

  def _wait(self, key: Any, done: threading.Event, calls: dict) -> None:
    """Waits for the call `key` to be compiled, then puts it in `calls`; raises its error, if any."""
    self._first(key)
    t0 = time.perf_counter()
    done.wait()
    if key == self.first_key:
      self.waited = time.perf_counter() - t0
    if key in self.errors:
      raise self.errors.pop(key)
    calls[key] = self.ready[key]

  def record(self, step: int, elapsed: float) -> dict:
    """The `startup` record, written once the first call (ending at step `step`) is done: seconds
    from the start to it and of each phase (setup: devices, mesh, data and the state's shapes; state:
    init or restore; eval: the evaluator and any step-0 eval, with their compilation), of the first
    call's compilation (in the background; sequential: compiling and running it) and of the wait for
    it, and the programs compiled so far (how many came from the persistent cache; step_from_cache:
    None without a cache)."""
    done, t = time.time(), self.t_start
    phases = {}
    for phase in ('setup', 'state', 'eval'):
      end = self.marks.get(phase, done)
      phases[f'{phase}_seconds'], t = round(end - t, 3), end
    self.programs.close()
    self.programs.local.label = None
    if not self.background and self.first_key is not None:
      self.seconds[self.first_key] = self.waited = time.perf_counter() - self.first_t0
    seen = self.programs.seen
    step_hits = [hit for label, _, hit in seen if label == str(self.first_key)]
    self.summary = {
        'event': 'startup', 'step': step, 'time': round(elapsed, 3),
        'first_step_seconds': round(done - self.t_start, 3), **phases,
        'step_compile_seconds': round(self.seconds.get(self.first_key, 0.0), 3),
        'step_wait_seconds': round(self.waited, 3), 'background_compile': self.background,
        'programs': len(seen), 'programs_from_cache': sum(hit is True for _, _, hit in seen),
        'step_from_cache': None if not step_hits or None in step_hits else all(step_hits)}
    return self.summary

  def line(self, what: str, since_eval: float) -> str:
    """The record's printed line; `what` the first call ('step', '4 steps'), `since_eval` seconds
    from the end of any step-0 eval to the first call done."""
    r = self.summary
    how = 'in the background' if r['background_compile'] else 'on its first call'
    cache = ('' if r['step_from_cache'] is None else
             f'; {r["programs_from_cache"]} of {r["programs"]} programs from the compilation cache')
    return (f'compiled and ran the first {what} in {since_eval:.1f}s; startup: first step done '
            f'{r["first_step_seconds"]:.1f}s after the start (setup {r["setup_seconds"]:.1f}s, state '
            f'{r["state_seconds"]:.1f}s, eval {r["eval_seconds"]:.1f}s; train step compiled {how} in '
            f'{r["step_compile_seconds"]:.1f}s, waited {r["step_wait_seconds"]:.1f}s{cache})')
