"""Entry point: `python -m tropd_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=value ...]`.

Only parses flags, joins a multi-process run when asked, and calls `train.train_and_evaluate(config, workdir)`.
Running the same command again resumes from the latest checkpoint in `--workdir`; adding `--export_only` writes that
checkpoint's student to `--workdir/hf` as a Hugging Face checkpoint without training.

Multi-process (a TPU pod slice, a GPU cluster, or several processes on one machine): pass `--coordinator_address`,
`--num_processes` and `--process_id`, or set `--distributed` to let `jax.distributed.initialize()` detect them from
the environment (TPU pods, SLURM, Open MPI). Every process runs the same command; process 0 writes the logs.
"""

import logging
import re
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from tropd_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/NAME.py[:ARG]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the exported student.')
_EXPORT_ONLY = flags.DEFINE_bool(
    'export_only',
    False,
    'Export the latest checkpoint in --workdir to --workdir/hf (a Hugging Face checkpoint) without training.',
)
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with settings detected from the environment.'
)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds',
    100,
    'Multi-process runs: a process that has not been heard from for this long is taken as dead, and every other '
    "process exits with an error instead of waiting for it (jax.distributed's heartbeat timeout).",
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    'shutdown_timeout_seconds',
    300,
    'Multi-process runs: how long a finished process waits at exit for the others before giving up.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
    """Joins the multi-process run described by the flags; a single-process run does nothing."""
    explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
    timeouts = dict(
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value, shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT.value
    )
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError(
                '--coordinator_address, --num_processes and --process_id go together; got '
                f'{_COORDINATOR.value!r}, {_NUM_PROCESSES.value!r}, {_PROCESS_ID.value!r}'
            )
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, **timeouts)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize(**timeouts)


class _ProjectInfoOnly(logging.Filter):
    """Keeps the console readable: INFO lines from this package, warnings and errors from everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or 'tropd_jax' in record.pathname


def unknown_override(error: Exception, argv: list[str]) -> str | None:
    """The one-line message for a `--config.a.b` override of a field the config does not have, or None when
    `error` is not about one of the overrides in `argv`.

    ml_collections reports that as a KeyError (wrapped in an AttributeError) naming only the missing key, e.g.
    `'stepz'\nDid you mean "steps" instead of "stepz"?`, so the override is found by that key.
    """
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first_line, _, rest = text.partition('\n')
    missing = first_line.strip('\'"')
    suggestion = re.search(r'Did you mean "([^"]+)"', rest)
    for arg in argv[1:]:
        match = re.match(r'--?config\.([^=\s]+)', arg)
        if not match:
            continue
        path = match.group(1)
        parts = path.split('.')
        if missing in parts:
            message = f'unknown config field {path!r}'
            if suggestion:
                parts[parts.index(missing)] = suggestion.group(1)
                message += f'; did you mean {".".join(parts)!r}?'
            return message
        if text.endswith(f'Attempting to lookup: {path}'):  # a field below a value, e.g. train.steps.x
            return f'unknown config field {path!r}'
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of an unknown config field is one line on stderr (exit 2)
    instead of ml_collections' three chained tracebacks; any other error keeps its traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = unknown_override(e, argv)
        if message is None:
            raise
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if absl_logging.get_verbosity() <= absl_logging.INFO:  # --verbosity=1 (debug) shows every library's INFO
        absl_logging.get_absl_handler().addFilter(_ProjectInfoOnly())
    initialize_distributed()
    logging.info(
        'JAX process %d/%d, %d local / %d global devices (%s)',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, export_only=_EXPORT_ONLY.value)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
