"""Repeated doubling: the long-solution synthetic task of the second tiny pair (`tiny_long`).

A problem multiplies a `digits`-digit number by `2 ** doublings`, e.g. `1953125*512` (no instruction text). Its
worked solution doubles the number once per line, every line zero-padded to the width of the answer, and ends with
the boxed product:

    0003906250
    0007812500
    ...
    1000000000
    \\boxed{1000000000}

Each digit of a line is a function of two digits of the line above: `new[j] = (2 * old[j] + (old[j + 1] >= 5)) % 10`
(the second term is the carry from the right), so the rule is local, but it is applied about a hundred times and
errors compound: one wrong digit is doubled into every later line and into the answer. With the default 7 digits and
9 doublings a response is 9 lines of 11 tokens and the 12-token box, 111 tokens (112 with the end-of-turn token) with
the character-level tokenizer of `tropd_jax.tasks.arithmetic`. Operands are drawn so the product has exactly the
line width, so the box copies the last line as it is.

Records are JSONL `{"problem": str, "answer": str}`, graded by `tropd_jax.grading` (the last `\\boxed{}` against the
answer). CLI:

    python -m tropd_jax.tasks.doubling --out DIR --seed 0 --num-train 20000 --num-eval 256 --digits 7 --doublings 9
"""

import argparse
import os

import numpy as np

from tropd_jax.tasks import arithmetic


def _width(digits: int, doublings: int) -> int:
    """Digits of the largest product, the width of every line."""
    return len(str((10**digits - 1) * 2**doublings))


def _operand_range(digits: int, doublings: int) -> tuple[int, int]:
    """[low, high) of the `digits`-digit operands whose product has exactly `_width` digits."""
    if digits < 1 or doublings < 1:
        raise ValueError(f'digits and doublings must be at least 1, got digits={digits}, doublings={doublings}')
    low = max(10 ** (digits - 1), -(-(10 ** (_width(digits, doublings) - 1)) // 2**doublings))
    return low, 10**digits


def parse(problem: str) -> tuple[int, int]:
    """`'1953125*512'` -> (1953125, 9): the operand and the number of doublings."""
    left, star, right = problem.partition('*')
    if not (star and left.isdigit() and right.isdigit() and int(right) > 1 and int(right) & (int(right) - 1) == 0):
        raise ValueError(f'not a number times a power of two: {problem!r}')
    return int(left), int(right).bit_length() - 1


def lines(problem: str) -> list[str]:
    """The doubled values, one per line, zero-padded to the width of the product."""
    x, doublings = parse(problem)
    width = _width(len(str(x)), doublings)
    return [str(x * 2**i).zfill(width) for i in range(1, doublings + 1)]


def worked_solution(problem: str) -> str:
    """The response the models are trained on (without the end-of-turn token)."""
    x, doublings = parse(problem)
    return ''.join(f'{line}\n' for line in lines(problem)) + f'\\boxed{{{x * 2**doublings}}}'


def make_splits(
    seed: int, num_train: int, num_eval: int, digits: int = 7, doublings: int = 9
) -> tuple[list[dict], list[dict]]:
    """Disjoint train / eval records, deterministic in `seed`; each problem appears at most once overall.

    The eval split comes first, so it does not depend on `num_train`.
    """
    low, high = _operand_range(digits, doublings)
    total = num_train + num_eval
    if total > (high - low) // 2:  # past half of the operands, rejection of repeats slows down
        raise ValueError(f'{total} problems asked for, too many for digits={digits}, doublings={doublings}')
    rng = np.random.default_rng(seed)
    seen, records = set(), []
    while len(records) < total:
        x = int(rng.integers(low, high))
        if x in seen:
            continue
        seen.add(x)
        records.append({'problem': f'{x}*{2**doublings}', 'answer': str(x * 2**doublings)})
    return records[num_eval:], records[:num_eval]


def tiny_long_assets() -> arithmetic.TinyAssets:
    """Paths of the shipped long-solution pair (made by `scripts/make_tiny_long_pair.py`)."""
    return arithmetic.tiny_assets('tiny_long')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write train / eval JSONL splits of the repeated doubling task.')
    parser.add_argument('--out', required=True, help='output directory; gets train.jsonl and eval.jsonl')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=20_000)
    parser.add_argument('--num-eval', type=int, default=256)
    parser.add_argument('--digits', type=int, default=7, help='digits of the operand')
    parser.add_argument('--doublings', type=int, default=9, help='lines of the worked solution')
    args = parser.parse_args(argv)
    train, evaluation = make_splits(args.seed, args.num_train, args.num_eval, args.digits, args.doublings)
    os.makedirs(args.out, exist_ok=True)
    arithmetic.write_jsonl(os.path.join(args.out, 'train.jsonl'), train)
    arithmetic.write_jsonl(os.path.join(args.out, 'eval.jsonl'), evaluation)
    print(
        f'wrote {len(train)} train and {len(evaluation)} eval problems (digits={args.digits}, '
        f'doublings={args.doublings}, seed={args.seed})'
    )


if __name__ == '__main__':
    main()
