"""Checkpoints: an Orbax `CheckpointManager` holding the train state and the data iterator state.

Layout: `workdir/checkpoints/<step>/{state, data}`. `state` is a pytree (student parameters, optimizer state, step,
RNG key data) saved asynchronously; `data` is the grain iterator state as JSON. Orbax writes each step to a temporary
directory and renames it when complete, so a save killed half-way never looks like a checkpoint. A step directory
that is there but cannot be read (a disk error, a truncated file, an interrupted copy) is detected at restore time:
it is moved aside to `<step>.corrupt` with a warning, and the previous good step is used instead. When no step can
be read at all, the run's state does not match the checkpoints (another model or optimizer): that is an error, not
a silent fresh start.

All processes call `save` and `restore` (Orbax coordinates them; the primary process writes metadata).
"""

import contextlib
import gc
import inspect
import logging
import os
import sys
import traceback
import warnings

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import paths, sharding


def _is_abandoned_read_report(unraisable) -> bool:
    """Whether an unraisable exception comes from a read that Orbax abandoned: asyncio's `RuntimeError('Event loop
    is closed')` from `call_soon_threadsafe` (a tensorstore read finishing after the restore's loop closed), or one
    of Orbax's read coroutines failing as it is closed unfinished (GeneratorExit, then its own error)."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
        frames = [frame for frame, _ in traceback.walk_tb(unraisable.exc_traceback)]
        return any(f.f_code.co_name == 'call_soon_threadsafe' and 'asyncio' in f.f_code.co_filename for f in frames)
    closed_coroutine = inspect.iscoroutine(unraisable.object) and isinstance(error.__cause__, GeneratorExit)
    return closed_coroutine and 'orbax' in unraisable.object.cr_code.co_filename


class _AbandonedReadsFilter(logging.Filter):
    """Drops asyncio's 'Task / Future exception was never retrieved' records (the abandoned reads' own failures)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (
            record.exc_info
            and message.startswith(('Task exception was never retrieved', 'Future exception was never retrieved'))
        )


@contextlib.contextmanager
def absorb_abandoned_read_reports():
    """Silences the reports of a restore that Orbax abandoned half-way; every other report still goes through.

    Orbax restores a step with many tensorstore reads awaited on one asyncio loop. When one read fails (a damaged
    file, a shape that does not match), the restore raises and closes the loop while the other reads are in
    flight. Each of those then reports `RuntimeError: Event loop is closed` from a tensorstore thread through
    `sys.unraisablehook`, the read coroutines closed unfinished report their own error there too, and the reads
    that failed as well are logged as 'Task exception was never retrieved' when collected: tens of tracebacks that
    read as a crash beside the one warning that names the unreadable step. Inside this context those reports are
    dropped (the abandoned reads are collected before it ends); any other unraisable exception reaches the
    previous hook and any other asyncio record is logged. On exit the previous hook is back (reads that finish
    later are the `Checkpointer`'s to drop, while it lives).
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read_report(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    asyncio_logger, log_filter = logging.getLogger('asyncio'), _AbandonedReadsFilter()
    asyncio_logger.addFilter(log_filter)
    try:
        yield
    finally:
        gc.collect()  # the abandoned reads' futures are reference cycles: report (and drop) them now, not later
        asyncio_logger.removeFilter(log_filter)
        sys.unraisablehook = previous


def _drop_closed_loop_reports(previous):
    """`previous` (an unraisable hook) less the reports of callbacks posted to a closed asyncio loop.

    Reads that Orbax abandoned keep running on tensorstore's threads after the restore has returned; each one that
    finishes later posts to the closed loop and reports `Event loop is closed`, at any later time. Those reports,
    and only those, are dropped."""

    def hook(unraisable):
        error = unraisable.exc_value
        if not (
            isinstance(error, RuntimeError)
            and str(error) == 'Event loop is closed'
            and _is_abandoned_read_report(unraisable)
        ):
            previous(unraisable)

    return hook


def _on_some_processes(x) -> bool:
    """Whether `x` (an array or `jax.ShapeDtypeStruct` with a sharding) lies on the devices of only some of the
    processes: the student of a run whose separate teacher has hosts of its own."""
    placed = getattr(x, 'sharding', None)
    return (
        jax.process_count() > 1
        and isinstance(placed, NamedSharding)
        and len({d.process_index for d in placed.device_set}) < jax.process_count()
    )


def _spread(shape) -> NamedSharding:
    """Where a leaf of `shape` is saved from when its own devices are only some processes': split over every device
    along its first dimension that they divide (replicated when none does). Orbax writes a multi-process
    checkpoint only from arrays that span every process."""
    mesh = sharding.every_device_mesh()
    axis = next((i for i, n in enumerate(shape) if n % mesh.size == 0), None)
    spec = PartitionSpec() if axis is None else PartitionSpec(*([None] * axis + ['devices']))
    return NamedSharding(mesh, spec)


def _moved(tree, to):
    """Each leaf of `tree` that lies on only some processes' devices moved by `to(leaf)`, one leaf at a time
    (`sharding.transfer` holds a moved leaf in full on every device for a moment)."""
    return jax.tree.map(lambda x: sharding.transfer(x, to(x)) if _on_some_processes(x) else x, tree)


class Checkpointer:
    """Saves every `every_steps` steps, keeps the last `keep`, restores the latest readable one."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory) if paths.is_local(directory) else directory  # or gs://...
        self.every_steps = max(every_steps, 1)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # `save` decides; Orbax would also save the first step it sees
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of saves killed mid-write
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))
        # (previous, own) unraisable hooks while this checkpointer drops late reads' reports (`restore_latest`).
        self._hooks = None

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously) when `step` is a multiple of `every_steps` or `force`; returns whether a
        save started."""
        if not (force or step % self.every_steps == 0) or step in self.manager.all_steps():
            return False
        state = _moved(state, lambda x: _spread(x.shape))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """`(step, state, data_state)` of the latest readable checkpoint, or None when there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) shaped like the saved state; the
        restored arrays get those shardings. Unreadable steps newer than the restored one are moved aside with a
        warning. When no step can be read at all, the likelier cause is a train state that does not match the run
        that wrote them (another model or optimizer), so that raises instead of silently starting over.
        """
        if self._hooks is None:  # reads a restore abandons may finish at any later time: until `close`
            self._hooks = (sys.unraisablehook, _drop_closed_loop_reports(sys.unraisablehook))
            sys.unraisablehook = self._hooks[1]
        failures = []
        wanted = abstract_state  # leaves on only some processes' devices are read spread over every device
        abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_spread(x.shape)) if _on_some_processes(x) else x,
            wanted,
        )
        with absorb_abandoned_read_reports():  # a failed restore's in-flight reads report late
            for step in reversed(self.all_steps()):
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                try:
                    restored = self.manager.restore(step, args=args)
                except Exception as e:  # noqa: BLE001 -- any failure to read means this step is not usable
                    reason = (str(e).splitlines() or [''])[0][:200]  # tensorstore errors run to kilobytes
                    failures.append((step, f'{type(e).__name__}: {reason}'))
                    continue
                for bad_step, reason in failures:
                    moved_to = self._set_aside(bad_step)
                    message = (
                        f'checkpoint step {bad_step} in {self.directory} is unreadable ({reason}); moved it to '
                        f'{moved_to} and resuming from the previous good checkpoint, step {step}'
                    )
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    logging.warning(message)
                state = jax.tree.map(
                    lambda x, want: sharding.transfer(x, want.sharding) if _on_some_processes(want) else x,
                    restored['state'],
                    wanted,
                )
                return step, state, restored['data']
        if failures:
            raise ValueError(
                f'none of the checkpoints in {self.directory} (steps {[s for s, _ in failures]}) can be restored '
                f"into this run's train state; does the config match the run that wrote them? "
                f'Latest error: step {failures[0][0]}: {failures[0][1]}'
            )
        return None

    def _set_aside(self, step: int) -> str:
        """Renames an unreadable step so that a later save of the same step number does not collide with it."""
        path = paths.join(self.directory, str(step))
        target, suffix = path + '.corrupt', 0
        while paths.exists(target):
            suffix += 1
            target = f'{path}.corrupt{suffix}'
        if jax.process_index() == 0:
            epath.Path(path).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
        self.manager.reload()
        return epath.Path(target).name

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._hooks is not None:
            previous, own = self._hooks
            if sys.unraisablehook is own:  # not when another hook has been set on top of it since
                sys.unraisablehook = previous
            self._hooks = None
