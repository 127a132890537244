"""The README's Python example runs as written, and its commands name files that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README should show the loss API"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert float(namespace["loss"]) == float(namespace["metrics"]["loss"])


def test_commands_name_existing_configs():
    configs = re.findall(r"--config=(configs/[\w.]+\.py)", README)
    assert configs, "the README's first command should run the main job with a config"
    for config in configs:
        assert (ROOT / config).is_file(), config
