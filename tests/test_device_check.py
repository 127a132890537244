"""benchmarks/device_check.py: its FLOP count against a closed form, and its `--tiny` run end to end on the CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'device_check.py')


def load_script():
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_flops_closed_form():
    """6 x N x tokens plus causal attention, N counted by hand for the 1.5B shape (untied head, no input
    embedding): 28 layers of q, k, v, o (1536 x 128 x (12 + 2 + 2 + 12)) and the MLP (3 x 1536 x 8960)."""
    dc = load_script()
    args = dc.parse_args([])
    c = dc.load_model_config(args)
    n = 28 * (1536 * 128 * 28 + 3 * 1536 * 8960) + 151936 * 1536
    assert n == pytest.approx(1.543e9, rel=1e-3)  # the 1.5B shape without its input embedding (1.78B with it)
    lengths = [4096, 1000]
    expected = 6 * n * 5096 + 6 * 28 * 12 * 128 * (4096**2 + 1000**2)
    assert dc.model_flops(c, lengths) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / 'check.json'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--tiny', '--repeats=1', f'--out={out}'],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert json.loads(out.read_text()) == result
    assert result['benchmark'] == 'device_check' and result['tiny'] is True and result['backend'] == 'cpu'

    positive = lambda x: isinstance(x, float | int) and math.isfinite(x) and x > 0
    train = result['train']
    assert 'error' not in train, train
    assert 'skipped' in train['cudnn']  # cuDNN needs an NVIDIA GPU
    for variant in ('blockwise', 'packed'):
        v = train[variant]
        assert 'error' not in v, v
        for name in ('step_time_s', 'tokens_per_s', 'mfu', 'model_tflops_per_step', 'compile_s'):
            assert positive(v[name]), (variant, name, v[name])
        assert v['skipped'] == 0.0 and math.isfinite(v['loss'])
        assert v['tokens_per_s'] == pytest.approx(v['real_tokens'] / v['step_time_s'], rel=1e-3)
        assert v['step_time_s'] == pytest.approx(float(np.median(v['step_seconds'])), abs=1e-4)
    assert train['blockwise']['padding_fraction'] == 0.0 and train['blockwise']['real_tokens'] == 2 * 64
    packed = train['packed']
    assert packed['rows'] == 2 and packed['rollouts'] > packed['rows']  # several rollouts share a row
    assert packed['padding_fraction'] == pytest.approx(1 - packed['real_tokens'] / (2 * 64), abs=1e-4)

    sampler = result['sampler']
    assert 'error' not in sampler, sampler
    for name in ('tokens_per_s', 'bandwidth_bound_tokens_per_s', 'fraction_of_bandwidth_bound'):
        assert positive(sampler[name]), (name, sampler[name])
    assert sampler['tokens_per_s'] == pytest.approx(4 * 16 / sampler['time_s'], rel=1e-3)
    assert sampler['fraction_of_bandwidth_bound'] == pytest.approx(
        sampler['tokens_per_s'] / sampler['bandwidth_bound_tokens_per_s'], rel=1e-3
    )
