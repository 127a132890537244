"""The README's Python example runs as written, and its commands name files that exist."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def test_python_examples_run():
    blocks = re.findall(r'```python\n(.*?)```', README, re.S)
    assert blocks, 'the README should show the loss API'
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, 'README.md', 'exec'), namespace)
        assert float(namespace['loss']) == float(namespace['metrics']['loss'])


def test_setup_commands_name_existing_files():
    commands = re.findall(r'```bash\n(.*?)```', README, re.S)
    assert len(commands) >= 2, 'the README should give the run command and the test command'
    paths = re.findall(r'((?:configs|examples)/[\w./]+\.py)', '\n'.join(commands))
    assert paths, 'the first set-up command should run a script or config of the project'
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_ci_runs_the_first_command_as_written():
    """.ci/run runs the README's first command verbatim (in a virtualenv with only the base install)."""
    first = re.search(r'```bash\n(.*?)```', README, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    assert first in ci_lines, f".ci/run should run the README's first command as written: {first}"
    base_venv = ci_lines.index('source .venv-ci-base/bin/activate')
    assert base_venv < ci_lines.index(first) < ci_lines.index('source .venv-ci/bin/activate')


def test_quickstart_script_runs():
    namespace = runpy.run_path(str(ROOT / 'examples' / 'loss_quickstart.py'))
    assert set(namespace['metrics']) >= {'loss', 'trust_fraction', 'prefix_fraction'}
