"""Writes evaluation problems with other common field names as the JSONL `tropd_jax.evaluate` and `eval.path` read.

    python scripts/convert_eval_data.py math500.jsonl data/math500.jsonl          # MATH-500: problem, answer
    python scripts/convert_eval_data.py aime_2024.parquet data/aime24.jsonl       # Problem / Answer, or problem, ...
    python scripts/convert_eval_data.py gsm8k_test.jsonl data/gsm8k.jsonl         # question, answer "... #### 72"

Reads a JSONL or Parquet file (or a directory of them; `data.read_records`) and writes one `{"problem", "answer"}`
line per record (`evaluate.convert_record`): the problem from the first of problem / Problem / question / Question
/ prompt, the answer from the first of answer / Answer / final_answer / expected_answer / ground_truth / solution /
Solution, reduced to the last `\\boxed{}` of a worked solution or what follows GSM8K's `####`. `--problem_field` and
`--answer_field` name the fields instead. Prints how many records it wrote.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tropd_jax import data, evaluate  # noqa: E402


def convert(source: str, target: str, problem_field: str = '', answer_field: str = '') -> int:
    """Writes `target` from `source`; returns the number of records. A record that does not convert raises a
    ValueError naming its file and line."""
    lines = []
    for location, record in data.read_records(source):
        if not isinstance(record, dict):  # a str is `read_records`' note on a line that does not parse
            raise ValueError(f'{location}: {record if isinstance(record, str) else "not a JSON object"}')
        try:
            lines.append(json.dumps(evaluate.convert_record(record, problem_field, answer_field)) + '\n')
        except ValueError as e:
            raise ValueError(f'{location}: {e}') from None
    with open(target, 'w') as f:
        f.writelines(lines)
    return len(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source')
    parser.add_argument('target')
    parser.add_argument('--problem_field', default='')
    parser.add_argument('--answer_field', default='')
    args = parser.parse_args()
    try:
        count = convert(args.source, args.target, args.problem_field, args.answer_field)
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: {e}') from None
    print(f'wrote {count} records to {args.target}')


if __name__ == '__main__':
    main()
