"""The arithmetic task: answers against Python's eval, worked solutions against Python's own parser, splits,
the tokenizer, and the shipped tiny assets against transformers."""

import ast
import json
import os
import re

import numpy as np
import pytest

from tropd_jax.tasks import arithmetic

EXPRESSION = re.compile(r'[0-9+\-*()]+')


def _expression(problem: str) -> str:
    assert EXPRESSION.fullmatch(problem), problem
    return problem


def _intermediate_values(text: str) -> list[int]:
    """Every subexpression's value, by Python's parser and eval."""
    tree = ast.parse(text, mode='eval')
    return [eval(ast.unparse(node)) for node in ast.walk(tree.body) if isinstance(node, ast.expr)]


@pytest.mark.parametrize('ops,digits,max_value', [(1, 1, None), (3, 1, 99), ((1, 4), 1, 99), (2, 2, 999), (5, 1, None)])
def test_answers_are_python_eval_and_respect_the_knobs(ops, digits, max_value):
    train, evaluation = arithmetic.make_splits(3, 150, 50, ops, digits, max_value)
    low, high = (ops, ops) if isinstance(ops, int) else ops
    bound = 10 ** (digits + 1) - 1 if max_value is None else max_value
    for record in train + evaluation:
        text = _expression(record['problem'])
        assert record['answer'] == str(eval(text))
        assert low <= sum(text.count(op) for op in '+-*') <= high
        operands = re.findall(r'\d+', text)
        assert all(len(operand) <= digits for operand in operands)
        assert all(0 <= v <= bound for v in _intermediate_values(text))
    all_operands = [o for r in train for o in re.findall(r'\d+', r['problem'])]
    assert max(len(o) for o in all_operands) == digits


def _leftmost_reduction(text: str) -> str:
    """Independent reference: Python's AST, replace the leftmost op whose operands are both literals by its value."""
    tree = ast.parse(text, mode='eval')
    ready = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
    ]
    target = min(ready, key=lambda node: node.col_offset)

    class Replace(ast.NodeTransformer):
        def visit_BinOp(self, node):
            if node is target:
                return ast.Constant(eval(ast.unparse(node)))
            return self.generic_visit(node)

    return ast.dump(Replace().visit(tree))


def test_worked_solution_makes_one_correct_reduction_per_line():
    train, _ = arithmetic.make_splits(0, 300, 0, (1, 5), 1, 99)
    for record in train:
        text = _expression(record['problem'])
        solution = arithmetic.worked_solution(record['problem'])
        *steps, last = solution.split('\n')
        assert last == f'\\boxed{{{record["answer"]}}}'
        assert all(step.startswith('= ') for step in steps)
        previous = text
        for step in steps:
            current = step[2:]
            assert eval(current) == eval(text)  # every line keeps the value
            assert ast.dump(ast.parse(current, mode='eval')) == _leftmost_reduction(previous)
            previous = current
        assert steps[-1] == f'= {record["answer"]}'
        assert len(steps) == sum(text.count(op) for op in '+-*')


def test_worked_solution_handles_negative_intermediates():
    # Not produced by the generator, but any user expression should get a correct solution.
    problem = '2*(3-5)-(1-4)*2'
    steps = arithmetic.solution_steps(problem)
    assert [eval(s) for s in steps] == [eval('2*(3-5)-(1-4)*2')] * len(steps)
    assert steps[-1] == '2'


def test_render_and_parse_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(300):
        tree = arithmetic.random_expression(rng, int(rng.integers(1, 6)), 1, 10**6)
        text = arithmetic.render(tree)
        assert arithmetic.parse(text) == tree
        assert eval(text) == arithmetic.value(tree)
    assert arithmetic.render(('-', 8, ('-', 3, 1))) == '8-(3-1)'
    assert arithmetic.render(('*', ('+', 1, 2), ('*', 3, 4))) == '(1+2)*(3*4)'


def test_splits_are_disjoint_unique_and_deterministic():
    train, evaluation = arithmetic.make_splits(7, 400, 100, (1, 3), 1, 99)
    problems = [r['problem'] for r in train + evaluation]
    assert len(train) == 400 and len(evaluation) == 100
    assert len(set(problems)) == len(problems)
    assert arithmetic.make_splits(7, 400, 100, (1, 3), 1, 99) == (train, evaluation)
    assert arithmetic.make_splits(8, 400, 100, (1, 3), 1, 99)[1] != evaluation
    # The held-out split does not move when the train split grows.
    assert arithmetic.make_splits(7, 900, 100, (1, 3), 1, 99)[1] == evaluation


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match='ops'):
        arithmetic.make_splits(0, 1, 1, 0)
    with pytest.raises(ValueError, match='digits'):
        arithmetic.make_splits(0, 1, 1, 2, 0)
    with pytest.raises(ValueError, match='max_value'):
        arithmetic.make_splits(0, 1, 1, 2, 2, 50)
    with pytest.raises(ValueError, match='distinct'):
        arithmetic.make_splits(0, 500, 0, 1, 1, 9)  # far fewer than 500 one-op problems stay below 10
    with pytest.raises(ValueError, match='unsupported'):
        arithmetic.parse('2**3')


def test_cli_writes_the_splits(tmp_path):
    arithmetic.main(
        [
            '--out',
            str(tmp_path),
            '--seed',
            '5',
            '--num-train',
            '30',
            '--num-eval',
            '10',
            '--ops',
            '2-3',
            '--digits',
            '1',
        ]
    )
    read = lambda name: [json.loads(line) for line in open(tmp_path / name)]
    train, evaluation = read('train.jsonl'), read('eval.jsonl')
    assert (train, evaluation) == arithmetic.make_splits(5, 30, 10, (2, 3), 1)
    assert all(set(r) == {'problem', 'answer'} for r in train + evaluation)


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    built = arithmetic.build_tokenizer()
    arithmetic.save_tokenizer(built, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['tokenizer.json', 'tokenizer_config.json']
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 105
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert len(special) == 4 and tokenizer.eos_token == '<|im_end|>'

    train, _ = arithmetic.make_splits(0, 50, 0, (1, 4), 1, 99)
    for record in train:
        text = record['problem'] + '\n' + arithmetic.worked_solution(record['problem'])
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert ids == built.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        # One token per character, except the single `\boxed{` token.
        assert len(ids) == len(text) - len('\\boxed{') + 1

    messages = [{'role': 'user', 'content': '1+2'}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == '<|endoftext|><|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n'
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.encode('é', add_special_tokens=False) == [tokenizer.unk_token_id]


def test_shipped_assets_load_and_match_transformers():
    torch = pytest.importorskip('torch')
    import transformers

    from tropd_jax import evaluate
    from tropd_jax.models import from_pretrained

    assets = arithmetic.tiny_assets()
    read = lambda path: [json.loads(line) for line in open(path)]
    train, evaluation = read(assets.train_data), read(assets.eval_data)
    assert not {r['problem'] for r in train} & {r['problem'] for r in evaluation}
    assert all(r['answer'] == str(eval(_expression(r['problem']))) for r in train[:500] + evaluation)

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.tokenizer)
    prompt = evaluate.prompt_ids(tokenizer, evaluation[0]['problem'])
    response = tokenizer.encode(arithmetic.worked_solution(evaluation[0]['problem']), add_special_tokens=False)
    tokens = np.array([prompt + response])
    sizes = set()
    for path in (assets.teacher, assets.student):
        assert transformers.AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        model, config = from_pretrained(path)
        assert config.architecture == 'qwen3' and config.eos_token_id == tokenizer.eos_token_id
        assert config.vocab_size >= len(tokenizer)
        ours, _ = model(tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = reference(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=2e-4)
        sizes.add(sum(p.numel() for p in reference.parameters()))
        # A trained model: the worked solution is far likelier than under a uniform guess.
        logprobs = torch.log_softmax(torch.tensor(theirs[0, len(prompt) - 1 : -1]), -1)
        mean_logprob = logprobs[torch.arange(len(response)), torch.tensor(response)].mean()
        assert mean_logprob > np.log(0.5)
    assert len(sizes) == 2  # teacher and student differ
