"""Stopping a run cleanly: Ctrl-C (SIGINT) and SIGTERM end it at the next step.

The first SIGINT or SIGTERM asks the loop to stop after the step in progress:
it saves that step's checkpoint, waits for the save, and raises `Interrupted`,
which `main.py` turns into a distinct exit code and the command to resume
(the same command: the run continues from the checkpoint, bit for bit as an
uninterrupted one). A second Ctrl-C kills the process at once, without
saving (SIGINT's default action, reinstalled by the first one).

Exit codes, for wrappers that rerun a job until it succeeds:
  0   finished.
  75  stopped by SIGTERM (preemption, a scheduler's time limit): EX_TEMPFAIL of
      sysexits.h, "try again later"; rerun the same command.
  130 stopped by Ctrl-C (128 + SIGINT, as a shell reports it): the user's stop;
      rerun the same command to continue when you want to.

With several processes the stop must happen at the same step everywhere:
SIGTERM then goes through Orbax's `reached_preemption` (synchronised by
jax.distributed), and SIGINT is left to its default (abort; resume from the
last periodic checkpoint).
"""

import signal
import threading
from typing import Callable, Optional

import numpy as np

from moco_jax.core import parallel

EXIT_PREEMPTED = 75  # EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # 128 + SIGINT

_EXIT_CODES = {signal.SIGTERM: EXIT_PREEMPTED, signal.SIGINT: EXIT_INTERRUPTED}


class Interrupted(Exception):
  """The run stopped early on a signal; `step` is saved when `saved`."""

  def __init__(self, signum: int, step: int, saved: bool, directory: str = ''):
    self.signum = signum
    self.step = step
    self.saved = saved
    self.exit_code = _EXIT_CODES.get(signum, EXIT_PREEMPTED)
    name = signal.Signals(signum).name
    where = f' in {directory}' if directory else ''
    what = (f'saved step {step}{where}' if saved
            else f'stopped before any step ran (nothing new to save; at step {step})')
    super().__init__(f'Stopped by {name}: {what}.')


class StopWatcher:
  """Turns SIGINT / SIGTERM into a stop at the next step boundary (a context manager).

  The loop calls `requested(manager, step)` after every step. Handlers are
  installed only from the main thread and restored on exit.
  """

  def __init__(self, process_count: int = 1):
    self.signum = None
    self._process_count = process_count
    self._event = threading.Event()
    self._previous = {}
    # After jax.distributed.initialize, JAX's preemption sync manager owns SIGTERM
    # (a C++ handler that tells the coordination service, so that Orbax's
    # `reached_preemption(step)` is True on every process at the same step). A
    # Python handler would replace it and the notice would never arrive.
    self._runtime_sync = process_count > 1 and _preemption_service_running()
    if threading.current_thread() is not threading.main_thread():
      return
    watched = ([] if self._runtime_sync else [signal.SIGTERM]) + (
        [signal.SIGINT] if process_count == 1 else [])
    for signum in watched:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
    self._event.set()
    if signal.SIGINT in self._previous:
      # A second Ctrl-C kills the process at once, even inside a long XLA call.
      signal.signal(signal.SIGINT, signal.SIG_DFL)

  @property
  def stopped(self) -> bool:
    return self._event.is_set()

  def requested(self, manager, step: int) -> bool:
    """True once a stop was asked for (on every process at the same step).

    Asked after EVERY step: with several processes the agreed stop is one exact step.
    """
    if self._runtime_sync:
      stop = bool(manager.reached_preemption(step))
      if stop and self.signum is None:
        self.signum = signal.SIGTERM
    elif self._process_count > 1:  # Preemption service off: agree on the flag.
      stop = bool(np.max(parallel.host_gather(np.int32(self._event.is_set()))))
      if stop and self.signum is None:
        self.signum = signal.SIGTERM
    else:
      stop = self._event.is_set()
    return stop

  def uninstall(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.uninstall()
    return False


def _preemption_service_running() -> bool:
  """True when jax.distributed runs its preemption sync manager (the default)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, 'preemption_sync_manager', None) is not None


class EvaluationStopped(Interrupted):
  """An evaluation (knn, linear_eval, export, report) stopped by a signal: nothing written."""

  def __init__(self, signum: int, mode: str):  # pylint: disable=super-init-not-called
    Exception.__init__(  # pylint: disable=non-parent-init-called
        self, f'Stopped by {signal.Signals(signum).name} during --mode={mode}: nothing was '
        'written (results are written only when the evaluation completes).')
    self.signum, self.step, self.saved = signum, 0, False
    self.exit_code = _EXIT_CODES.get(signum, EXIT_PREEMPTED)


class StopOnSignal:
  """For the modes without a step loop: SIGTERM / SIGINT raise `EvaluationStopped` at once.

  An evaluation has nothing to save halfway (its results are written at the
  end, atomically), so it stops where it is, with training's exit codes (75 /
  130): a wrapper that reruns preempted jobs reruns it, where the default
  SIGTERM death (-15) would read as a failure. A second Ctrl-C kills at once.
  """

  def __init__(self, mode: str, on_stop: Optional[Callable] = None):
    """`on_stop(EvaluationStopped)` ends the process (the CLI: one warning, then the exit
    code); without it the handler raises the exception where the main thread is. The CLI
    must not raise: library code that catches broad exceptions (logging's handlers do)
    would swallow the stop and the evaluation would run on."""
    self._mode = mode
    self._on_stop = on_stop
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    stopped = EvaluationStopped(signum, self._mode)
    if self._on_stop is not None:
      self._on_stop(stopped)
    raise stopped

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    return False
