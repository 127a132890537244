"""Tests for tropd_jax/checkpoint.py: round trip, retention, partial saves, corrupted latest checkpoint."""

import asyncio
import glob
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tropd_jax import checkpoint
from tropd_jax.checkpoint import Checkpointer


def make_state(i):
    """A train-state-shaped pytree: parameters, real AdamW moments, a step and RNG key data."""
    params = {'w': jnp.full((8, 4), float(i)), 'b': jnp.arange(4, dtype=jnp.float32) * i}
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda x: x + 1.0, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {
        'params': params,
        'opt_state': opt_state,
        'step': jnp.asarray(i),
        'rng': jax.random.key_data(jax.random.key(i)),
    }


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def save_steps(directory, steps, *, every_steps=1, keep=3):
    ckpt = Checkpointer(directory, every_steps=every_steps, keep=keep)
    saved = [s for s in steps if ckpt.save(s, make_state(s), {'next_index': 10 * s})]
    ckpt.close()
    return saved


def test_round_trip_keeps_last_and_respects_interval(tmp_path):
    directory = str(tmp_path / 'ckpt')
    saved = save_steps(directory, range(1, 9), every_steps=2, keep=2)
    assert saved == [2, 4, 6, 8]
    ckpt = Checkpointer(directory, every_steps=2, keep=2)
    assert ckpt.all_steps() == [6, 8]
    step, state, data_state = ckpt.restore_latest(abstract(make_state(0)))
    assert step == 8 and data_state == {'next_index': 80}
    assert_tree_equal(state, make_state(8))  # parameters, optimizer moments, step and RNG all come back exactly


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(str(tmp_path / 'none'), every_steps=1, keep=1).restore_latest(abstract(make_state(0))) is None


def test_partial_save_is_ignored(tmp_path):
    """A save killed before Orbax finalised it leaves only a temporary directory, which is never a checkpoint."""
    directory = str(tmp_path / 'ckpt')
    save_steps(directory, [1, 2])
    partial = os.path.join(directory, '3.orbax-checkpoint-tmp-1234567')
    os.makedirs(os.path.join(partial, 'state'))
    ckpt = Checkpointer(directory, every_steps=1, keep=3)
    assert ckpt.all_steps() == [1, 2]
    step, state, _ = ckpt.restore_latest(abstract(make_state(0)))
    assert step == 2
    assert_tree_equal(state, make_state(2))
    ckpt.close()


# Orbax abandons the reads of a damaged step that are in flight; their reports ('Event loop is closed' through
# sys.unraisablehook, 'exception was never retrieved' from asyncio) are absorbed, so none reaches pytest here.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', ['truncate', 'flip', 'delete', 'data_json'])
def test_corrupted_latest_falls_back_with_warning(tmp_path, damage, caplog, capsys):
    directory = str(tmp_path / 'ckpt')
    save_steps(directory, [1, 2, 3])
    files = sorted(glob.glob(os.path.join(directory, '3', 'state', '**', 'd', '*'), recursive=True))
    assert files
    for f in files:
        raw = bytearray(open(f, 'rb').read())
        if damage == 'truncate':
            raw = raw[: len(raw) // 2]
        elif damage == 'flip':
            raw[len(raw) // 2] ^= 0xFF
        if damage == 'delete':
            os.remove(f)
        elif damage != 'data_json':
            open(f, 'wb').write(bytes(raw))
    if damage == 'data_json':
        (tmp_path / 'ckpt' / '3' / 'data' / 'metadata').write_text('{"next_in')

    ckpt = Checkpointer(directory, every_steps=1, keep=3)
    with pytest.warns(RuntimeWarning, match='checkpoint step 3 .* unreadable .* moved it to 3.corrupt .* step 2'):
        step, state, data_state = ckpt.restore_latest(abstract(make_state(0)))
    assert step == 2 and data_state == {'next_index': 20}
    reports = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(reports) == 1 and reports[0].startswith('checkpoint step 3 '), reports  # no asyncio reports
    assert 'Event loop is closed' not in capsys.readouterr().err
    assert_tree_equal(state, make_state(2))
    assert ckpt.all_steps() == [1, 2] and os.path.isdir(os.path.join(directory, '3.corrupt'))
    # The resumed run can save step 3 again without colliding with the corrupted one.
    assert ckpt.save(3, make_state(3), {'next_index': 30})
    ckpt.close()
    step, state, _ = Checkpointer(directory, every_steps=1, keep=3).restore_latest(abstract(make_state(0)))
    assert step == 3
    assert_tree_equal(state, make_state(3))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')  # abandoned reads are absorbed
def test_mismatched_state_raises_instead_of_starting_over(tmp_path):
    directory = str(tmp_path / 'ckpt')
    save_steps(directory, [1, 2])
    other = make_state(0)
    other['params']['w'] = jnp.zeros((3, 3))  # another model shape
    with pytest.raises(ValueError, match=r'none of the checkpoints .* \(steps \[2, 1\]\) can be restored'):
        Checkpointer(directory, every_steps=1, keep=3).restore_latest(abstract(other))
    assert sorted(os.listdir(directory)) == ['1', '2']  # good checkpoints are never moved aside


def test_abandoned_read_reports_are_absorbed_and_other_errors_are_not(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)  # the default hook: prints to stderr
    closed = asyncio.new_event_loop()
    closed.close()

    class LateRead:  # a tensorstore read that completes after Orbax closed its loop
        def __del__(self):
            closed.call_soon_threadsafe(print)

    class Unrelated:
        def __del__(self):
            raise RuntimeError('an unrelated failure')

    class Suspend:
        def __await__(self):
            yield

    # An Orbax read coroutine closed unfinished, which turns the GeneratorExit into its own error.
    namespace = {'Suspend': Suspend}
    exec(
        compile(
            'async def read():\n    try:\n        await Suspend()\n    except GeneratorExit as e:\n'
            '        raise Exception("error while reading array index") from e\n',
            os.path.join('orbax', 'checkpoint', 'serialization.py'),
            'exec',
        ),
        namespace,
    )

    with checkpoint.absorb_abandoned_read_reports():
        LateRead()
        Unrelated()
        abandoned_read = namespace['read']()
        abandoned_read.send(None)
        del abandoned_read
        loop = asyncio.new_event_loop()
        abandoned = loop.create_future()
        abandoned.set_exception(ValueError('NOT_FOUND: a read of the damaged step'))
        del abandoned  # asyncio logs 'Future exception was never retrieved'
        loop.call_exception_handler({'message': 'an unrelated asyncio error', 'exception': ValueError('x')})
        loop.close()
    err = capsys.readouterr().err
    assert 'Event loop is closed' not in err and 'error while reading array index' not in err
    assert 'an unrelated failure' in err
    assert [r.getMessage() for r in caplog.records if r.name == 'asyncio'] == ['an unrelated asyncio error']
    assert not logging.getLogger('asyncio').filters
    assert sys.unraisablehook is sys.__unraisablehook__  # the context leaves no hook behind
    # Reads still in flight finish after the restore returned: while the checkpointer that restored lives, their
    # closed-loop reports stay dropped, nothing else; its `close` puts the previous hook back.
    ckpt = Checkpointer(str(tmp_path / 'ckpt'), every_steps=1, keep=1)
    assert ckpt.restore_latest(abstract(make_state(0))) is None
    after_one_restore = sys.unraisablehook
    assert ckpt.restore_latest(abstract(make_state(0))) is None  # a second restore does not wrap the hook twice
    assert sys.unraisablehook is after_one_restore is not sys.__unraisablehook__
    LateRead()
    Unrelated()
    err = capsys.readouterr().err
    assert 'Event loop is closed' not in err and 'an unrelated failure' in err
    ckpt.close()
    assert sys.unraisablehook is sys.__unraisablehook__
    LateRead()
    assert 'Event loop is closed' in capsys.readouterr().err


def test_train_state_restores_the_trainers_checkpoint_layout(tmp_path):
    """A checkpoint written as the trainer writes it (one dict: params, opt_state, step, skipped_steps, rng)
    restores into `train.TrainState` field by field, and a `TrainState` saves under the same names."""
    from tropd_jax import sharding, train

    directory = str(tmp_path / 'ckpt')
    state = make_state(3)
    on_disk = {
        'params': state['params'],
        'opt_state': state['opt_state'],
        'step': np.asarray(3, np.int32),
        'skipped_steps': np.asarray(1, np.int32),
        'rng': np.asarray(state['rng']),
    }
    ckpt = Checkpointer(directory, every_steps=1, keep=3)
    ckpt.save(3, on_disk, {'iterator': {'next_index': 30}})
    ckpt.close()

    mesh = sharding.make_mesh(1, 1, 1)
    fresh = make_state(0)
    initial = train.TrainState.create(fresh['params'], fresh['opt_state'], 0, 0, jax.random.key(0))
    to_mesh = lambda tree: jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), tree)
    ckpt = Checkpointer(directory, every_steps=1, keep=3)
    restored, data_state = train.restore_or_init(ckpt, initial, to_mesh(fresh['params']), to_mesh(fresh['opt_state']))
    ckpt.close()
    assert data_state == {'next_index': 30}
    assert (int(restored.step), int(restored.skipped_steps)) == (3, 1)
    assert_tree_equal(restored.as_dict(), on_disk)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(jax.random.key(3)))
    assert sorted(initial.as_dict()) == sorted(on_disk)
    # No checkpoint: the state as given.
    empty = Checkpointer(str(tmp_path / 'none'), every_steps=1, keep=1)
    as_given, no_data = train.restore_or_init(empty, initial, to_mesh(fresh['params']), to_mesh(fresh['opt_state']))
    assert as_given is initial and no_data is None
    empty.close()
