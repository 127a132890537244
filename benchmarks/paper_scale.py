"""Per-chip memory of the paper's recipes at their real shapes, compiled ahead of time for TPU (no TPU needed).

    pip install -e ".[tpu]" && python benchmarks/paper_scale.py [--runs before,after,multidomain,growth,32k]

Each run is one `python -m tropd_jax.aot` (libtpu's deviceless compiler) writing JSON; this script prints one JSON
line with GiB per chip for each program:
  before       configs/math.py on a v5p-8 with `model.attention=naive model.remat=none` (the code as it was:
               [T, T] attention scores, every activation kept), student fwd + bwd, teacher scoring, train step;
  after        configs/math.py on a v5p-8 with its defaults, every program;
  offload      the student's fwd + bwd and the train step with each layer's input kept in host memory
               (`model.remat=offload`);
  multidomain  configs/multidomain.py on a v5p-8, every program;
  growth       the student's fwd + bwd on one micro-batch at 4k / 16k / 32k tokens per sequence;
  32k          configs/math.py at 32k-token rollouts (8 prompts per generation call), every program;
  teacher8b_colocated, teacher8b_separate, teacher32b_colocated, teacher32b_separate (not run by default)
               configs/math.py with a Qwen3-8B- or Qwen3-32B-shaped teacher, `model.teacher_placement` as named;
  teacher8b_separate_64slots, teacher32b_int8_colocated (not run by default) the separate 8B teacher through 64
               decode slots, the 32B teacher colocated in int8 (`model.teacher_quantization=int8`).
`student_grad_ratio` is before / after for the student's fwd + bwd at the paper's micro-batch. Each program is a
full XLA TPU compile of a 1.5B-7B model: the whole set takes hours on 2 CPU cores, minutes on a TPU VM's host.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    'before': (
        'configs/math.py',
        [
            '--programs=student_grad,teacher_scoring,train_step',
            '--config.model.attention=naive',
            '--config.model.remat=none',
        ],
    ),
    'after': ('configs/math.py', []),
    'offload': ('configs/math.py', ['--programs=student_grad,train_step', '--config.model.remat=offload']),
    'multidomain': ('configs/multidomain.py', []),
    'growth_4k': ('configs/math.py', ['--programs=student_grad', '--config.rollout.max_new_tokens=3072']),
    'growth_16k': ('configs/math.py', ['--programs=student_grad', '--config.rollout.max_new_tokens=15360']),
    'growth_32k': ('configs/math.py', ['--programs=student_grad', '--config.rollout.max_new_tokens=31744']),
    '32k': ('configs/math.py', ['--config.rollout.max_new_tokens=31744', '--config.rollout.batch_size=8']),
}
DEFAULT_RUNS = tuple(RUNS)
# The math recipe with an 8B- and a 32B-shaped teacher (Qwen3-8B, Qwen3-32B), colocated with the student or on its
# own half of the chips (`--runs` names them; run each on --topology=v5p-8 and v5p-16). The 32B teacher's KV cache
# (256 KiB per token) takes 32 decode slots instead of the recipe's 128.
for _size, _extra in (('8b', []), ('32b', ['--config.rollout.decode_slots=32'])):
    for _placement in ('colocated', 'separate'):
        RUNS[f'teacher{_size}_{_placement}'] = (
            'configs/math.py',
            [
                f'--config.model.teacher_path=models/Qwen3-{_size[:-1]}B',
                f'--config.model.teacher_placement={_placement}',
                *_extra,
            ],
        )
RUNS['teacher8b_separate_64slots'] = (
    'configs/math.py',
    [*RUNS['teacher8b_separate'][1], '--config.rollout.decode_slots=64'],
)
RUNS['teacher32b_int8_colocated'] = (
    'configs/math.py',
    [*RUNS['teacher32b_colocated'][1], '--config.model.teacher_quantization=int8'],
)


def run(name: str, topology: str) -> dict:
    """One aot run: program -> {'gib': total per chip (or what the compiler asked for), 'fits': bool}."""
    config, extra = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'aot.json')
        command = [
            sys.executable,
            '-m',
            'tropd_jax.aot',
            f'--config={config}',
            f'--topology={topology}',
            f'--json={out}',
            *extra,
        ]
        print(f'== {name}: {" ".join(command[1:])}', file=sys.stderr, flush=True)
        subprocess.run(command, cwd=ROOT, stdout=sys.stderr, check=False)
        with open(out) as f:
            report = json.load(f)
    result = {}
    for p in report['programs']:
        # With what the trainer holds on the chips meanwhile (its rows are in `rows` when the compile ran out of
        # memory).
        total = p['total'] + p.get('resident', 0.0) if p['total'] is not None else sum(p['rows'].values())
        result[p['program']] = {
            'gib': round(total / 2**30, 2),
            'fits': p['fits'],
            'temporaries_gib': round(p['rows']['temporaries'] / 2**30, 2),
            'host_gib': round(p.get('host', 0.0) / 2**30, 2),
        }
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--topology', default='v5p-8')
    parser.add_argument('--runs', default=','.join(DEFAULT_RUNS), help=f'comma-separated, from {", ".join(RUNS)}')
    args = parser.parse_args()
    result = {
        'benchmark': 'paper_scale',
        'date': datetime.date.today().isoformat(),
        'machine': platform.machine(),
        'topology': args.topology,
    }
    for name in args.runs.split(','):
        result[name] = run(name, args.topology)
    if 'before' in result and 'after' in result:
        result['student_grad_ratio'] = round(
            result['before']['student_grad']['gib'] / result['after']['student_grad']['gib'], 1
        )
    print(json.dumps(result))


if __name__ == '__main__':
    main()
