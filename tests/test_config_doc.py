"""docs/config.md is generated from `default_config()` (scripts/make_config_doc.py) and must be current."""

import os
import subprocess
import sys

from tropd_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'make_config_doc.py')


def test_config_doc_is_current():
    result = subprocess.run([sys.executable, SCRIPT, '--check'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr + '\nRegenerate it: python scripts/make_config_doc.py'


def test_config_doc_lists_every_field_with_its_default():
    with open(os.path.join(ROOT, 'docs', 'config.md')) as f:
        rows = {line.split('|')[1].strip(' `'): line.split('|')[2].strip(' `') for line in f if line.startswith('| `')}
    config = config_lib.default_config()
    expected = {f'{s}.{f}' for s in config.keys() for f in config[s].keys()}
    assert set(rows) == expected
    assert rows['rollout.max_new_tokens'] == str(config.rollout.max_new_tokens)
    assert rows['model.attention'] == f"'{config.model.attention}'"
