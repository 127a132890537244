"""Metric writers: one JSON line per step (easy to plot), TensorBoard scalars, optionally Weights & Biases, and a
live progress bar.

Only process 0 writes; every other process gets writers that do nothing, so callers never branch on the process.
"""

import hashlib
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from tropd_jax import paths


def _plain(value):
    """A JSON-friendly Python scalar (NaN / inf become strings so the file stays valid JSON)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def wandb_settings(config, workdir: str) -> dict | None:
    """`wandb.init` keyword arguments from the `log` fields of a trainer config, or None with `log.wandb` off. The run
    id is derived from `workdir`, so a resumed run (same workdir) continues the same W&B run."""
    log = config.log
    if not log.get('wandb', False):
        return None
    return dict(
        project=log.wandb_project,
        entity=log.wandb_entity or None,
        name=log.wandb_name or os.path.basename(workdir.rstrip('/')),
        id=hashlib.sha256(workdir.encode()).hexdigest()[:16],
        resume='allow',
        config=config.to_dict(),
    )


def _start_wandb(settings: dict):
    try:
        import wandb
    except ImportError:
        raise ImportError('log.wandb=True needs the wandb package: pip install -e ".[wandb]"') from None
    return wandb.init(**settings)


class MetricsWriter:
    """Appends `{"step": s, **metrics}` to `workdir/metrics.jsonl` and, optionally, TensorBoard events under
    `workdir/tensorboard` and a Weights & Biases run (`wandb`: `wandb.init` keyword arguments, `wandb_settings`).
    Scalars only; non-numeric values go to the JSONL file alone. `workdir` may be a `gs://` URL: object stores cannot
    append, so there the JSONL file is rewritten with every row."""

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        filename: str = 'metrics.jsonl',
        wandb: dict | None = None,
    ):
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        self._wandb = None
        self._remote_text = None
        if not enabled:
            return
        self.path = paths.join(workdir, filename)
        if paths.is_local(workdir):
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, 'a', encoding='utf-8')
        else:
            self._remote_text = ''
            if paths.exists(self.path):
                with paths.open_file(self.path, encoding='utf-8') as f:
                    self._remote_text = f.read()
        if tensorboard:
            from tensorboardX import SummaryWriter  # writes gs:// itself (google-cloud-storage)

            self._tensorboard = SummaryWriter(paths.join(workdir, 'tensorboard'))
        if wandb is not None:
            self._wandb = _start_wandb(wandb)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(row) + '\n')
            self._file.flush()
        else:
            self._remote_text += json.dumps(row) + '\n'
            with paths.open_file(self.path, 'w', encoding='utf-8') as f:
                f.write(self._remote_text)
        if self._tensorboard is not None:
            for name, value in row.items():
                if name != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(name, value, int(step))
            self._tensorboard.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            scalars.pop('step')
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str) -> list[dict]:
    """One dict per step, in step order. Rows of the same step are merged, later values winning: a resumed run
    rewrites the steps after its checkpoint, and evaluation results join the training row of their step."""
    rows = {}
    with paths.open_file(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row['step'], {}).update(row)
    return [rows[s] for s in sorted(rows)]


class ProgressBar:
    """A tqdm bar over training steps whose postfix shows loss, the rollout / train time split and tokens/s;
    tqdm itself gives the rate and ETA."""

    def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True, file=None):
        self._bar = None
        self._enabled, self._file = enabled, file
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True, file=file, mininterval=0
            )

    def update(self, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        postfix = {}
        for name, label, fmt in (
            ('loss', 'loss', '.4g'),
            ('rollout_time', 'rollout', '.1f'),
            ('train_time', 'train', '.1f'),
            ('tokens_per_second', 'tok/s', '.0f'),
        ):
            if name in metrics:
                postfix[label] = format(float(metrics[name]), fmt)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, text: str) -> None:
        """Prints a line above the bar (or plainly once the bar is closed)."""
        if not self._enabled:
            return
        if self._bar is None:
            print(text, file=self._file, flush=True)
        else:
            self._bar.write(text, file=self._file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
