"""Step time of the tiny demo (configs/tiny.py) with and without packing (`train.packing`), on this machine.

    python benchmarks/packed_training.py --steps=10
    python benchmarks/packed_training.py --steps=10 --variants=unpacked:64,packed:16

Each variant trains the shipped tiny pair for `--steps` steps (no evaluation, no export) in a fresh work directory
and reports the medians of `rollout_time`, `train_time` and their sum over the steps after the first two (which
compile), and the median and range of `padding_fraction` (the fraction of computed tokens that are padding). A
variant is `unpacked:M` or `packed:M`, M the micro-batch size (rows). Prints one JSON line per variant.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

from tropd_jax import metrics, train  # noqa: E402


def tiny_config():
    spec = importlib.util.spec_from_file_location('recipe_tiny', os.path.join(ROOT, 'configs', 'tiny.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(packed: bool, micro_batch_size: int, steps: int) -> dict:
    config = tiny_config()
    with config.unlocked():
        config.train.steps, config.train.packing, config.train.micro_batch_size = steps, packed, micro_batch_size
        config.optim.warmup_steps = 1
        config.eval.path = ''
        config.checkpoint.every_steps = 0
        config.checkpoint.export_hf_at_end = False
        config.log.progress_bar = False
        config.log.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        rows = [r for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in r]
    timed = rows[2:]
    median = lambda name: round(float(np.median([r[name] for r in timed])), 4)
    return {
        'variant': f'{"packed" if packed else "unpacked"}:{micro_batch_size}',
        'steps': steps,
        'rollout_time': median('rollout_time'),
        'train_time': median('train_time'),
        'step_time': round(float(np.median([r['rollout_time'] + r['train_time'] for r in timed])), 4),
        'padding_fraction': median('padding_fraction'),
        'padding_fraction_range': [
            round(min(r['padding_fraction'] for r in rows), 4),
            round(max(r['padding_fraction'] for r in rows), 4),
        ],
        'final_loss': rows[-1]['loss'],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--variants', default='unpacked:64,packed:64,packed:32,packed:16')
    args = parser.parse_args()
    for variant in args.variants.split(','):
        kind, micro = variant.split(':')
        print(json.dumps(run(kind == 'packed', int(micro), args.steps)), flush=True)


if __name__ == '__main__':
    main()
