"""Tests for tropd_jax/data.py: reading JSONL / Parquet, bad-record policy, shuffling, iterator state, padding."""

import json
import logging
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tropd_jax import data

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


@pytest.fixture(scope='module')
def tokenizer():
    """A character-level tokenizer: token id = 3 + index in string.printable, so lengths are easy to predict."""
    vocab = {c: i + 3 for i, c in enumerate(string.printable)}
    vocab.update({'<pad>': 0, '<|im_start|>': 1, '<|im_end|>': 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<pad>'))
    tok.pre_tokenizer = pre_tokenizers.Split('', 'isolated')
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token='<pad>', eos_token='<|im_end|>', additional_special_tokens=['<|im_start|>']
    )
    t.chat_template = CHAT_TEMPLATE
    return t


def write_jsonl(path, lines):
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def char_ids(text):
    return [3 + string.printable.index(c) for c in text]


def test_jsonl_prompts_with_and_without_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / 'p.jsonl', [json.dumps({'q': 'ab', 'a': 3}), json.dumps({'q': 'xyz', 'a': 'y'})])
    prompts, report = data.load_prompts(
        path, tokenizer, prompt_field='q', answer_field='a', chat_template=False, prompt_template='Q:{prompt}'
    )
    assert [p['prompt_tokens'].tolist() for p in prompts] == [char_ids('Q:ab'), char_ids('Q:xyz')]
    assert [p['answer'] for p in prompts] == ['3', 'y']
    assert (report.total, report.kept, report.malformed, report.too_long) == (2, 2, 0, 0)

    prompts, _ = data.load_prompts(path, tokenizer, prompt_field='q', answer_field='a', chat_template=True)
    expected = [1] + char_ids('user\nab') + [2] + char_ids('\n') + [1] + char_ids('assistant\n')
    assert prompts[0]['prompt_tokens'].tolist() == expected


def test_parquet_matches_jsonl(tmp_path, tokenizer):
    rows = [{'problem': f'{i}+{i}', 'answer': str(2 * i)} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'p.parquet')
    jsonl = write_jsonl(tmp_path / 'p.jsonl', [json.dumps(r) for r in rows])
    from_parquet, _ = data.load_prompts(str(tmp_path / 'p.parquet'), tokenizer)
    from_jsonl, _ = data.load_prompts(jsonl, tokenizer)
    assert [p['prompt_tokens'].tolist() for p in from_parquet] == [p['prompt_tokens'].tolist() for p in from_jsonl]
    assert [p['answer'] for p in from_parquet] == [r['answer'] for r in rows]
    # A directory reads every file in it, in sorted order.
    both, report = data.load_prompts(str(tmp_path), tokenizer)
    assert report.total == 14 and len(both) == 14


BAD_LINES = [
    json.dumps({'problem': 'ok one'}),
    '{"problem": "broken',  # invalid JSON
    json.dumps(['not', 'an', 'object']),
    json.dumps({'question': 'wrong field'}),
    json.dumps({'problem': ''}),
    json.dumps({'problem': 7}),
    json.dumps({'problem': 'x' * 50}),  # over-long
    json.dumps({'problem': 'ok two'}),
]


def test_bad_records_are_counted_and_skipped(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / 'bad.jsonl', BAD_LINES)
    with caplog.at_level(logging.WARNING):
        prompts, report = data.load_prompts(path, tokenizer, chat_template=False, max_prompt_length=20)
    assert [p['index'] for p in prompts] == [0, 7]
    assert (report.total, report.kept, report.malformed, report.too_long) == (8, 2, 5, 1)
    assert 'bad.jsonl:2: invalid JSON' in report.problems[0]
    assert "missing field 'problem'" in report.problems[2]
    assert '5 malformed, 1 over-long' in caplog.text  # reported, never silent


@pytest.mark.parametrize(
    'line, message',
    [
        ('{"problem": "broken', 'bad.jsonl:2: invalid JSON'),
        (json.dumps({'question': 'q'}), "bad.jsonl:2: missing field 'problem'"),
        (json.dumps({'problem': 'x' * 50}), 'bad.jsonl:2: prompt has 50 tokens > max_prompt_length=20'),
    ],
)
def test_bad_record_fails_when_configured(tmp_path, tokenizer, line, message):
    path = write_jsonl(tmp_path / 'bad.jsonl', [json.dumps({'problem': 'fine'}), line])
    with pytest.raises(ValueError, match='bad record at .*' + message.replace('+', r'\+')):
        data.load_prompts(path, tokenizer, chat_template=False, max_prompt_length=20, on_bad_record='fail')


def test_no_usable_prompts_and_missing_path(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / 'bad.jsonl', ['{"x": 1}'])
    with pytest.raises(ValueError, match='no usable prompts'):
        data.load_prompts(path, tokenizer)
    with pytest.raises(FileNotFoundError, match='nope.jsonl'):
        data.load_prompts(str(tmp_path / 'nope.jsonl'), tokenizer)


def make_prompts(n):
    return [{'prompt_tokens': np.arange(i + 1, dtype=np.int32), 'answer': None, 'index': i} for i in range(n)]


def test_shuffle_is_seeded_epochwise_and_complete():
    prompts = make_prompts(10)

    def take(seed, n):
        iterator = data.prompt_iterator(prompts, batch_size=5, seed=seed)
        return [[p['index'] for p in next(iterator)] for _ in range(n)]

    a, b, c = take(0, 4), take(0, 4), take(1, 4)
    assert a == b and a != c
    # Each epoch (two batches) is a permutation of all prompts, and the second epoch is reshuffled.
    assert sorted(a[0] + a[1]) == list(range(10)) and sorted(a[2] + a[3]) == list(range(10))
    assert a[0] + a[1] != a[2] + a[3]


def test_iterator_state_resumes_exactly():
    prompts = make_prompts(7)
    it = data.prompt_iterator(prompts, batch_size=3, seed=4)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state survives a JSON round trip (checkpoints store it so)
    expected = [[p['index'] for p in next(it)] for _ in range(4)]
    resumed = data.prompt_iterator(prompts, batch_size=3, seed=4, state=state)
    assert [[p['index'] for p in next(resumed)] for _ in range(4)] == expected
