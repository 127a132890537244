"""avg@K evaluation end to end with a checkpoint whose answers are known in advance.

The "bigram" model has one layer whose attention and MLP outputs are zero, one-hot embeddings and an LM head that
maps each token to one fixed successor with logit ~113, so at temperature 1 it deterministically writes
`\\boxed{7}<|im_end|>` after the chat template's final newline. Its avg@K on any records is therefore the fraction
of answers equal to 7, which the tests compute independently.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import evaluate
from tropd_jax.models import Decoder, ModelConfig, save_pretrained
from tropd_jax.tasks import arithmetic

RECORDS = [
    {'problem': 'Compute: 1+6', 'answer': '7'},
    {'problem': 'Compute: 2+2', 'answer': '4'},
    {'problem': 'Compute: (9-2)*(8-7)+0*(1+2)', 'answer': '7.0'},  # a longer prompt bucket, math-verify path
    {'problem': 'Compute: 3*3-1', 'answer': '8'},
    {'problem': 'Compute: 9-2', 'answer': '7'},
]
EXPECTED = np.array([1, 0, 1, 0, 1])  # per problem, whatever the sample


@pytest.fixture(scope='module')
def tokenizer():
    return arithmetic.build_tokenizer()


def bigram_model(tokenizer, answer: str = '7') -> Decoder:
    vocab = hidden = 128
    config = ModelConfig(
        architecture='qwen3',
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        qk_norm=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)
    chain = ids('\n') + ids('\\boxed{') + ids(answer) + ids('}') + [tokenizer.eos_token_id]
    successor = np.full(vocab, tokenizer.eos_token_id)
    successor[chain[:-1]] = chain[1:]
    model.embed[...] = jnp.eye(vocab, hidden)
    model.layers[0].attn.o_proj[...] = jnp.zeros_like(model.layers[0].attn.o_proj[...])
    model.layers[0].mlp.down_proj[...] = jnp.zeros_like(model.layers[0].mlp.down_proj[...])
    # The final norm scales a one-hot row to sqrt(hidden) ~ 11.3, so the successor's logit is ~113.
    model.lm_head[...] = 10.0 * jax.nn.one_hot(successor, vocab)
    return model


def test_evaluate_counts_known_answers(tokenizer):
    model = bigram_model(tokenizer)
    # 5 problems x 3 samples = 15 rows in batches of 4: the last batch is filled with uncounted repeats.
    result = evaluate.evaluate(
        model, tokenizer, RECORDS, samples=3, key=jax.random.key(0), max_new_tokens=8, batch_size=4
    )
    np.testing.assert_array_equal(result['correct'], np.repeat(EXPECTED[:, None], 3, axis=1))
    assert result['avg_at_k'] == pytest.approx(EXPECTED.mean())
    assert result['pass_at_k'] == pytest.approx(EXPECTED.mean())
    assert (result['k'], result['num_problems']) == (3, 5)
    assert result['mean_response_length'] == 4  # \boxed{  7  }  <|im_end|>
    assert result['truncated_fraction'] == 0
    assert result['completions'] == ['\\boxed{7}'] * 5

    wrong = [dict(r, answer=str(int(float(r['answer'])) + 1)) for r in RECORDS]
    result = evaluate.evaluate(
        model, tokenizer, wrong, samples=2, key=jax.random.key(1), max_new_tokens=8, batch_size=4
    )
    assert result['avg_at_k'] == 0 and result['pass_at_k'] == 0

    # Cut before the box closes: every row is truncated and nothing counts as answered.
    result = evaluate.evaluate(
        model, tokenizer, RECORDS, samples=1, key=jax.random.key(0), max_new_tokens=2, batch_size=4
    )
    assert result['truncated_fraction'] == 1 and result['avg_at_k'] == 0


def test_pass_at_k_differs_from_avg_at_k(tokenizer, monkeypatch):
    """With a model that is right on only some samples, avg@K and pass@K follow their definitions."""
    right, wrong = bigram_model(tokenizer, '7'), bigram_model(tokenizer, '6')
    calls = []
    original = evaluate.sampling.generate

    def alternate(model, *args, **kwargs):  # odd generate calls use the wrong model
        calls.append(None)
        return original(right if len(calls) % 2 else wrong, *args, **kwargs)

    monkeypatch.setattr(evaluate.sampling, 'generate', alternate)
    records = [{'problem': 'Compute: 1+6', 'answer': '7'}, {'problem': 'Compute: 9-2', 'answer': '7'}]
    # One row per generate call: each problem's two samples come from the right and then the wrong model.
    result = evaluate.evaluate(
        right, tokenizer, records, samples=2, key=jax.random.key(0), max_new_tokens=8, batch_size=1
    )
    assert len(calls) == 4
    assert result['correct'] == [[1, 0], [1, 0]]
    assert result['avg_at_k'] == 0.5 and result['pass_at_k'] == 1.0


@pytest.mark.slow
def test_cli_prints_table_and_json_line(tokenizer, tmp_path):
    checkpoint = str(tmp_path / 'bigram')
    save_pretrained(bigram_model(tokenizer), checkpoint)
    arithmetic.save_tokenizer(tokenizer, checkpoint)
    data = tmp_path / 'problems.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu')
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'tropd_jax.evaluate',
            f'--model={checkpoint}',
            f'--data={data}',
            '--samples=2',
            '--max_new_tokens=8',
            '--batch_size=4',
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary['model'] == checkpoint
    assert summary['avg_at_k'] == pytest.approx(EXPECTED.mean())
    assert summary['pass_at_k'] == pytest.approx(EXPECTED.mean())
    assert (summary['k'], summary['num_problems']) == (2, 5)
    assert 'avg@2' in out and '0.6000' in out


def test_load_records(tmp_path):
    path = tmp_path / 'data.jsonl'
    path.write_text('{"problem": "Compute: 1+1", "answer": 2}\n\n{"problem": "Compute: 2+2", "answer": "4"}\n')
    assert evaluate.load_records(str(path)) == [
        {'problem': 'Compute: 1+1', 'answer': '2'},
        {'problem': 'Compute: 2+2', 'answer': '4'},
    ]
    assert len(evaluate.load_records(str(path), limit=1)) == 1
    path.write_text('{"problem": "Compute: 1+1", "answer": "2"}\n{"question": "x", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r'data.jsonl:2'):
        evaluate.load_records(str(path))
    path.write_text('{"problem": "Compute: 1+1", "answer": "2"}\n["Compute: 2+2", "4"]\n')
    with pytest.raises(ValueError, match=r'data.jsonl:2: a record needs'):
        evaluate.load_records(str(path))


def test_config_records_read_the_trainers_fields_formats_and_count(tmp_path):
    """The trainer's evaluation problems: `data`'s field names and format, the first `eval.num_problems`, problems
    given as chat messages; a record without the fields names its file and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tropd_jax import config as config_lib

    rows = [{'question': f'Compute: {i}+1', 'solution': i + 1} for i in range(5)]
    rows[3]['question'] = [{'role': 'user', 'content': 'Compute: 3+1'}]
    pq.write_table(
        pa.Table.from_pylist([{**r, 'question': json.dumps(r['question'])} for r in rows]),
        str(tmp_path / 'eval.parquet'),
    )
    (tmp_path / 'eval.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = config_lib.default_config()
    config.data.prompt_field, config.data.answer_field = 'question', 'solution'
    config.eval.path, config.eval.num_problems = str(tmp_path / 'eval.jsonl'), 0
    records = evaluate.config_records(config)
    assert records == [{'problem': r['question'], 'answer': str(r['solution'])} for r in rows]
    config.eval.num_problems = 2
    assert evaluate.config_records(config) == records[:2]
    config.eval.path, config.data.format, config.eval.num_problems = str(tmp_path / 'eval.parquet'), 'parquet', 4
    assert [r['answer'] for r in evaluate.config_records(config)] == ['1', '2', '3', '4']
    config.data.answer_field = 'answer'
    with pytest.raises(ValueError, match=r"eval.parquet:row 0: a record needs .*'question' and an 'answer'"):
        evaluate.config_records(config)


def test_cli_reports_malformed_jsonl_by_file_and_line(tmp_path):
    data = tmp_path / 'problems.jsonl'
    data.write_text('{"problem": "Compute: 1+1", "answer": "2"}\n{"problem": "Compute: 2+2", "answer": \n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''), JAX_PLATFORMS='cpu')
    out = subprocess.run(
        [sys.executable, '-m', 'tropd_jax.evaluate', f'--model={tmp_path}', f'--data={data}'],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert out.returncode == 1
    assert f'error: {data}:2: invalid JSON (Expecting value)' in out.stderr
    assert 'Traceback' not in out.stderr, out.stderr
