"""avg@K accuracy of a model on a JSONL (or Parquet) of `{"problem": str, "answer": str}` records.

Every problem goes through the tokenizer's chat template as one user turn; K responses are sampled per problem
(temperature 1 by default) with `tropd_jax.sampling.generate` and graded by `tropd_jax.grading.grade`.
avg@K is the mean correctness over all N·K samples; pass@K the fraction of problems with at least one correct.

    python -m tropd_jax.evaluate --model=DIR --data=FILE.jsonl --samples=8

prints a table and one JSON line `{"model", "avg_at_k", "k", "num_problems", "pass_at_k", ...}`.

The trainer evaluates its student the same way (`config_records`, `evaluate_with_config`: the `eval` fields of its
config); `load_records` is the one reader of evaluation problems for both.
"""

import json
import time

import jax
import numpy as np

from tropd_jax import data, grading, sampling


def load_records(
    path: str,
    limit: int | None = None,
    *,
    data_format: str = 'auto',
    problem_field: str = 'problem',
    answer_field: str = 'answer',
) -> list[dict]:
    """The `{"problem", "answer"}` records of a JSONL or Parquet file, or of a directory of them (local or `gs://`;
    `data.read_records`), read from the fields `problem_field` and `answer_field`; the first `limit` (None: all).

    A problem is a string or a list of chat messages; answers become strings. A line that is not such a record raises
    naming its file and line (or Parquet row).
    """
    records = []
    for location, record in data.read_records(path, data_format):
        if isinstance(record, str):  # a JSONL line that does not parse
            raise ValueError(f'{location}: {record}')
        record = record if isinstance(record, dict) else {}  # a JSON list or string is not a record either
        if not isinstance(record.get(problem_field), (str, list)) or record.get(answer_field) is None:
            raise ValueError(
                f'{location}: a record needs a string (or message list) {problem_field!r} and an {answer_field!r}'
            )
        records.append({'problem': record[problem_field], 'answer': str(record[answer_field])})
        if limit is not None and len(records) == limit:
            break
    if not records:
        raise ValueError(f'no records in {path!r}')
    return records


def config_records(config) -> list[dict]:
    """The trainer's evaluation problems: `eval.path` in `data.format`, with `data`'s field names, the first
    `eval.num_problems` (0: all)."""
    return load_records(
        config.eval.path,
        config.eval.num_problems if config.eval.num_problems > 0 else None,
        data_format=config.data.format,
        problem_field=config.data.prompt_field,
        answer_field=config.data.answer_field,
    )


def evaluate_with_config(model, tokenizer, records: list[dict], key: jax.Array, config) -> dict:
    """The trainer's evaluation (the `eval` fields of its config) of `model`: `evaluate`'s scalar results, named
    `eval_*`."""
    max_new_tokens = config.eval.max_new_tokens if config.eval.max_new_tokens > 0 else config.rollout.max_new_tokens
    result = evaluate(
        model,
        tokenizer,
        records,
        samples=config.eval.samples,
        key=key,
        max_new_tokens=max_new_tokens,
        batch_size=config.eval.batch_size,
        temperature=config.eval.temperature,
    )
    return {f'eval_{k}': v for k, v in result.items() if np.ndim(v) == 0}


def prompt_ids(tokenizer, problem: str) -> list[int]:
    """The chat-templated prompt of one problem, ending with the assistant turn's header: the same ids the trainer
    conditions on (`data.prompt_text` with the default template)."""
    return tokenizer.encode(data.prompt_text(problem, tokenizer), add_special_tokens=False)


def evaluate(
    model,
    tokenizer,
    records: list[dict],
    *,
    samples: int,
    key: jax.Array,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
) -> dict:
    """Samples `samples` responses per record and grades them.

    `model` is a `Decoder`, `tokenizer` a `transformers` tokenizer with a chat template, `records` dicts with
    'problem' and 'answer'. Tokens are sampled from the tokenizer's real vocabulary only.

    Rows (problem x sample) are sorted by prompt length and cut into batches of exactly `batch_size` rows (at most
    the number of rows; the last batch is filled with repeats that are not counted), so each prompt-length bucket
    compiles one program.

    Returns a dict: avg_at_k, pass_at_k, k, num_problems, mean_response_length (tokens), truncated_fraction (rows
    that hit `max_new_tokens` without EOS), correct ([num_problems, k] nested list of 0/1), and completions
    (the first sample's text for each problem).
    """
    if samples < 1:
        raise ValueError(f'samples must be >= 1, got {samples}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if not records:
        raise ValueError('evaluate got no records')
    prompts = [prompt_ids(tokenizer, r['problem']) for r in records]
    eos_ids = sampling.eos_ids(tokenizer, model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Never sample the embedding's padding rows (ids the tokenizer cannot produce), as the trainer's rollouts.
    vocab_size = min(max(tokenizer.get_vocab().values()) + 1, model.config.vocab_size)

    rows = [(i, s) for i in range(len(records)) for s in range(samples)]
    rows.sort(key=lambda row: len(prompts[row[0]]))  # neighbouring rows share a prompt-length bucket
    batch_size = min(batch_size, len(rows))  # a small evaluation does not sample hundreds of filler rows
    correct = np.zeros((len(records), samples), np.int32)
    lengths = np.zeros((len(records), samples), np.int32)
    truncated = np.zeros((len(records), samples), np.int32)
    completions = [''] * len(records)
    for batch_index, start in enumerate(range(0, len(rows), batch_size)):
        batch = rows[start : start + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))
        tokens, mask = sampling.pad_prompts([prompts[i] for i, _ in filled], pad_id=pad_id)
        rollout = sampling.generate(
            model,
            tokens,
            mask,
            jax.random.fold_in(key, batch_index),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_ids=eos_ids,
            pad_id=pad_id,
            vocab_size=vocab_size,
        )
        responses, response_lengths, finish = jax.device_get(
            (rollout.responses, rollout.lengths, rollout.finish_reason)
        )
        for row, (i, s) in enumerate(batch):
            text = tokenizer.decode(responses[row, : response_lengths[row]], skip_special_tokens=True)
            correct[i, s] = grading.grade(text, records[i]['answer'])
            lengths[i, s] = response_lengths[row]
            truncated[i, s] = finish[row] == sampling.FINISH_LENGTH
            if s == 0:
                completions[i] = text
    return {
        'avg_at_k': float(correct.mean()),
        'pass_at_k': float(correct.max(axis=1).mean()),
        'k': samples,
        'num_problems': len(records),
        'mean_response_length': float(lengths.mean()),
        'truncated_fraction': float(truncated.mean()),
        'correct': correct.tolist(),
        'completions': completions,
    }


def greedy_and_sampled(
    model,
    tokenizer,
    records: list[dict],
    *,
    samples: int,
    key: jax.Array,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
) -> dict:
    """Both views of a model's accuracy: greedy decoding (one response per problem, since every greedy sample is
    the same) and `samples` responses per problem at `temperature` (`evaluate`'s avg@K and pass@K).

    Returns a dict of floats: greedy (accuracy of the greedy responses), avg_at_k, pass_at_k, k, temperature,
    greedy_response_length and mean_response_length (tokens), greedy_truncated_fraction and truncated_fraction.
    """
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    greedy = evaluate(model, tokenizer, records, samples=1, key=key, temperature=0.0, **common)
    sampled = evaluate(model, tokenizer, records, samples=samples, key=key, temperature=temperature, **common)
    return {
        'greedy': greedy['avg_at_k'],
        'avg_at_k': sampled['avg_at_k'],
        'pass_at_k': sampled['pass_at_k'],
        'k': samples,
        'temperature': temperature,
        'greedy_response_length': greedy['mean_response_length'],
        'mean_response_length': sampled['mean_response_length'],
        'greedy_truncated_fraction': greedy['truncated_fraction'],
        'truncated_fraction': sampled['truncated_fraction'],
    }


def format_table(rows: list[tuple[str, str]]) -> str:
    """A two-column plain-text table."""
    width = max(len(name) for name, _ in rows)
    rule = '-' * (width + 2 + max(len(value) for _, value in rows))
    return '\n'.join([rule] + [f'{name:<{width}}  {value}' for name, value in rows] + [rule])


def main(argv) -> None:
    del argv
    from absl import flags as absl_flags
    from transformers import AutoTokenizer

    from tropd_jax.models import from_pretrained

    flags = absl_flags.FLAGS
    try:
        records = load_records(flags.data, flags.limit)
    except (OSError, ValueError) as e:  # the file's own problem: one line naming it, not a traceback
        raise SystemExit(f'error: {e}') from None
    model, _ = from_pretrained(flags.model)
    tokenizer = AutoTokenizer.from_pretrained(flags.tokenizer or flags.model)
    start = time.time()
    result = evaluate(
        model,
        tokenizer,
        records,
        samples=flags.samples,
        key=jax.random.key(flags.seed),
        max_new_tokens=flags.max_new_tokens,
        batch_size=flags.batch_size,
        temperature=flags.temperature,
    )
    seconds = time.time() - start
    k = flags.samples
    for record, completion, correct in list(zip(records, result['completions'], result['correct']))[: flags.show]:
        print(f'{record["problem"]!r} -> answer {record["answer"]}, {sum(correct)}/{k} correct; first sample:')
        print('  ' + completion.replace('\n', '\n  '))
    print(
        format_table(
            [
                ('model', flags.model),
                ('data', flags.data),
                ('problems', str(result['num_problems'])),
                ('samples per problem', f'{k} (temperature {flags.temperature:g}, seed {flags.seed})'),
                (f'avg@{k}', f'{result["avg_at_k"]:.4f}'),
                (f'pass@{k}', f'{result["pass_at_k"]:.4f}'),
                ('mean response tokens', f'{result["mean_response_length"]:.1f}'),
                ('truncated', f'{result["truncated_fraction"]:.4f}'),
                ('seconds', f'{seconds:.1f}'),
            ]
        )
    )
    print(
        json.dumps(
            {
                'model': flags.model,
                'avg_at_k': result['avg_at_k'],
                'k': k,
                'num_problems': result['num_problems'],
                'pass_at_k': result['pass_at_k'],
                'temperature': flags.temperature,
                'seed': flags.seed,
                'mean_response_length': result['mean_response_length'],
                'truncated_fraction': result['truncated_fraction'],
            }
        )
    )


def define_flags() -> None:
    # Defined only when run as a program, so importing this module never adds flags to the trainer's command line.
    from absl import flags

    flags.DEFINE_string('model', None, 'HF checkpoint directory (config.json + safetensors)', required=True)
    flags.DEFINE_string('data', None, 'JSONL of {"problem": ..., "answer": ...} records', required=True)
    flags.DEFINE_string('tokenizer', None, 'tokenizer directory (default: the model directory)')
    flags.DEFINE_integer('samples', 8, 'K, responses sampled per problem')
    flags.DEFINE_float('temperature', 1.0, 'sampling temperature (0 = greedy)')
    flags.DEFINE_integer('max_new_tokens', 256, 'response token budget')
    flags.DEFINE_integer('batch_size', 128, 'rows (problem x sample) per generate call')
    flags.DEFINE_integer('limit', None, 'evaluate only the first N problems')
    flags.DEFINE_integer('seed', 0, 'PRNG seed of the sampler')
    flags.DEFINE_integer('show', 3, 'print the first sample of the first N problems')


if __name__ == '__main__':
    from absl import app

    define_flags()
    app.run(main)
