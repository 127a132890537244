"""Tests for tropd_jax/main.py: config files, `:arg` variants, `--config.a.b=v` overrides and CLI errors."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from tropd_jax import main, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_and_run(argv, monkeypatch, *, record=True):
    """Parses `argv` like the command line and runs main; with `record`, the trainer is replaced by a recorder."""
    calls = []
    if record:
        monkeypatch.setattr(
            train,
            'train_and_evaluate',
            lambda config, workdir, export_only: calls.append((config, workdir, export_only)),
        )
    monkeypatch.setattr(sys, 'argv', ['tropd_jax.main'] + argv)  # config overrides are read from sys.argv
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(sys.argv)
        main.main(['tropd_jax.main'])
    assert len(calls) == 1
    return calls[0]


def test_overrides_reach_the_trainer(monkeypatch, tmp_path):
    config, workdir, export_only = parse_and_run(
        [
            f'--config={ROOT / "configs" / "math.py"}',
            f'--workdir={tmp_path}',
            '--config.loss.method=opd',
            '--config.train.steps=7',
            '--config.optim.learning_rate=1e-4',
            '--config.mesh.tensor=2',
            '--config.prefix.enabled=True',  # a None default (per method) that the command line can still set
        ],
        monkeypatch,
    )
    assert workdir == str(tmp_path) and not export_only
    assert (
        config.loss.method,
        config.train.steps,
        config.optim.learning_rate,
        config.mesh.tensor,
        config.prefix.enabled,
    ) == ('opd', 7, 1e-4, 2, True)
    assert config.loss.k == 64  # untouched fields keep the recipe's values


def test_config_arg_variant(monkeypatch, tmp_path):
    config, _, export_only = parse_and_run(
        [f'--config={ROOT / "configs" / "math.py"}:tiny', f'--workdir={tmp_path}', '--export_only'], monkeypatch
    )
    assert config.train.steps == 20 and config.loss.method == 'tropd' and export_only
    assert config.model.student_path.endswith(os.path.join('tiny', 'student'))


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.loss.method=grpo', "loss.method='grpo' is not one of"),
        ('--config.train.micro_batch_size=7', 'train.micro_batch_size=7 does not divide the batch of 512 sequences'),
        ('--config.model.student_path=/nonexistent/ckpt', "model.student_path='/nonexistent/ckpt' is not a checkpoint"),
    ],
)
def test_invalid_values_stop_before_anything_runs(monkeypatch, tmp_path, override, message):
    # The real trainer: validation is its first action, so nothing is loaded or written.
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        parse_and_run(
            [f'--config={ROOT / "configs" / "math.py"}', f'--workdir={tmp_path}', override], monkeypatch, record=False
        )
    assert not os.listdir(tmp_path)


def test_workdir_is_required(monkeypatch):
    with pytest.raises(flags.IllegalFlagValueError, match='workdir'):
        parse_and_run([f'--config={ROOT / "configs" / "math.py"}'], monkeypatch)


def test_cli_rejects_an_unknown_field_in_one_line(tmp_path):
    """The real command line: a typo in a field name is one line naming the field and the suggestion, exit 2."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'tropd_jax.main',
            '--config=configs/math.py',
            f'--workdir={tmp_path}',
            '--config.loss.methd=opd',
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "error: unknown config field 'loss.methd'; did you mean 'loss.method'?"
    assert 'Traceback' not in result.stderr, result.stderr


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.trian.steps=2', "unknown config field 'trian.steps'; did you mean 'train.steps'?"),
        ('--config.xyzzy=2', "unknown config field 'xyzzy'"),
        ('--config.train.steps.x=2', "unknown config field 'train.steps.x'"),
    ],
)
def test_unknown_override_messages(monkeypatch, capsys, override, message):
    argv = ['tropd_jax.main', f'--config={ROOT / "configs" / "tiny.py"}', '--workdir=unused', override]
    monkeypatch.setattr(sys, 'argv', argv)  # config overrides are read from sys.argv
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        flags.FLAGS.unparse_flags()
        main.parse_flags(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f'error: {message}\n'


def test_other_errors_keep_their_traceback():
    """A recipe's own bug is not an unknown override: it is re-raised as it is."""
    error = AttributeError(KeyError('Key "lr" does not exist and cannot be added since the config is locked.'))
    assert main.unknown_override(error, ['tropd_jax.main', '--config=c.py', '--config.train.steps=2']) is None
