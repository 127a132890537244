"""The repeated doubling task: solutions against digit-wise doubling and Python's integers, length, grading, splits,
and the shipped long pair against transformers."""

import json

import numpy as np
import pytest

from tropd_jax import grading
from tropd_jax.tasks import arithmetic, doubling


def _double_digitwise(line: str) -> str:
    """Independent reference: schoolbook doubling from the ones up, carry by carry, on a digit string."""
    digits, carry = [], 0
    for d in reversed(line):
        total = 2 * int(d) + carry
        digits.append(str(total % 10))
        carry = total // 10
    assert carry == 0, 'the line width must hold the doubled value'
    return ''.join(reversed(digits))


def test_worked_solution_is_digitwise_doubling():
    train, evaluation = doubling.make_splits(1, 200, 50)
    for record in train + evaluation:
        operand, factor = record['problem'].split('*')
        assert len(operand) == 7 and factor == '512'
        assert record['answer'] == str(int(operand) * 512) and len(record['answer']) == 10
        *lines, boxed = doubling.worked_solution(record['problem']).split('\n')
        previous = operand.zfill(10)
        for line in lines:
            assert line == _double_digitwise(previous)
            # The local rule the docstring states: each digit from two digits of the line above.
            assert line == ''.join(
                str((2 * int(previous[j]) + (j + 1 < 10 and int(previous[j + 1]) >= 5)) % 10) for j in range(10)
            )
            previous = line
        assert len(lines) == 9 and boxed == f'\\boxed{{{lines[-1]}}}' == f'\\boxed{{{record["answer"]}}}'


def test_solutions_are_at_least_100_tokens():
    tokenizer = arithmetic.build_tokenizer()
    train, _ = doubling.make_splits(0, 300, 0)
    for record in train:
        ids = tokenizer.encode(doubling.worked_solution(record['problem']), add_special_tokens=False)
        assert len(ids) == 111 and tokenizer.unk_token_id not in ids


def test_answers_grade_and_a_wrong_digit_fails():
    _, evaluation = doubling.make_splits(2, 0, 100)
    rng = np.random.default_rng(0)
    for record in evaluation:
        solution = doubling.worked_solution(record['problem'])
        assert grading.grade(solution, record['answer'])
        answer = record['answer']
        i = int(rng.integers(len(answer)))
        wrong = answer[:i] + str((int(answer[i]) + int(rng.integers(1, 10))) % 10) + answer[i + 1 :]
        assert not grading.grade(solution.replace(f'{{{answer}}}', f'{{{wrong}}}'), answer)
        assert not grading.grade(solution.split('\\boxed')[0], answer)  # no box: wrong


def test_splits_are_deterministic_disjoint_and_eval_is_stable():
    train, evaluation = doubling.make_splits(7, 500, 100)
    assert (train, evaluation) == doubling.make_splits(7, 500, 100)
    assert len({r['problem'] for r in train + evaluation}) == 600
    assert not {r['problem'] for r in train} & {r['problem'] for r in evaluation}
    assert doubling.make_splits(7, 50, 100)[1] == evaluation  # eval does not depend on num_train
    assert doubling.make_splits(8, 500, 100)[1] != evaluation
    # Other knobs: every product still has exactly the line width.
    train, _ = doubling.make_splits(0, 20, 5, digits=3, doublings=4)
    assert all(len(r['answer']) == len(doubling.lines(r['problem'])[0]) for r in train)
    with pytest.raises(ValueError, match='too many'):
        doubling.make_splits(0, 10_000, 10, digits=3, doublings=4)


def test_bad_problems_and_knobs_raise():
    with pytest.raises(ValueError, match='power of two'):
        doubling.worked_solution('1234*12')
    with pytest.raises(ValueError, match='digits and doublings'):
        doubling.make_splits(0, 1, 1, digits=0)


def test_cli_writes_the_splits(tmp_path):
    doubling.main(['--out', str(tmp_path), '--seed', '3', '--num-train', '20', '--num-eval', '5', '--digits', '5'])
    read = lambda name: [json.loads(line) for line in open(tmp_path / name)]
    assert (read('train.jsonl'), read('eval.jsonl')) == doubling.make_splits(3, 20, 5, digits=5)


def test_shipped_long_pair_loads_and_matches_transformers():
    import torch
    import transformers

    from tropd_jax import evaluate
    from tropd_jax.models import from_pretrained

    assets = doubling.tiny_long_assets()
    read = lambda path: [json.loads(line) for line in open(path)]
    train, evaluation = read(assets.train_data), read(assets.eval_data)
    assert len(evaluation) == 256 and not {r['problem'] for r in train} & {r['problem'] for r in evaluation}
    assert all(r['answer'] == str(int(r['problem'].split('*')[0]) * 512) for r in train[:500] + evaluation)

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.tokenizer)
    prompt = evaluate.prompt_ids(tokenizer, evaluation[0]['problem'])
    response = tokenizer.encode(doubling.worked_solution(evaluation[0]['problem']), add_special_tokens=False)
    tokens = np.array([prompt + response])
    sizes = set()
    for path in (assets.teacher, assets.student):
        assert transformers.AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        model, config = from_pretrained(path)
        assert config.architecture == 'qwen3' and config.eos_token_id == tokenizer.eos_token_id
        ours, _ = model(tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = reference(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=2e-4)
        sizes.add(sum(p.numel() for p in reference.parameters()))
        # Trained models: the worked solution is far likelier than under a uniform guess.
        logprobs = torch.log_softmax(torch.tensor(theirs[0, len(prompt) - 1 : -1]), -1)
        assert logprobs[torch.arange(len(response)), torch.tensor(response)].mean() > np.log(0.5)
    assert len(sizes) == 2 and max(sizes) < 1_000_000  # teacher and student differ; both tiny
