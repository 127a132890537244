"""Prompt data: JSONL / Parquet files (local or `gs://`, through `tropd_jax.paths`) -> tokenized prompts -> a
shuffled, checkpointable grain iterator.

Records are read and tokenized once, up front, so that every malformed or over-long record is counted before
training starts (and, with `on_bad_record='fail'`, stops it with the record's location). The surviving prompts are
small integer arrays; the grain pipeline over them shuffles with a seed, reshuffles every epoch, and its iterator
state (`{'next_index': n}`) goes into every checkpoint so a resumed run sees the same prompt order.

Every process of a multi-host run builds the same pipeline and reads the same global batch; the trainer places each
process's shard on its devices.
"""

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

from tropd_jax import paths

FORMATS = ('auto', 'jsonl', 'parquet')
BAD_RECORD_POLICIES = ('skip', 'fail')


@dataclasses.dataclass
class DataReport:
    """What loading found: counts and the first few problems, one line each (`file:line: reason`)."""

    total: int = 0
    kept: int = 0
    malformed: int = 0
    too_long: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = f'{self.kept}/{self.total} records kept, {self.malformed} malformed, {self.too_long} over-long'
        if self.problems:
            text += '; first problems: ' + '; '.join(self.problems)
        return text


def data_files(path: str, data_format: str = 'auto') -> list[tuple[str, str]]:
    """`[(file, format)]` for a file or a directory of `.jsonl` / `.parquet` files (sorted)."""
    if data_format not in FORMATS:
        raise ValueError(f'data format {data_format!r} must be one of {FORMATS}')
    if not path or not paths.exists(path):
        raise FileNotFoundError(f'data path {path!r} does not exist')
    if paths.isdir(path):
        files = sorted(paths.join(path, f.name) for f in epath.Path(path).iterdir())
    else:
        files = [path]
    out = []
    for f in files:
        fmt = data_format
        if fmt == 'auto':
            fmt = 'parquet' if f.endswith('.parquet') else 'jsonl' if f.endswith(('.jsonl', '.json')) else None
        if fmt is not None:
            out.append((f, fmt))
    if not out:
        raise ValueError(f'no .jsonl or .parquet files under data path {path!r}')
    return out


def read_records(path: str, data_format: str = 'auto') -> list[tuple[str, Any]]:
    """Every record of the file(s) as `(location, record)`; a JSONL line that does not parse is a `str` error."""
    records = []
    for file, fmt in data_files(path, data_format):
        if fmt == 'parquet':
            import pyarrow.parquet as pq

            with paths.open_file(file, 'rb') as f:
                table = pq.read_table(f)
            for i, row in enumerate(table.to_pylist()):
                records.append((f'{file}:row {i}', row))
            continue
        with paths.open_file(file, encoding='utf-8') as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f'{file}:{i}', json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append((f'{file}:{i}', f'invalid JSON ({e.msg})'))
    return records


def prompt_text(
    prompt: Any, tokenizer, *, prompt_template: str = '{prompt}', chat_template: bool = True, system_prompt: str = ''
) -> str:
    """The text the model is conditioned on.

    `prompt` is a string (formatted with `prompt_template`, then wrapped as one user turn when `chat_template`) or
    a list of `{'role', 'content'}` messages (used as is with the chat template). A `system_prompt` goes first as a
    system turn (chat template only), unless the messages already start with one.
    """
    if isinstance(prompt, str):
        content = prompt_template.format(prompt=prompt)
        if not chat_template:
            return content
        messages = [{'role': 'user', 'content': content}]
    else:
        messages = prompt
    if system_prompt and messages[0].get('role') != 'system':
        messages = [{'role': 'system', 'content': system_prompt}] + list(messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(
    prompt: Any, tokenizer, *, prompt_template: str = '{prompt}', chat_template: bool = True, system_prompt: str = ''
) -> list[int]:
    """The token ids of `prompt_text`: the ids the trainer's rollouts and the evaluation condition on. The chat
    template already holds any special tokens; a bare prompt gets the tokenizer's own (e.g. BOS)."""
    text = prompt_text(
        prompt, tokenizer, prompt_template=prompt_template, chat_template=chat_template, system_prompt=system_prompt
    )
    return tokenizer.encode(text, add_special_tokens=not chat_template)


def _check_prompt(prompt: Any, chat_template: bool) -> str | None:
    """Why `prompt` cannot be used, or None."""
    if isinstance(prompt, str):
        return None if prompt.strip() else 'empty prompt'
    if isinstance(prompt, list) and chat_template and prompt:
        ok = all(isinstance(m, dict) and isinstance(m.get('content'), str) and 'role' in m for m in prompt)
        return None if ok else 'prompt messages must be {"role", "content"} dicts'
    expected = 'a string or a list of chat messages' if chat_template else 'a string'
    return f'prompt must be {expected}, got {type(prompt).__name__}'


def load_prompts(
    path: str,
    tokenizer,
    *,
    prompt_field: str = 'problem',
    answer_field: str = 'answer',
    prompt_template: str = '{prompt}',
    chat_template: bool = True,
    max_prompt_length: int = 1024,
    on_bad_record: str = 'skip',
    data_format: str = 'auto',
    teacher_tokenizer=None,
    teacher_system_prompt: str = '',
) -> tuple[list[dict], DataReport]:
    """Reads and tokenizes every record; returns the usable prompts and a report of what was dropped.

    Each prompt is `{'prompt_tokens': int32 [n], 'answer': str | None, 'index': int}` (index in file order). With a
    `teacher_tokenizer`, each also has `teacher_prompt_tokens`: the prompt rendered with the teacher's chat template
    (and `teacher_system_prompt`), tokenized with the shared vocabulary.
    A record is malformed when it is not valid JSON, not an object, or its `prompt_field` is missing / empty / of
    the wrong type; it is over-long when its tokenized prompt exceeds `max_prompt_length`. `on_bad_record='fail'`
    raises a ValueError at the first such record; `'skip'` drops it, counts it, and logs a warning.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f'on_bad_record={on_bad_record!r} must be one of {BAD_RECORD_POLICIES}')
    report = DataReport()
    prompts = []
    for location, record in read_records(path, data_format):
        report.total += 1
        problem, kind = None, 'malformed'
        if isinstance(record, str):
            problem = record
        elif not isinstance(record, dict):
            problem = f'record is a {type(record).__name__}, not an object'
        elif prompt_field not in record:
            problem = f'missing field {prompt_field!r} (fields: {sorted(record)})'
        else:
            problem = _check_prompt(record[prompt_field], chat_template)
        if problem is None:
            tokens = encode_prompt(
                record[prompt_field], tokenizer, prompt_template=prompt_template, chat_template=chat_template
            )
            teacher_tokens = None
            if teacher_tokenizer is not None:
                teacher_tokens = encode_prompt(
                    record[prompt_field],
                    teacher_tokenizer,
                    prompt_template=prompt_template,
                    chat_template=chat_template,
                    system_prompt=teacher_system_prompt,
                )
            longest = max(len(tokens), len(teacher_tokens or ()))
            if longest > max_prompt_length:
                problem, kind = f'prompt has {longest} tokens > max_prompt_length={max_prompt_length}', 'too_long'
        if problem is not None:
            if on_bad_record == 'fail':
                raise ValueError(f'bad record at {location}: {problem} (set data.on_bad_record="skip" to drop it)')
            setattr(report, kind, getattr(report, kind) + 1)
            if len(report.problems) < 5:
                report.problems.append(f'{location}: {problem}')
            continue
        answer = record.get(answer_field) if answer_field else None
        prompts.append(
            {
                'prompt_tokens': np.asarray(tokens, np.int32),
                'answer': None if answer is None else str(answer),
                'index': report.total - 1,
            }
        )
        if teacher_tokens is not None:
            prompts[-1]['teacher_prompt_tokens'] = np.asarray(teacher_tokens, np.int32)
    report.kept = len(prompts)
    if report.malformed or report.too_long:
        logging.warning('data %s: %s', path, report.summary())
    if not prompts:
        raise ValueError(f'no usable prompts in {path!r}: {report.summary()}')
    return prompts, report


def prompt_dataset(prompts: Sequence[dict], *, batch_size: int, seed: int) -> grain.MapDataset:
    """Shuffled (reshuffled every epoch), endlessly repeated batches of `batch_size` prompts (lists of dicts)."""
    if batch_size < 1 or batch_size > len(prompts):
        raise ValueError(f'batch_size={batch_size} must be in [1, number of prompts {len(prompts)}]')
    return (
        grain.MapDataset.source(list(prompts))
        .shuffle(seed=seed)
        .repeat(None)
        .batch(batch_size, drop_remainder=True, batch_fn=list)
    )


def prompt_iterator(prompts: Sequence[dict], *, batch_size: int, seed: int, state: dict | None = None):
    """A grain iterator over `prompt_dataset`; `state` is a previous iterator's `get_state()` (from a checkpoint)."""
    iterator = iter(prompt_dataset(prompts, batch_size=batch_size, seed=seed).to_iter_dataset())
    if state is not None:
        iterator.set_state(state)
    return iterator
