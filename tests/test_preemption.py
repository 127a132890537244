"""Tests for tropd_jax/preemption.py in one process (no jax.distributed): the SIGTERM flag and its handler.

Whole runs: tests/test_train.py (SIGTERM, then a bit-identical resume) and tests/test_distributed.py (two processes
agreeing on the step through JAX's preemption service)."""

import os
import signal

from tropd_jax import preemption


def test_sigterm_is_reported_at_the_next_step_and_the_previous_handler_comes_back():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *_: calls.append('previous'))
    try:
        with preemption.PreemptionWatch() as watch:
            assert not watch.reached(1) and not watch.reached(2)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
            assert watch.received == signal.SIGTERM and calls == []  # the process is not ended
            assert watch.reached(3) and watch.reached(4)
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == ['previous']  # back to the handler that was there before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_other_signals_can_be_watched():
    watch = preemption.PreemptionWatch(signals=(signal.SIGUSR1,)).start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.reached(1)
    finally:
        watch.stop()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
