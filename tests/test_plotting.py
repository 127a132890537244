"""tropd_jax.plotting: tolerant metrics reading, the curves it draws, and the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('matplotlib')
from matplotlib import image as mpimg  # noqa: E402

from tropd_jax import plotting  # noqa: E402


def _write(path, records, tail=''):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records) + tail)
    return path


def _records(steps=30, grad_scale=1.0, entropy_slope=0.01, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        r = {
            'step': s,
            'student_entropy': 1.0 - entropy_slope * s,
            'grad_norm': grad_scale * (1.0 + abs(rng.normal())),
            'loss': float(rng.normal()),
            'learning_rate': 1e-3,
        }
        if s % 10 == 0:
            r['eval_avg_at_k'] = 0.1 + 0.01 * s
        out.append(r)
    return out


def test_read_metrics_skips_a_truncated_last_line_only(tmp_path):
    path = _write(tmp_path / 'm.jsonl', _records(5), tail='{"step": 5, "lo')
    assert [r['step'] for r in plotting.read_metrics(str(path))] == [0, 1, 2, 3, 4]
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2'):
        plotting.read_metrics(str(bad))
    with pytest.raises(FileNotFoundError, match='missing.jsonl'):
        plotting.read_metrics(str(tmp_path / 'missing.jsonl'))


def test_series_sorts_steps_and_last_record_of_a_step_wins():
    # A resumed run re-logs steps 2 and 3 after restoring the step-2 checkpoint.
    records = [{'step': s, 'loss': float(s)} for s in range(4)]
    records += [{'step': 2, 'loss': 20.0}, {'step': 3, 'loss': 30.0, 'note': 'x'}, {'step': 4, 'other': 1.0}]
    steps, values = plotting.series(records, 'loss')
    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(values, [0.0, 1.0, 20.0, 30.0])
    # The trainer's writer stores non-finite values as strings (valid JSON); they stay visible as NaN / inf.
    steps, values = plotting.series(
        [{'step': 0, 'loss': 'nan'}, {'step': 1, 'loss': 'inf'}, {'step': 2, 'loss': 'x'}], 'loss'
    )
    np.testing.assert_array_equal(steps, [0, 1])
    assert np.isnan(values[0]) and values[1] == np.inf


def test_find_key_accepts_aliases_and_namespaced_names():
    records = [{'step': 0, 'train/grad_norm': 1.0, 'lr': 0.1}]
    assert plotting.find_key(records, ('grad_norm',)) == 'train/grad_norm'
    assert plotting.find_key(records, ('learning_rate', 'lr')) == 'lr'
    assert plotting.find_key(records, ('student_entropy',)) is None
    titles = [t for t, _ in plotting.available_panels(records)]
    assert titles == ['gradient norm (pre-clip)', 'learning rate']


def test_smooth_is_a_bias_corrected_ema():
    values = np.array([1.0, 5.0, -2.0, 3.0])
    w = 0.6
    # Closed form: s_n = sum_i w^(n-i) (1-w) v_i / (1 - w^(n+1)).
    expected = [
        sum(w ** (n - i) * (1 - w) * values[i] for i in range(n + 1)) / (1 - w ** (n + 1)) for n in range(len(values))
    ]
    np.testing.assert_allclose(plotting.smooth(values, w), expected, rtol=1e-12)
    np.testing.assert_array_equal(plotting.smooth(values, 0.0), values)
    with pytest.raises(ValueError, match='1.5'):
        plotting.smooth(values, 1.5)


def test_mean_over_runs_uses_shared_steps():
    a = (np.array([0, 1, 2, 3]), np.array([1.0, 2.0, 3.0, 4.0]))
    b = (np.array([1, 2, 3, 4]), np.array([10.0, 20.0, 30.0, 40.0]))
    steps, mean, low, high = plotting.mean_over_runs([a, b])
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(mean, [6.0, 11.5, 17.0])
    np.testing.assert_allclose(low, [2.0, 3.0, 4.0])
    np.testing.assert_allclose(high, [10.0, 20.0, 30.0])


def _has_colour(png, rgb, tol=0.08, min_pixels=30):
    image = mpimg.imread(png)[..., :3]
    close = np.all(np.abs(image - np.array(rgb)) < tol, axis=-1)
    return close.sum() >= min_pixels


C0 = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # matplotlib's first and second cycle colours
C1 = (0xFF / 255, 0x7F / 255, 0x0E / 255)


def test_plot_run_writes_curves_and_figure3(tmp_path):
    path = _write(tmp_path / 'metrics.jsonl', _records())
    written = plotting.plot_run(str(path), str(tmp_path / 'plots'), smoothing=0.3)
    assert [p.rsplit('/', 1)[-1] for p in written] == ['curves.png', 'figure3.png']
    curves, figure3 = (mpimg.imread(p) for p in written)
    # 5 panels (entropy, grad norm, loss, eval accuracy, lr) on a 4-column grid is two rows; Figure 3 is one.
    assert curves.shape[0] > 1.5 * figure3.shape[0]
    assert _has_colour(written[1], C0)


def test_plot_run_without_figure3_metrics_and_without_any_known_metric(tmp_path):
    written = plotting.plot_run([{'step': 0, 'loss': 1.0}, {'step': 1, 'loss': 0.5}], str(tmp_path))
    assert [p.rsplit('/', 1)[-1] for p in written] == ['curves.png']
    with pytest.raises(ValueError, match='no known metric'):
        plotting.plot_run([{'step': 0, 'mystery': 1.0}], str(tmp_path))


def test_plot_runs_draws_every_label(tmp_path):
    runs = {
        'opd': [_records(grad_scale=5.0, entropy_slope=0.03, seed=s) for s in range(2)],
        'tropd': [_records(seed=s) for s in range(2)],
    }
    out = plotting.plot_runs(runs, str(tmp_path / 'fig' / 'figure3.png'))
    assert _has_colour(out, C0) and _has_colour(out, C1)
    with pytest.raises(ValueError, match='none of the metrics'):
        plotting.plot_runs(runs, str(tmp_path / 'x.png'), metrics=('nonexistent',))
    with pytest.raises(ValueError, match="'empty' has no runs"):
        plotting.plot_runs({'empty': []}, str(tmp_path / 'x.png'))


def test_cli(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    a = _write(tmp_path / 'a' / 'metrics.jsonl', _records())
    b = _write(tmp_path / 'b' / 'metrics.jsonl', _records(seed=1))
    run = [sys.executable, '-m', 'tropd_jax.plotting']
    single = subprocess.run(run + [f'--metrics={a}', f'--out={tmp_path / "one"}'], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    assert (tmp_path / 'one' / 'curves.png').is_file() and (tmp_path / 'one' / 'figure3.png').is_file()
    both = subprocess.run(
        run + ['--metrics', str(a), str(b), f'--out={tmp_path / "two"}'], capture_output=True, text=True
    )
    assert both.returncode == 0, both.stderr
    assert _has_colour(str(tmp_path / 'two' / 'figure3.png'), C1)


def test_cli_without_matplotlib_says_which_extra(tmp_path, monkeypatch):
    path = _write(tmp_path / 'metrics.jsonl', _records())
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # what `pip install -e .` alone leaves
    with pytest.raises(SystemExit, match=r"plotting needs matplotlib.*pip install -e '\.\[plot\]'"):
        plotting.main([f'--metrics={path}', f'--out={tmp_path / "plots"}'])
