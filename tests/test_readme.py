"""The README's Python example runs as written, and its commands name files that exist."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README should show the loss API"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert float(namespace["loss"]) == float(namespace["metrics"]["loss"])


def test_setup_commands_name_existing_files():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert len(commands) >= 2, "the README should give the run command and the test command"
    paths = re.findall(r"((?:configs|examples)/[\w./]+\.py)", "\n".join(commands))
    assert paths, "the first set-up command should run a script or config of the project"
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_quickstart_script_runs():
    namespace = runpy.run_path(str(ROOT / "examples" / "loss_quickstart.py"))
    assert set(namespace["metrics"]) >= {"loss", "trust_fraction", "prefix_fraction"}
