"""Stopping a training loop cleanly on SIGTERM or SIGINT: finish the step, save it, exit 75.

Both training loops run inside `StopOnSignal(manager, total_steps)` and ask
`stop.should_stop(step)` once per step; when it says True they save that step, log it and
leave the loop; `python -m mae_jax.main` then exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL
of sysexits.h: stopped early, state saved, run the same command again), which
launch/slurm_gpu.sbatch turns into a requeue. A run that reaches its last step exits 0 as
usual, also when a signal came during its last step.

How the processes agree on the step:
- One process (the usual case): Python handlers set a flag; the loop reads it after each
  step. No communication.
- Several processes (`jax.distributed`): JAX's preemption service installs its own SIGTERM
  handler at `jax.distributed.initialize()` and tells the coordination service, which
  tells every process; each reports its step through `manager.reached_preemption(step)`
  (orbax's call of `multihost_utils.reached_preemption_sync_point`) and they all stop at
  the same step, one past the furthest any had reached. A SIGTERM to any one process is
  enough; nothing per step is added. SIGTERM is therefore left to JAX here (a Python
  handler would replace its handler), and SIGINT is forwarded to it as a SIGTERM.

A second signal (Ctrl-C twice) kills the process at once: after the first one both signals
are back to the system default. Python runs signal handlers between bytecodes only, so a
signal that comes while a long native call runs (the first step's compilation) is seen
when it returns. The previous handlers come back when the loop ends, also on an error.
"""
import os
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

from absl import logging
import jax

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: stopped early with the state saved; rerun to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_last_stop: Optional[Dict[str, Any]] = None


def last_stop() -> Optional[Dict[str, Any]]:
  """{'step', 'reason'} of the last loop that stopped early on a signal, else None."""
  return _last_stop


class StopOnSignal:
  """Context manager around a training loop: turns SIGTERM / SIGINT into a clean stop.

  Args:
    manager: the run's orbax CheckpointManager (its `reached_preemption` is JAX's
      multi-process preemption sync).
    last_step: the loop's final step; a signal during it changes nothing (the run ends).
  """

  def __init__(self, manager: Any, last_step: int):
    self._manager = manager
    self._last_step = last_step
    self._received: Optional[int] = None
    self._previous: Dict[int, Any] = {}

  def __enter__(self) -> 'StopOnSignal':
    global _last_stop
    _last_stop = None
    if threading.current_thread() is not threading.main_thread():
      logging.warning('The training loop runs outside the main thread: SIGTERM / SIGINT keep '
                      'their usual effect (no checkpoint is saved on them).')
      return self
    if jax.process_count() == 1:
      self._install(self._on_signal, SIGNALS)
    elif jax.config.jax_enable_preemption_service:  # SIGTERM is JAX's (native) handler's
      self._install(self._forward_to_jax, (signal.SIGINT,))
    else:
      logging.warning('JAX\'s preemption service is off (jax_enable_preemption_service) in this '
                      '%d-process run: SIGTERM and SIGINT stop it without saving.',
                      jax.process_count())
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """True when the loop should save `step` and stop (all processes agree on the step).

    Call it after every step on every process: with several processes it is JAX's
    preemption sync point.
    """
    global _last_stop
    synced = self._manager.reached_preemption(step)
    if not (synced or self._received is not None) or step >= self._last_step:
      return False
    if self._received is not None:
      reason = signal.Signals(self._received).name
    else:
      reason = 'a preemption notice (SIGTERM or SIGINT to one of the processes)'
    _last_stop = {'step': step, 'reason': reason}
    logging.warning('%s: saving step %d and stopping (a second signal kills at once).',
                    reason, step)
    return True

  def _install(self, handler, signums) -> None:
    for signum in signums:
      previous = signal.getsignal(signum)
      if previous is signal.SIG_IGN:  # e.g. nohup, or a background job ignoring SIGINT
        continue
      self._previous[signum] = previous
      signal.signal(signum, handler)

  def _first_signal(self, signum: int) -> None:
    self._received = signum
    for other in self._previous:  # the next one kills, even during a long native call
      signal.signal(other, signal.SIG_DFL)

  def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
    del frame
    self._first_signal(signum)

  def _forward_to_jax(self, signum: int, frame: Optional[FrameType]) -> None:
    del frame
    self._first_signal(signum)
    self._received = None  # the step comes from the sync point, as for a SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)
