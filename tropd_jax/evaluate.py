"""avg@K accuracy of a model on a JSONL (or Parquet) of `{"problem": str, "answer": str}` records.

Every problem is rendered as the trainer renders its prompts (`data.encode_prompt`: `data.prompt_template`, then
the tokenizer's chat template as one user turn); K responses are sampled per problem (temperature 1 and top-p 1 by
default) with `tropd_jax.sampling.generate`, the batch split over every device of a mesh, and graded once by
`tropd_jax.grading.grade`. avg@K is the mean correctness over all N·K samples; pass@K the fraction of problems with
at least one correct.

    python -m tropd_jax.evaluate --model=DIR --data=FILE.jsonl --samples=8 \
        --prompt_template="{prompt}\nLet's think step by step and output the final answer within \\boxed{{}}."

prints a table and one JSON line `{"model", "avg_at_k", "k", "num_problems", "pass_at_k", ...}`. It runs on every
device of this host: the batch split over a data mesh (`--data_parallel`, `--fsdp`, `--tensor`; default: the
weights replicated, each device decoding its share of the rows).

The trainer evaluates its student the same way (`config_records`, `evaluate_with_config`: the `eval` fields of its
config and `data`'s template fields), on its own mesh and in multi-process runs too: every process samples its
devices' rows, the responses are gathered to every host and process 0 grades them. `load_records` is the one reader
of evaluation problems for both; `convert_record` maps records with other common field names (MATH-500's
`problem` / `answer`, AIME sets' `Problem` / `Answer`, `question` / `final_answer`, ...) to that format
(`python scripts/convert_eval_data.py IN OUT.jsonl`).
"""

import contextlib
import json
import math
import re
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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


def evaluate_with_config(model, tokenizer, records: list[dict], key: jax.Array, config, mesh=None) -> dict:
    """The trainer's evaluation (the `eval` fields of its config, prompts rendered as `data`'s fields render the
    training prompts) of `model`, on `mesh` (None: the default device): `evaluate`'s scalar results, named
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
        top_p=config.eval.get('top_p', 1.0),
        prompt_template=config.data.prompt_template,
        chat_template=config.data.chat_template,
        mesh=mesh,
    )
    return {f'eval_{k}': v for k, v in result.items() if np.ndim(v) == 0}


def prompt_ids(tokenizer, problem, *, prompt_template: str = '{prompt}', chat_template: bool = True) -> list[int]:
    """The prompt of one problem (a string or chat messages), ending with the assistant turn's header: the ids the
    trainer conditions on with the same `data.prompt_template` and `data.chat_template` (`data.encode_prompt`)."""
    return data.encode_prompt(problem, tokenizer, prompt_template=prompt_template, chat_template=chat_template)


def _replicated(x, mesh) -> jax.Array:
    """A host array every process holds in full, as a global array replicated on `mesh` (PRNG keys too)."""
    if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
        data_ = _replicated(np.asarray(jax.random.key_data(x)), mesh)
        return jax.random.wrap_key_data(data_, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda i: x[i], dtype=x.dtype)


def _host(tree):
    """Every (possibly sharded over several processes) array of `tree` in full on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.device_get(tree)


def grade_once(pairs: list[list[tuple[str, str]]]) -> np.ndarray:
    """[N, K] int32 0/1 grades of N x K (response, answer) pairs (`grading.grade`): graded by process 0 alone, and
    sent to the other processes of a multi-process run, which hold the same responses."""
    correct = np.zeros((len(pairs), len(pairs[0]) if pairs else 0), np.int32)
    if jax.process_index() == 0:
        for i, row in enumerate(pairs):
            for s, (text, answer) in enumerate(row):
                correct[i, s] = grading.grade(text, answer)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        correct = np.asarray(multihost_utils.broadcast_one_to_all(correct), np.int32)
    return correct


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
    top_p: float = 1.0,
    prompt_template: str = '{prompt}',
    chat_template: bool = True,
    mesh=None,
) -> dict:
    """Samples `samples` responses per record and grades them.

    `model` is a `Decoder`, `tokenizer` a `transformers` tokenizer with a chat template, `records` dicts with
    'problem' and 'answer'. Prompts are rendered with `prompt_template` and `chat_template` as the trainer renders
    its prompts (`prompt_ids`). Tokens are sampled from the tokenizer's real vocabulary only, at `temperature` (0:
    greedy) with nucleus mass `top_p`.

    Rows (problem x sample) are sorted by prompt length and cut into batches of exactly `batch_size` rows (at most
    the number of rows, rounded up to a multiple of the mesh's batch shards; the last batch is filled with repeats
    that are not counted), so each prompt-length bucket compiles one program.

    `mesh`: a ('data', 'fsdp', 'tensor') mesh that `model` is sharded over; each batch is split over its batch axes
    (`sampling.generate`), also when the mesh spans several processes: every process then calls this function with
    the same arguments, the responses are gathered to every host, and process 0 grades them (its grades are sent
    to the others). None: the default device.

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
    prompts = [
        prompt_ids(tokenizer, r['problem'], prompt_template=prompt_template, chat_template=chat_template)
        for r in records
    ]
    eos_ids = sampling.eos_ids(tokenizer, model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Never sample the embedding's padding rows (ids the tokenizer cannot produce), as the trainer's rollouts.
    vocab_size = min(max(tokenizer.get_vocab().values()) + 1, model.config.vocab_size)

    rows = [(i, s) for i in range(len(records)) for s in range(samples)]
    rows.sort(key=lambda row: len(prompts[row[0]]))  # neighbouring rows share a prompt-length bucket
    shards = 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']
    # A small evaluation does not sample hundreds of filler rows; every batch shard gets whole rows.
    batch_size = math.ceil(min(batch_size, len(rows)) / shards) * shards
    texts = [[''] * samples for _ in records]
    lengths = np.zeros((len(records), samples), np.int32)
    truncated = np.zeros((len(records), samples), np.int32)
    for batch_index, start in enumerate(range(0, len(rows), batch_size)):
        batch = rows[start : start + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))
        tokens, mask = sampling.pad_prompts([prompts[i] for i, _ in filled], pad_id=pad_id)
        batch_key = jax.random.fold_in(key, batch_index)
        if mesh is not None:  # global arrays, so that a mesh over several processes takes them
            tokens, mask, batch_key = (_replicated(x, mesh) for x in (tokens, mask, batch_key))
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            rollout = sampling.generate(
                model,
                tokens,
                mask,
                batch_key,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_ids=eos_ids,
                pad_id=pad_id,
                vocab_size=vocab_size,
            )
        responses, response_lengths, finish = _host((rollout.responses, rollout.lengths, rollout.finish_reason))
        for row, (i, s) in enumerate(batch):
            texts[i][s] = tokenizer.decode(responses[row, : response_lengths[row]], skip_special_tokens=True)
            lengths[i, s] = response_lengths[row]
            truncated[i, s] = finish[row] == sampling.FINISH_LENGTH
    correct = grade_once([[(text, r['answer']) for text in row] for row, r in zip(texts, records)])
    completions = [row[0] for row in texts]
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


PROBLEM_FIELDS = ('problem', 'Problem', 'question', 'Question', 'prompt')
ANSWER_FIELDS = ('answer', 'Answer', 'final_answer', 'expected_answer', 'ground_truth', 'solution', 'Solution')


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None without one."""
    starts = [m.end() for m in re.finditer(r'\\(?:boxed|fbox)\s*\{', text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {'{': 1, '}': -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def convert_record(record: dict, problem_field: str = '', answer_field: str = '') -> dict:
    """`{"problem", "answer"}` from a record with other common field names: the problem from `problem_field` or the
    first of `PROBLEM_FIELDS` present, the answer from `answer_field` or the first of `ANSWER_FIELDS` present. An
    answer holding a worked solution becomes its last `\\boxed{}` (MATH), one with `####` what follows the last
    `####` (GSM8K); numbers become strings. Raises a ValueError naming the fields when one is missing."""
    pick = lambda given, names: given if given else next((n for n in names if n in record), None)
    problem_key, answer_key = pick(problem_field, PROBLEM_FIELDS), pick(answer_field, ANSWER_FIELDS)
    if problem_key not in record or answer_key not in record:
        raise ValueError(
            f'record fields {sorted(record)}: no problem field (tried {problem_field or PROBLEM_FIELDS}) or no answer '
            f'field (tried {answer_field or ANSWER_FIELDS})'
        )
    answer = str(record[answer_key]).strip()
    boxed = last_boxed(answer)
    if boxed is not None:
        answer = boxed.strip()
    elif '####' in answer:
        answer = answer.rsplit('####', 1)[1].strip()
    return {'problem': record[problem_key], 'answer': answer}


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
    **kwargs,
) -> dict:
    """Both views of a model's accuracy: greedy decoding (one response per problem, since every greedy sample is
    the same) and `samples` responses per problem at `temperature` (`evaluate`'s avg@K and pass@K). `kwargs` go to
    both `evaluate` calls (prompt rendering, `top_p`, `mesh`).

    Returns a dict of floats: greedy (accuracy of the greedy responses), avg_at_k, pass_at_k, k, temperature,
    greedy_response_length and mean_response_length (tokens), greedy_truncated_fraction and truncated_fraction.
    """
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, **kwargs)
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

    from tropd_jax import sharding
    from tropd_jax.models import from_pretrained

    flags = absl_flags.FLAGS
    try:
        records = load_records(
            flags.data, flags.limit, problem_field=flags.problem_field, answer_field=flags.answer_field
        )
        mesh = sharding.make_mesh(flags.data_parallel, flags.fsdp, flags.tensor)
    except (OSError, ValueError) as e:  # the file's own problem: one line naming it, not a traceback
        raise SystemExit(f'error: {e}') from None
    model, _ = from_pretrained(flags.model, dtype=flags.dtype, mesh=mesh)
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
        top_p=flags.top_p,
        prompt_template=flags.prompt_template,
        chat_template=flags.chat_template,
        mesh=mesh,
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
                (
                    'samples per problem',
                    f'{k} (temperature {flags.temperature:g}, top-p {flags.top_p:g}, seed {flags.seed})',
                ),
                ('devices', f'{mesh.size} (data, fsdp, tensor = {", ".join(map(str, mesh.devices.shape))})'),
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
                'top_p': flags.top_p,
                'max_new_tokens': flags.max_new_tokens,
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
    flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass in (0, 1] (1 = the full distribution)')
    flags.DEFINE_integer('max_new_tokens', 8096, 'response token budget (the math recipe rolls out 8096)')
    flags.DEFINE_string('problem_field', 'problem', "the records' problem field (data.prompt_field)")
    flags.DEFINE_string('answer_field', 'answer', "the records' answer field (data.answer_field)")
    flags.DEFINE_string(
        'prompt_template', '{prompt}', 'formats each problem before the chat template, as data.prompt_template'
    )
    flags.DEFINE_boolean('chat_template', True, "wrap the prompt as a user turn with the tokenizer's chat template")
    flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute and parameter dtype')
    flags.DEFINE_integer('data_parallel', -1, "mesh 'data' axis: rows split, weights replicated (-1 = the rest)")
    flags.DEFINE_integer('fsdp', 1, "mesh 'fsdp' axis: rows and weights split (for models one device cannot hold)")
    flags.DEFINE_integer('tensor', 1, "mesh 'tensor' axis: attention heads and MLP split")
    flags.DEFINE_integer('batch_size', 128, 'rows (problem x sample) per generate call')
    flags.DEFINE_integer('limit', None, 'evaluate only the first N problems')
    flags.DEFINE_integer('seed', 0, 'PRNG seed of the sampler')
    flags.DEFINE_integer('show', 3, 'print the first sample of the first N problems')


if __name__ == '__main__':
    from absl import app

    define_flags()
    app.run(main)
