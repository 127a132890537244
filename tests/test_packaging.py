"""`pip install -e .` alone brings every module the package imports at run time (CI also runs the README's first
command in a virtualenv with only that install; see .ci/run)."""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']

# Imported lazily by one command each and brought by an extra; the command says which extra when it is missing.
OPTIONAL = {'matplotlib': 'plot', 'wandb': 'wandb'}
# Needed at run time without being imported by name: transformers renders chat templates with jinja2 but does not
# require it.
INDIRECT = ['jinja2']


def _name(requirement: str) -> str:
    return re.split(r'[\s<>=!~\[;]', requirement, maxsplit=1)[0].lower().replace('_', '-')


def _imported_modules() -> set[str]:
    modules = set()
    for path in (ROOT / 'tropd_jax').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split('.')[0])
    return modules - set(sys.stdlib_module_names) - {'tropd_jax', '__future__'}


def test_every_imported_module_is_a_declared_dependency():
    declared = {_name(r) for r in PYPROJECT['dependencies']}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(_imported_modules()):
        if module in OPTIONAL:
            assert _name(module) in map(_name, PYPROJECT['optional-dependencies'][OPTIONAL[module]]), module
            continue
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared.append(f'{module} (from {", ".join(sorted(names))})')
    assert not undeclared, f'imported but not in [project] dependencies: {undeclared}'


def test_indirect_runtime_dependencies_are_declared():
    declared = {_name(r) for r in PYPROJECT['dependencies']}
    assert set(INDIRECT) <= declared, 'transformers needs jinja2 for apply_chat_template but does not require it'
