"""The notebooks execute top to bottom on CPU (quickstart in its short CI setting) and show what they claim."""

import json
import os
import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # executes the notebooks

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'


def execute(name: str) -> list[dict]:
    """Runs a notebook in a fresh kernel (cwd = notebooks/); returns the outputs of its code cells, in order."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=None, kernel_name='python3', resources={'metadata': {'path': str(NOTEBOOKS)}}
    )
    client.execute()
    return [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]


def text_of(outputs) -> str:
    return ''.join(o.get('text', '') for o in outputs if o['output_type'] == 'stream')


def test_losses_notebook():
    outputs = execute('losses.ipynb')
    text = text_of(outputs)
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 3
    # The sampled trust fraction estimates 1 - TV(student, teacher) (speculative decoding's acceptance rate).
    sampled, error = map(
        float, re.search(r'trust_fraction \(sampled\)\s+= ([\d.]+) \(standard error ([\d.]+)\)', text).groups()
    )
    exact = float(re.search(r'1 - TV\(student, teacher\)\s+= ([\d.]+)', text).group(1))
    assert abs(sampled - exact) < 5 * error + 1e-3
    # Far outside the trust region, OPD's gradient is large and the FKL's small.
    opd, fkl, tropd = map(float, re.search(r'OPD ([\d.]+), FKL ([\d.]+), TrOPD \(expected\) ([\d.]+)', text).groups())
    assert opd > 10.0 and fkl < 1.5 and tropd < 1.5
    # Every method printed a row.
    from tropd_jax import losses

    for method in losses.METHODS:
        assert re.search(rf'^{method}\s+-?[\d.]+', text, re.M), method


def test_quickstart_notebook(tmp_path, monkeypatch):
    steps = 2
    monkeypatch.setenv('QUICKSTART_STEPS', str(steps))
    monkeypatch.setenv('QUICKSTART_EVAL_PROBLEMS', '4')
    monkeypatch.setenv('QUICKSTART_WORKDIR', str(tmp_path))
    outputs = execute('quickstart.ipynb')
    # It trained for STEPS steps, evaluated before and after, and exported the student.
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert max(r['step'] for r in rows if 'grad_norm' in r) == steps
    assert sorted(r['step'] for r in rows if 'eval_avg_at_k' in r) == [0, steps]
    assert (tmp_path / 'hf' / 'config.json').is_file()
    # The curves and the token viewer are shown.
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 2
    pages = [o['data']['text/html'] for o in outputs if 'text/html' in o.get('data', {})]
    assert any(page.count('class="rollout"') == 4 and 'trust region' in page for page in pages)
    assert 'held-out accuracy at step 0' in text_of(outputs)
    assert not os.path.exists(NOTEBOOKS / 'tropd_jax_repo')  # the install cell is a no-op in a checkout
