"""Preemption: SIGTERM ends training at a step every process agrees on, after a checkpoint of that step.

Spot / preemptible TPU slices are reclaimed with SIGTERM, and SLURM sends it ahead of the time limit when asked
(`--signal=TERM@300`). The trainer asks `PreemptionWatch.reached(step)` once per step, after the step; when it says
yes, every process saves that step, waits for the write and returns normally (exit status 0). Running the same
command again resumes from that step.

Two sources of the notice:
  * a multi-process run (`jax.distributed`): JAX's preemption service. Each process's SIGTERM notifier reports to
    the coordination service, which picks the step to stop at (one past the furthest step any process has reached)
    and `multihost_utils.reached_preemption_sync_point` (through Orbax's `reached_preemption`) turns True at that
    step on every process, so all of them save the same step, even when only one was signalled;
  * a single process without `jax.distributed`: a Python handler for SIGTERM that sets a flag, read once per step.
    One process needs no agreement. When the preemption service is turned off in a multi-process run
    (`jax_enable_preemption_service=False`), the same handler is used and the processes agree through an
    all-gather of their flags every step.
"""

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


def _uses_jax_preemption_service() -> bool:
    """Whether `jax.distributed.initialize` started JAX's preemption service (its SIGTERM notifier included)."""
    return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class PreemptionWatch:
    """Tells the training loop when to stop for a preemption.

    Usage: `with PreemptionWatch() as watch: ... if watch.reached(step): save step and stop` (or `start()` /
    `stop()`). Every process must call `reached` with the same steps in the same order (once per training step).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received = None  # the signal number once one arrived (Python handler only)
        self._previous = {}
        self._jax_service = False

    def __enter__(self) -> 'PreemptionWatch':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> 'PreemptionWatch':
        """Starts listening (installs the signal handlers unless JAX's preemption service listens)."""
        self._jax_service = _uses_jax_preemption_service()
        if self._jax_service:
            return self  # JAX's notifier handles SIGTERM; a Python handler would replace it
        if threading.current_thread() is not threading.main_thread():
            logging.warning('not in the main thread: a SIGTERM will end this run without a checkpoint')
            return self
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def stop(self) -> None:
        """Puts back the signal handlers that were there before `start`."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        del frame
        if self.received is None:
            logging.warning(
                'received %s: finishing the current step, then saving a checkpoint and exiting',
                signal.Signals(number).name,
            )
        self.received = number

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (the number of steps done); the same answer on every process."""
        if self._jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        flag = self.received is not None
        if jax.distributed.is_initialized():  # several processes, no preemption service: agree here
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag
