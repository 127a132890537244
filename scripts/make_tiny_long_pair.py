"""Builds the shipped long-solution pair: tokenizer, repeated-doubling data, a fallible Qwen3 teacher and a weaker
Qwen3 student.

    python scripts/make_tiny_long_pair.py [--out tropd_jax/assets/tiny_long] [--seed 0]

The task (`tropd_jax.tasks.doubling`) multiplies a 7-digit number by 512 in nine written doublings: responses are
112 tokens with EOS, and one wrong digit spoils every later line and the answer. The SFT recipe, tokenizer and model
family are those of `make_tiny_pair.py` (imported from it). Unlike the first pair, the teacher here is meant to be
fallible: both models train at a constant learning rate (after warm-up) and stop at the first probe at which their
avg@4 at temperature 1, on problems held out of both shipped splits, lies in a band (teacher 0.65-0.85, student
0.15-0.4; probes every 50 and 25 steps).
So the teacher keeps real entropy on the states it has not mastered, and the student stops while its accuracy still
climbs (a student whose SFT decayed into a plateau barely moves under distillation; see `make_tiny_pair.py`).
Everything is seeded: the same command writes the same files on the same machine.

The defaults made the shipped pair (about 20 minutes on 2 busy CPU cores). The teacher (0.21M parameters) stopped at
step 250 (probe 0.688) and the student (0.11M) at step 300 (probe 0.258). On the 256 held-out problems
(`python -m tropd_jax.evaluate`, sampler seed 0, max_new_tokens 128): teacher avg@8 0.664 at temperature 1
(pass@8 0.984) and 0.848 greedy; student avg@8 0.245 (pass@8 0.695) and 0.543 greedy. Responses average 112 tokens.
The student has the capacity to close the gap: the same architecture and seed with `--student-steps 900` (which also
shortens the warm-up, a tenth of the steps up to 100, so the trajectory differs) reaches held-out avg@8 0.777 at
step 250. The step at which SFT takes off is that sensitive; the shipped student stopped on its way up (probe 0.08
at step 275, 0.26 at step 300).
"""

import argparse
import json
import os
import shutil
import time

import jax
import make_tiny_pair as base  # the sibling script: its directory is on sys.path when run as a script

from tropd_jax import evaluate as evaluation
from tropd_jax.models import save_pretrained
from tropd_jax.tasks import arithmetic, doubling

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), '..', 'tropd_jax', 'assets', 'tiny_long')

DIGITS, DOUBLINGS = 7, 9
NUM_TRAIN, NUM_EVAL, NUM_PROBE = 20_000, 256, 128
MAX_NEW_TOKENS = 128  # responses are 112 tokens with EOS
TEACHER = dict(
    vocab_size=128, hidden_size=96, intermediate_size=256, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=32
)
STUDENT = dict(
    vocab_size=112, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help='directory for tokenizer/, teacher/, student/, data/')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--teacher-steps', type=int, default=3000, help='at most this many steps')
    parser.add_argument('--student-steps', type=int, default=2000, help='at most this many steps')
    parser.add_argument(
        '--teacher-band', type=float, nargs=2, default=(0.65, 0.85), help='stop at the first probe avg@4 in [LOW, HIGH]'
    )
    parser.add_argument(
        '--student-band', type=float, nargs=2, default=(0.15, 0.4), help='stop at the first probe avg@4 in [LOW, HIGH]'
    )
    parser.add_argument('--teacher-probe-every', type=int, default=50)
    parser.add_argument('--student-probe-every', type=int, default=25)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--learning-rate', type=float, default=3e-3)
    parser.add_argument('--student-only', action='store_true', help='retrain only the student')
    parser.add_argument('--eval-samples', type=int, default=8, help='K of the avg@K reported at the end')
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    start = time.time()

    # The probe problems are drawn with the train split and kept out of it: the stopping rule never sees eval.
    train_records, eval_records = doubling.make_splits(args.seed, NUM_TRAIN + NUM_PROBE, NUM_EVAL, DIGITS, DOUBLINGS)
    probe_records, train_records = train_records[:NUM_PROBE], train_records[NUM_PROBE:]
    tokenizer = arithmetic.build_tokenizer()
    if not args.student_only:
        os.makedirs(os.path.join(out, 'data'), exist_ok=True)
        arithmetic.write_jsonl(os.path.join(out, 'data', 'train.jsonl'), train_records)
        arithmetic.write_jsonl(os.path.join(out, 'data', 'eval.jsonl'), eval_records)
        arithmetic.save_tokenizer(tokenizer, os.path.join(out, 'tokenizer'))
    elif not os.path.isdir(os.path.join(out, 'teacher')):
        raise SystemExit(f'--student-only needs a teacher in {out}/teacher; run without it first')
    print(f'data: {len(train_records)} train / {len(eval_records)} eval problems, digits {DIGITS}, seed {args.seed}')
    data = base.encode(tokenizer, train_records, doubling.worked_solution)

    def probe(name, band):
        def run(model, step):
            result = evaluation.evaluate(
                model,
                tokenizer,
                probe_records,
                samples=4,
                key=jax.random.key(args.seed + 2),
                max_new_tokens=MAX_NEW_TOKENS,
                batch_size=256,
            )
            print(f'[{name}] step {step}: probe avg@4 {result["avg_at_k"]:.3f} (band {band})', flush=True)
            return band[0] <= result['avg_at_k'] <= band[1]

        return run

    results = {}
    runs = [
        ('teacher', TEACHER, args.teacher_steps, args.seed, tuple(args.teacher_band), args.teacher_probe_every),
        ('student', STUDENT, args.student_steps, args.seed + 1, tuple(args.student_band), args.student_probe_every),
    ]
    for name, sizes, steps, seed, band, probe_every in runs[1:] if args.student_only else runs:
        model = base.train(
            base.model_config(tokenizer, **sizes),
            data,
            steps=steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=seed,
            name=name,
            final_lr_fraction=1.0,
            probe=probe(name, band),
            probe_every=probe_every,
        )
        path = os.path.join(out, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        save_pretrained(model, path)
        arithmetic.save_tokenizer(tokenizer, path)
        result = evaluation.evaluate(
            model,
            tokenizer,
            eval_records,
            samples=args.eval_samples,
            key=jax.random.key(args.seed),
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=256,
        )
        results[name] = result['avg_at_k']
        print(
            f'[{name}] saved to {path}; held-out avg@{args.eval_samples} {result["avg_at_k"]:.4f}, '
            f'pass@{args.eval_samples} {result["pass_at_k"]:.4f}, mean length {result["mean_response_length"]:.1f} '
            f'(sampler seed {args.seed}, temperature 1)',
            flush=True,
        )
    print(json.dumps({f'{name}_avg_at_{args.eval_samples}': value for name, value in results.items()}))
    print(f'done in {time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
