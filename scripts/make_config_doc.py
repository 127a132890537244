"""Writes docs/config.md: every field of `tropd_jax.config.default_config()`, its default and one line on it.

    python scripts/make_config_doc.py            # rewrite docs/config.md
    python scripts/make_config_doc.py --check    # exit 1 when docs/config.md is stale (tests/test_config_doc.py)

The line on each field is its comment in tropd_jax/config.py (the comment after the assignment, its `#   `
continuation lines, or the comment block just above it), or for the loss hyperparameters the comment in
`losses.DEFAULT_HYPERPARAMETERS`; fields without one take theirs from `DESCRIPTIONS` below. A field with no line
at all is an error, so a new field cannot go undocumented.
"""

import argparse
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tropd_jax import config as config_lib  # noqa: E402
from tropd_jax import losses  # noqa: E402

OUT = os.path.join(ROOT, 'docs', 'config.md')

# Fields whose assignment in config.py carries no comment.
DESCRIPTIONS = {
    'data.prompt_field': 'the field of each training (and evaluation) record that holds the prompt: a string, or '
    'a list of {"role", "content"} chat messages',
    'rollout.max_new_tokens': 'N, the response budget of a rollout in tokens (paper: 8096)',
    'rollout.temperature': 'sampling temperature of the rollouts (on-policy: 1)',
    'rollout.top_p': 'nucleus mass of the rollouts in (0, 1]; 1 = the full distribution',
    'prefix.enabled': 'teacher-prefix guidance; None = on for the tropd* methods, off for the baselines',
    'loss.method': "the distillation objective: tropd (the paper's), its variants, or a baseline (docs/methods.md)",
    'optim.learning_rate': 'peak learning rate of AdamW (paper: 5e-6)',
    'optim.warmup_steps': 'linear warm-up steps (clamped to train.steps - 1)',
    'optim.weight_decay': 'AdamW weight decay (ours)',
    'optim.b1': 'AdamW beta1',
    'optim.b2': 'AdamW beta2',
    'optim.eps': 'AdamW epsilon',
    'mesh.data': "devices along the 'data' axis: rollouts split, weights replicated",
    'mesh.tensor': "devices along the 'tensor' axis: attention heads and MLP columns split",
    'train.steps': 'optimizer steps (paper: 200)',
    'train.prompts_per_step': 'prompts per step; the batch is prompts_per_step x rollout.num_rollouts sequences',
    'checkpoint.keep': 'checkpoints kept (the oldest are deleted)',
    'checkpoint.async_save': 'write checkpoints in the background while training continues',
    'eval.at_start': 'evaluate before the first step',
    'eval.at_end': 'evaluate after the last step',
    'eval.batch_size': 'rows (problem x sample) per generation call, rounded up to a multiple of the batch shards',
    'eval.temperature': 'sampling temperature of the evaluation (0 = greedy)',
    'log.every_steps': 'write metrics every this many steps',
    'log.tensorboard': 'also write TensorBoard event files under workdir/tensorboard',
    'log.progress_bar': 'a tqdm progress bar on process 0',
    'log.wandb_project': 'the W&B project of the run (with log.wandb=True)',
}


def _comments(source: str) -> dict[str, str]:
    """`section.field` -> comment text, from the assignments of `default_config`'s source."""
    aliases = dict(re.findall(r'config\.(\w+) = (\w+) = ml_collections\.ConfigDict\(\)', source))
    aliases = {alias: section for section, alias in aliases.items()}
    lines = source.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r'\s*(\w+)\.(\w+) = (.*)$', line)
        if not m or m.group(1) not in aliases:
            continue
        name = f'{aliases[m.group(1)]}.{m.group(2)}'
        parts = []
        comment = re.search(r'  # (.*)$', m.group(3))
        if comment:
            parts.append(comment.group(1))
            for following in lines[i + 1 :]:  # continuation lines: `#   more`
                c = re.match(r'\s*#   (.*)$', following)
                if not c:
                    break
                parts.append(c.group(1))
        else:  # a comment block just above
            j = i - 1
            while j >= 0 and re.match(r'\s*# ', lines[j]):
                parts.insert(0, re.match(r'\s*# (.*)$', lines[j]).group(1))
                j -= 1
        if parts:
            out[name] = ' '.join(p.strip() for p in parts)
    return out


def _hyperparameter_comments() -> dict[str, str]:
    source = inspect.getsource(losses)
    block = source[source.index('DEFAULT_HYPERPARAMETERS = dict(') :]
    block = block[: block.index('\n)')]
    return {f'loss.{n}': c for n, c in re.findall(r'^\s*(\w+)=.*?,\s*# (.*)$', block, re.MULTILINE)}


def _default(value) -> str:
    text = repr(value) if not isinstance(value, str) else f"'{value}'"
    return text.replace('|', '\\|')


def fields() -> list[tuple[str, str, str]]:
    """(section.field, default, description) of every field, in `default_config` order."""
    described = {
        **DESCRIPTIONS,
        **_hyperparameter_comments(),
        **_comments(inspect.getsource(config_lib.default_config)),
    }
    config = config_lib.default_config()
    source = inspect.getsource(config_lib.default_config)
    order = re.findall(r'config\.(\w+) = \w+ = ml_collections\.ConfigDict\(\)', source)
    rows, missing = [], []
    for section in sorted(config.keys(), key=lambda s: order.index(s) if s in order else len(order)):
        for field in config[section].keys():
            name = f'{section}.{field}'
            if not described.get(name):
                missing.append(name)
            rows.append((name, _default(config[section][field]), described.get(name, '')))
    if missing:
        raise ValueError(f'no description for {", ".join(missing)}: comment them in config.py or add DESCRIPTIONS')
    return rows


def render() -> str:
    rows = fields()
    lines = [
        '# Config fields',
        '',
        '<!-- Generated by scripts/make_config_doc.py from tropd_jax/config.py: do not edit by hand. -->',
        '',
        'Every field the trainer reads, with its default (`tropd_jax.config.default_config()`). A recipe in',
        '`configs/` changes some of them; any field can be overridden on the command line, e.g.',
        '`python -m tropd_jax.main --config=configs/math.py --config.loss.method=opd --config.train.steps=50`.',
        'A field that is not listed here is a typo, and the trainer says so before anything runs. "(ours)" marks',
        'choices the paper does not state; docs/own_pair.md says which to change first.',
        '',
    ]
    for section in dict.fromkeys(name.split('.')[0] for name, _, _ in rows):
        lines += [f'## {section}', '', '| field | default | |', '|---|---|---|']
        for name, default, description in rows:
            if name.split('.')[0] == section:
                description = description.replace('|', '\\|')
                lines.append(f'| `{name}` | `{default}` | {description} |')
        lines.append('')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='exit 1 when docs/config.md is stale')
    args = parser.parse_args()
    text = render()
    if args.check:
        with open(OUT) as f:
            if f.read() != text:
                raise SystemExit('docs/config.md is stale: run python scripts/make_config_doc.py')
        return
    with open(OUT, 'w') as f:
        f.write(text)
    print(f'wrote {OUT}')


if __name__ == '__main__':
    main()
