"""Padding in scoring and the train step: rollout rows `[R, P + N]` against packed rows (`tropd_jax.packing`).

    python benchmarks/packing.py                       # tiny shapes: 256 rollouts, prompts <= 32, budget 256
    python benchmarks/packing.py --prompt=1024 --new_tokens=8096 --rollouts=512  # the math recipe's shapes

Rollouts have long-tailed lengths as in benchmarks/continuous_batching.py (90% of responses stop within the first
quarter of the budget); prompts are uniform between 1/4 of the bucket and the bucket. Scoring and the train step
compute every column of every row, so the fraction of computed tokens that are padding is 1 - real tokens / cells:
before, of `[R, P + N]`; after, of the packed `[rows, P + N]` (same row length, so the same compiled shapes per
row), rows rounded up to a multiple of `--multiple_of` (the micro-batch size) and then, as the trainer does
(`train.packing_buckets`), to one of `--buckets` row counts per doubling (0: no buckets). Prints one JSON line.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from continuous_batching import long_tailed_lengths  # noqa: E402

from tropd_jax import packing  # noqa: E402


def padding_fraction(input_mask: np.ndarray) -> float:
    """The fraction of computed tokens (every column of every row) that are padding."""
    return float(1.0 - input_mask.sum() / max(input_mask.size, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rollouts', type=int, default=256)
    parser.add_argument('--prompt', type=int, default=32, help='prompt bucket P')
    parser.add_argument('--new_tokens', type=int, default=256, help='the budget N')
    parser.add_argument('--short_fraction', type=float, default=0.9)
    parser.add_argument('--multiple_of', type=int, default=16, help='packed rows are rounded up to a multiple of this')
    parser.add_argument(
        '--buckets', type=int, default=4, help='bucketed row counts per doubling (train.packing_buckets)'
    )
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(max(1, args.prompt // 4), args.prompt + 1, args.rollouts)
    responses = long_tailed_lengths(rng, args.rollouts, args.new_tokens, args.short_fraction)
    columns = args.prompt + args.new_tokens
    input_mask = np.zeros((args.rollouts, columns), np.int8)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_mask[row, args.prompt - prompt : args.prompt + response] = 1
    plan = packing.plan(input_mask, columns, multiple_of=args.multiple_of)
    rows_needed = int(plan.row.max()) + 1
    plan = plan._replace(num_rows=packing.bucket_rows(plan.num_rows, args.multiple_of, args.buckets, args.rollouts))
    packed_real = np.zeros((plan.num_rows, columns), np.int8)
    for r in range(args.rollouts):
        packed_real[plan.row[r], plan.start[r] : plan.start[r] + plan.length[r]] = 1
    print(
        json.dumps(
            {
                'padding_fraction_before': round(padding_fraction(input_mask), 4),
                'padding_fraction_after': round(padding_fraction(packed_real), 4),
                'rows_before': args.rollouts,
                'rows_needed': rows_needed,
                'rows_after': plan.num_rows,
                'row_length': columns,
                'real_tokens': int(input_mask.sum()),
                'mean_response': round(float(responses.mean()), 1),
                'rollouts': args.rollouts,
                'prompt': args.prompt,
                'new_tokens': args.new_tokens,
                'multiple_of': args.multiple_of,
                'buckets': args.buckets,
            }
        )
    )


if __name__ == '__main__':
    main()
