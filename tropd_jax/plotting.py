"""Training curves from a run's `metrics.jsonl`, to PNG.

    python -m tropd_jax.plotting --metrics=runs/tiny/metrics.jsonl --out=runs/tiny/plots

writes `curves.png` (every known metric the file holds, one panel each) and `figure3.png` (student entropy and
gradient norm over steps, the curves the paper argues from in its Figure 3). `plot_runs` puts several runs or methods
on one figure, with the mean over seeds and a min-max band when a label has several runs.

The reader is tolerant on purpose: a metric may be missing, logged only every few steps (evaluation), or namespaced
(`train/grad_norm`); a run that was killed may end in a half-written line; a resumed run may log a step twice (the
last record of a step wins). Only matplotlib's object-oriented API is used, so importing this module changes no
global plotting state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

# Panels in display order: (title, candidate metric names). The first name found in the records is plotted; a name
# also matches any namespaced form ending in "/name" (e.g. "train/student_entropy").
PANELS = (
    ('student entropy', ('student_entropy',)),
    ('gradient norm (pre-clip)', ('grad_norm', 'gradient_norm')),
    ('update norm (after the optimizer)', ('update_norm',)),
    ('loss', ('loss',)),
    ('policy-gradient term', ('pg_loss',)),
    ('top-k FKL term', ('fkl_loss',)),
    ('prefix term', ('prefix_loss',)),
    ('trust fraction (mean M_t)', ('trust_fraction',)),
    ('mean P_t', ('trust_probability', 'mean_trust_probability')),
    ('mean reward r_t', ('reward', 'mean_reward')),
    ('outlier fraction', ('outlier_fraction', 'clipped_fraction', 'masked_fraction')),
    ('teacher entropy', ('teacher_entropy',)),
    ("teacher's mass in its top-k", ('teacher_topk_mass',)),
    ("student's mass on the teacher's top-k", ('student_topk_mass',)),
    ('prefix-token fraction', ('prefix_fraction',)),
    ('max prefix length L_max', ('max_prefix_length', 'prefix_max_length', 'l_max')),
    ('mean prefix length', ('prefix_length',)),
    ('response length', ('response_length', 'mean_response_length')),
    ('truncated fraction', ('truncated_fraction',)),
    ('eval accuracy (avg@k)', ('eval_avg_at_k', 'eval_accuracy', 'avg_at_k', 'accuracy')),
    ('eval pass@k', ('eval_pass_at_k', 'pass_at_k')),
    ('learning rate', ('learning_rate', 'lr')),
    ('skipped steps', ('skipped_steps',)),
    ('tokens / s', ('tokens_per_second',)),
    ('padding fraction (of tokens computed)', ('padding_fraction',)),
)

FIGURE3 = ('student_entropy', 'grad_norm')


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file, one dict per line, in file order.

    A line that does not parse is skipped only when it is the last one (a run killed mid-write); anywhere else it
    raises a ValueError naming the line, since that file is not a metrics log.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'metrics file {path!r} does not exist')
    with open(path, encoding='utf-8') as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                break
            raise ValueError(f'{path}:{i}: not a JSON line ({e.msg})') from None
        if not isinstance(record, dict):
            raise ValueError(f'{path}:{i}: expected a JSON object, got {type(record).__name__}')
        records.append(record)
    return records


def find_key(records: Sequence[dict], names: Sequence[str]) -> str | None:
    """The first of `names` present in `records` (exactly, or as a namespaced "prefix/name"), or None."""
    present = set()
    for r in records:
        present.update(r)
    for name in names:
        if name in present:
            return name
        namespaced = sorted(k for k in present if k.endswith('/' + name))
        if namespaced:
            return namespaced[0]
    return None


def _number(value) -> float | None:
    if isinstance(value, str) and value.lower() in ('nan', 'inf', '-inf', 'infinity', '-infinity'):
        return float(value)  # the trainer's writer stores non-finite values as strings to keep valid JSON
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [n], values [n]) of `key`, sorted by step; the last record of a repeated step wins.

    Records without a "step" use their position in the file. Non-numeric values are dropped; NaN / Inf are kept
    (matplotlib leaves a gap), since a non-finite step is worth seeing.
    """
    by_step = {}
    for i, r in enumerate(records):
        value = _number(r.get(key))
        if value is None:
            continue
        step = _number(r.get('step'))
        by_step[int(step) if step is not None else i] = value
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with `weight` in [0, 1) (0 = raw), bias-corrected like TensorBoard's."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f'smoothing weight {weight!r} must be in [0, 1)')
    if weight == 0.0:
        return values
    out, avg, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            avg = weight * avg + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
        out[i] = avg / norm if norm > 0 else v
    return out


def _load(run) -> list[dict]:
    return read_metrics(run) if isinstance(run, (str, os.PathLike)) else list(run)


def available_panels(records: Sequence[dict]) -> list[tuple[str, str]]:
    """(title, key) of each panel whose metric the records hold."""
    out = []
    for title, names in PANELS:
        key = find_key(records, names)
        if key is not None and len(series(records, key)[0]):
            out.append((title, key))
    return out


def _figure(num_panels: int, columns: int):
    from matplotlib.figure import Figure

    columns = max(1, min(columns, num_panels))
    rows = math.ceil(num_panels / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout='constrained')
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def _style(ax, title: str, key: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    ax.set_xlabel('step', fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if key.endswith(('grad_norm', 'gradient_norm', 'update_norm')):
        ax.set_yscale('log')  # OPD's spikes span orders of magnitude; a linear axis hides TrOPD's curve
    else:
        ax.ticklabel_format(axis='y', useOffset=False)


def plot_run(run, out_dir: str, *, smoothing: float = 0.0, title: str | None = None) -> list[str]:
    """Writes `curves.png` (all known metrics present) and, when it has either curve, `figure3.png`.

    Args:
      run: a metrics.jsonl path or its list of records.
      out_dir: created if needed.
      smoothing: EMA weight in [0, 1) applied to every curve (evaluation metrics are never smoothed).
    Returns:
      the paths written.
    """
    records = _load(run)
    panels = available_panels(records)
    if not panels:
        known = sorted({n for _, names in PANELS for n in names})
        raise ValueError(f'no known metric in {len(records)} records; known names: {known}')
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, chosen in (('curves.png', panels), ('figure3.png', [p for p in panels if _is_figure3(p[1])])):
        if not chosen:
            continue
        fig, axes = _figure(len(chosen), columns=4 if name == 'curves.png' else 2)
        for ax, (panel_title, key) in zip(axes, chosen):
            steps, values = series(records, key)
            weight = 0.0 if key.startswith('eval') else smoothing
            ax.plot(steps, smooth(values, weight), marker='o' if len(steps) < 20 else None, ms=3)
            _style(ax, panel_title, key)
        if title:
            fig.suptitle(title)
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _is_figure3(key: str) -> bool:
    return any(key == k or key.endswith('/' + k) for k in (*FIGURE3, 'gradient_norm'))


def plot_runs(
    runs: Mapping[str, Sequence],
    out_path: str,
    *,
    metrics: Sequence[str] = FIGURE3,
    smoothing: float = 0.0,
    title: str | None = None,
) -> str:
    """Several runs (e.g. one label per method) on one figure, one panel per metric.

    Args:
      runs: label -> list of runs (metrics.jsonl paths or record lists), e.g. the seeds of one method. With several
        runs a label is drawn as the mean over runs at the steps they share, with a min-max band.
      out_path: the PNG written.
      metrics: metric names (or aliases from `PANELS`) to plot; one missing from every run is left out.
    Returns:
      out_path.
    """
    if not runs:
        raise ValueError('plot_runs needs at least one run')
    loaded = {label: [_load(r) for r in group] for label, group in runs.items()}
    for label, group in loaded.items():
        if not group:
            raise ValueError(f'label {label!r} has no runs')
    panels = []
    for metric in metrics:
        names = next((names for _, names in PANELS if metric in names), (metric,))
        title_ = next((t for t, names in PANELS if metric in names), metric)
        if any(find_key(r, names) for group in loaded.values() for r in group):
            panels.append((title_, names))
    if not panels:
        raise ValueError(f'none of the metrics {list(metrics)} is in any run')
    fig, axes = _figure(len(panels), columns=min(len(panels), 3))
    for ax, (panel_title, names) in zip(axes, panels):
        key = None
        for i, (label, group) in enumerate(loaded.items()):
            curves = []
            for records in group:
                key = find_key(records, names)
                if key is not None:
                    curves.append(series(records, key))
            if not curves:
                continue
            steps, mean, low, high = mean_over_runs(curves)
            weight = 0.0 if names[0].startswith('eval') else smoothing
            color = f'C{i % 10}'
            ax.plot(
                steps, smooth(mean, weight), color=color, label=label, marker='o' if len(steps) < 20 else None, ms=3
            )
            if len(curves) > 1:
                ax.fill_between(steps, smooth(low, weight), smooth(high, weight), color=color, alpha=0.2, lw=0)
        _style(ax, panel_title, key or names[0])
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


def mean_over_runs(curves: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Mean, min and max over curves at the steps all of them share: (steps, mean, low, high)."""
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    stacked = np.stack([v[np.searchsorted(s, steps)] for s, v in curves])
    return steps, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--metrics',
        required=True,
        nargs='+',
        help='metrics.jsonl of a run; several files are drawn together on one figure',
    )
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--labels', nargs='*', default=None, help='one label per --metrics file')
    parser.add_argument('--smoothing', type=float, default=0.0, help='EMA weight in [0, 1)')
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401 -- the base install does not bring it
    except ImportError:
        raise SystemExit(
            "error: plotting needs matplotlib, which the plot extra brings: pip install -e '.[plot]'"
        ) from None
    if len(args.metrics) == 1:
        for path in plot_run(args.metrics[0], args.out, smoothing=args.smoothing, title=args.metrics[0]):
            print(path)
        return
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(m))) for m in args.metrics]
    if len(labels) != len(args.metrics):
        raise SystemExit(f'--labels has {len(labels)} entries for {len(args.metrics)} --metrics files')
    runs = {}
    for label, path in zip(labels, args.metrics):
        runs.setdefault(label, []).append(path)
    names = [n for _, aliases in PANELS for n in aliases[:1]]
    print(plot_runs(runs, os.path.join(args.out, 'figure3.png'), smoothing=args.smoothing))
    print(plot_runs(runs, os.path.join(args.out, 'curves.png'), metrics=names, smoothing=args.smoothing))


if __name__ == '__main__':
    main()
