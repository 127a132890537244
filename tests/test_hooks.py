"""The loop's periodic actions (`tropd_jax.hooks`): which steps fire which hook."""

import pytest

from tropd_jax import hooks as hooks_lib

TOTAL = 10


def fired(*, stop_after=None, total=TOTAL, start=0, **kwargs) -> list[int]:
    """The steps (counted as steps done) after which one hook added with `kwargs` fires in a loop from `start`."""
    calls = []
    hooks = hooks_lib.Hooks(total)
    hooks.add(lambda step: calls.append(step), **kwargs)
    for step in range(start, total):
        hooks.run(step + 1, stopping=step + 1 == stop_after)
        if step + 1 == stop_after:
            break
    return calls


def test_every_fires_on_multiples_but_not_the_last_step():
    assert fired(every=3) == [3, 6, 9]
    assert fired(every=5) == [5]  # 10 is the last step: only `at_end` hooks fire there
    assert fired(every=1) == list(range(1, TOTAL))


def test_at_end_fires_once_and_the_last_step_not_twice():
    assert fired(at_end=True) == [TOTAL]
    assert fired(every=5, at_end=True) == [5, 10]
    assert fired(every=3, at_end=True) == [3, 6, 9, 10]
    assert fired(every=1, at_end=True) == list(range(1, TOTAL + 1))


def test_every_zero_never_fires():
    assert fired(every=0) == []
    assert fired(every=0, at_end=True) == [TOTAL]


def test_resumed_loop_fires_only_its_own_steps():
    assert fired(every=3, at_end=True, start=4) == [6, 9, 10]
    assert fired(every=3, at_end=True, start=TOTAL) == []  # nothing left to run


def test_stopping_early():
    # As scheduled: a periodic hook fires at the stop step only when due there.
    assert fired(every=3, at_end=True, stop_after=6) == [3, 6]
    assert fired(every=3, at_end=True, stop_after=7) == [3, 6]
    # 'always' fires at the stop step too, scheduled or not, once; 'never' not even when scheduled.
    assert fired(every=3, at_end=True, on_stop='always', stop_after=7) == [3, 6, 7]
    assert fired(every=3, at_end=True, on_stop='always', stop_after=6) == [3, 6]
    assert fired(every=3, at_end=True, on_stop='never', stop_after=6) == [3]
    # Stopping at the last step: `at_end` hooks fire as scheduled, 'never' hooks do not.
    assert fired(every=3, at_end=True, stop_after=TOTAL) == [3, 6, 9, 10]
    assert fired(at_end=True, on_stop='never', stop_after=TOTAL) == []


def test_run_calls_in_order_with_arguments_and_merges_results():
    calls = []
    hooks = hooks_lib.Hooks(4)
    hooks.add(lambda step, row: calls.append(('log', step, row['loss'])), every=2, at_end=True)
    hooks.add(lambda step, row: {'eval_accuracy': step / 4}, every=2, at_end=True)
    hooks.add(lambda step, row: {'eval_accuracy': -1.0, 'exported': 1}, at_end=True)
    assert hooks.run(1, {'loss': 0.5}) == {}
    assert hooks.run(2, {'loss': 0.25}) == {'eval_accuracy': 0.5}
    assert hooks.run(4, {'loss': 0.125}) == {'eval_accuracy': -1.0, 'exported': 1}  # later hooks win
    assert calls == [('log', 2, 0.25), ('log', 4, 0.125)]


def test_bad_arguments_are_named():
    hooks = hooks_lib.Hooks(4)
    with pytest.raises(ValueError, match='every must be >= 0, got -1'):
        hooks.add(print, every=-1)
    with pytest.raises(ValueError, match="on_stop must be one of .* got 'sometimes'"):
        hooks.add(print, on_stop='sometimes')
