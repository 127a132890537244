"""The optional Weights & Biases writer: off by default, and with `log.wandb=True` the same scalars as TensorBoard."""

import sys
import types

import pytest

from tropd_jax import config as config_lib
from tropd_jax import metrics


class FakeRun:
    def __init__(self, **settings):
        self.settings, self.logged, self.finished = settings, [], False

    def log(self, row, step):
        self.logged.append((step, row))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, 'wandb', module)
    return runs


def test_wandb_is_off_by_default(fake_wandb, tmp_path):
    config = config_lib.default_config()
    assert metrics.wandb_settings(config, str(tmp_path)) is None
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, wandb=None)
    writer.write(1, {'loss': 0.5})
    writer.close()
    assert fake_wandb == []


def test_wandb_gets_the_scalars_of_every_row(fake_wandb, tmp_path):
    config = config_lib.default_config()
    config.log.wandb, config.log.wandb_project = True, 'distil'
    workdir = str(tmp_path / 'run-a')
    settings = metrics.wandb_settings(config, workdir)
    assert settings['project'] == 'distil' and settings['name'] == 'run-a' and settings['resume'] == 'allow'
    assert settings['id'] == metrics.wandb_settings(config, workdir)['id']  # a resumed run continues the same run
    assert settings['id'] != metrics.wandb_settings(config, str(tmp_path / 'run-b'))['id']
    assert settings['config']['loss']['method'] == 'tropd'
    writer = metrics.MetricsWriter(workdir, tensorboard=False, wandb=settings)
    writer.write(3, {'loss': 0.25, 'skipped': 0, 'note': 'text', 'flag': True})
    writer.close()
    (run,) = fake_wandb
    assert run.logged == [(3, {'loss': 0.25, 'skipped': 0})] and run.finished
    assert [r['loss'] for r in metrics.read_metrics(f'{workdir}/metrics.jsonl')] == [0.25]  # JSONL as before


def test_wandb_only_on_the_writing_process(fake_wandb, tmp_path):
    config = config_lib.default_config()
    config.log.wandb = True
    writer = metrics.MetricsWriter(str(tmp_path), enabled=False, wandb=metrics.wandb_settings(config, str(tmp_path)))
    writer.write(1, {'loss': 1.0})
    assert fake_wandb == []


def test_wandb_without_the_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
        metrics.MetricsWriter(str(tmp_path), tensorboard=False, wandb={'project': 'p'})
