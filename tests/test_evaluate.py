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


def test_greedy_and_sampled_on_a_model_unsure_of_its_answer(tokenizer):
    """An LM head scaled down 20x: each successor's logit is m = 0.5 * sqrt(hidden) ~ 5.66 above the others (the
    final RMS norm maps a one-hot row to sqrt(hidden)). The argmax still writes `\\boxed{7}`, so greedy accuracy is
    the fraction of answers equal to 7; a temperature-1 sample picks each of the 4 chain tokens with probability
    p = e^m / (e^m + V - 1) over the tokenizer's V tokens, and a wrong token ends the response (its successor is
    EOS), so avg@K is p^4 on those problems."""
    model = bigram_model(tokenizer)
    model.lm_head[...] = 0.05 * model.lm_head[...]
    result = evaluate.greedy_and_sampled(
        model, tokenizer, RECORDS, samples=64, key=jax.random.key(0), max_new_tokens=8, batch_size=64
    )
    assert result['greedy'] == pytest.approx(EXPECTED.mean())
    assert result['greedy_response_length'] == 4 and result['k'] == 64
    margin = 0.5 * np.sqrt(128.0)
    p = np.exp(margin) / (np.exp(margin) + len(tokenizer) - 1)
    # 5 x 64 = 320 draws with success probability 0.6 p^4 ~ 0.17: the standard error is ~0.02.
    assert result['avg_at_k'] == pytest.approx(EXPECTED.mean() * p**4, abs=0.07)
    # pass@64: with p^4 ~ 0.29 each problem whose answer is 7 has a right sample (all but ~1e-9 of the time), and
    # the others need two unlikely tokens in a row (~1e-5 per sample).
    assert result['pass_at_k'] == pytest.approx(EXPECTED.mean())


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


BOXED_TEMPLATE = "{prompt}\nLet's think step by step and output the final answer within \\boxed{{}}."


@pytest.mark.parametrize('chat_template', [True, False])
def test_evaluation_prompts_are_the_training_prompts(tokenizer, tmp_path, monkeypatch, chat_template):
    """`evaluate_with_config` renders each problem with `data.prompt_template` and `data.chat_template`, as the
    trainer's `data.load_prompts` does: the rows it samples from hold the training prompt's ids, instruction
    included (a string problem and a chat-message problem)."""
    from tropd_jax import config as config_lib
    from tropd_jax import data

    records = [
        {'problem': 'Compute: 1+6', 'answer': '7'},
        {'problem': [{'role': 'user', 'content': 'Compute: 9-2'}], 'answer': '7'},
    ][: 2 if chat_template else 1]  # message lists need the chat template
    path = tmp_path / 'problems.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    config = config_lib.default_config()
    config.data.prompt_template, config.data.chat_template = BOXED_TEMPLATE, chat_template
    config.eval.path, config.eval.max_new_tokens, config.eval.batch_size = str(path), 4, 8
    training, _ = data.load_prompts(
        str(path), tokenizer, prompt_template=BOXED_TEMPLATE, chat_template=chat_template, max_prompt_length=512
    )
    seen = []
    original = evaluate.sampling.generate

    def capture(model, tokens, mask, *args, **kwargs):
        tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
        seen.extend(row[m].tolist() for row, m in zip(tokens, mask))
        return original(model, tokens, mask.astype(np.int32), *args, **kwargs)

    monkeypatch.setattr(evaluate.sampling, 'generate', capture)
    evaluate.evaluate_with_config(
        bigram_model(tokenizer), tokenizer, evaluate.config_records(config), jax.random.key(0), config
    )
    expected = sorted(p['prompt_tokens'].tolist() for p in training)
    assert sorted(seen) == expected
    text = tokenizer.decode(expected[0])
    assert 'output the final answer within \\boxed{}' in text
    assert ('<|im_start|>assistant' in text) == chat_template


def test_convert_record_maps_common_field_names():
    convert = evaluate.convert_record
    math500 = {'problem': 'P', 'solution': 'so \\boxed{\\frac{1}{2}}', 'answer': '\\frac{1}{2}', 'level': 5}
    assert convert(math500) == {'problem': 'P', 'answer': '\\frac{1}{2}'}  # `answer` before `solution`
    assert convert({'ID': '2024-I-1', 'Problem': 'P', 'Solution': 'long', 'Answer': 204}) == {
        'problem': 'P',
        'answer': '204',
    }
    assert convert({'question': 'Q', 'answer': 'She pays 3 * 24 = 72.\n#### 72'}) == {'problem': 'Q', 'answer': '72'}
    nested = 'First \\boxed{1}, finally \\boxed{\\dfrac{\\sqrt{3}}{2}} is it.'
    assert convert({'problem': 'P', 'solution': nested})['answer'] == '\\dfrac{\\sqrt{3}}{2}'
    assert convert({'q': 'P', 'gold': 3}, problem_field='q', answer_field='gold') == {'problem': 'P', 'answer': '3'}
    with pytest.raises(ValueError, match=r"record fields \['text'\]: no problem field"):
        convert({'text': 'P'})


def test_convert_script_writes_records_the_evaluation_reads(tmp_path):
    source, target = tmp_path / 'aime.jsonl', tmp_path / 'out.jsonl'
    source.write_text(
        json.dumps({'Problem': 'Find x.', 'Answer': 12}) + '\n' + json.dumps({'problem': 'P', 'solution': 'x'}) + '\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, 'scripts', 'convert_eval_data.py')
    out = subprocess.run([sys.executable, script, str(source), str(target)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'wrote 2 records' in out.stdout
    assert evaluate.load_records(str(target)) == [
        {'problem': 'Find x.', 'answer': '12'},
        {'problem': 'P', 'answer': 'x'},
    ]
    source.write_text('{"Problem": "Find x."}\n')
    out = subprocess.run([sys.executable, script, str(source), str(target)], capture_output=True, text=True)
    assert out.returncode == 1 and f'error: {source}:1: record fields' in out.stderr


SHARDED = """
import json, sys
import jax
sys.path.insert(0, {tests!r})
from test_evaluate import RECORDS, bigram_model
from tropd_jax import evaluate, sharding
from tropd_jax.tasks import arithmetic
tokenizer = arithmetic.build_tokenizer()
mesh = sharding.make_mesh(data=2, fsdp=2)
model = sharding.shard_model(bigram_model(tokenizer), mesh)
result = evaluate.evaluate(model, tokenizer, RECORDS, samples=3, key=jax.random.key(0), max_new_tokens=8,
                           batch_size=3, top_p=0.9, mesh=mesh)
summary = {{'correct': result['correct'], 'lengths': result['mean_response_length']}}
print(json.dumps({{'devices': jax.device_count(), **summary}}))
"""


@pytest.mark.slow
def test_evaluation_sharded_over_four_devices(tmp_path):
    """On a 2 x 2 (data, fsdp) mesh of CPU devices the rows are split over all four (a batch of 3 rounds up to 4)
    and the grades are those the model's fixed answer gives."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=root,
        JAX_PLATFORMS='cpu',
        XLA_FLAGS='--xla_force_host_platform_device_count=4',
    )
    code = SHARDED.format(tests=os.path.join(root, 'tests'))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['devices'] == 4
    np.testing.assert_array_equal(result['correct'], np.repeat(EXPECTED[:, None], 3, axis=1))
    assert result['lengths'] == 4
