"""Multi-step integer arithmetic: the synthetic chain-of-thought task of the tiny demo.

A problem is an expression over positive integers with `+`, `-`, `*` and parentheses, e.g. `7+3*(9-4)`, with
no instruction text (every token costs CPU time in the demo). Its worked solution evaluates one operation per line,
always the leftmost operation whose operands are both numbers (standard precedence), and ends with the boxed answer:

    = 7+3*5
    = 7+15
    = 22
    \\boxed{22}

Difficulty knobs: the number of operations (`ops`), the operand digit count (`digits`), and a bound on every
intermediate value (`max_value`, default `10 ** (digits + 1) - 1`), enforced by rejection sampling so a tiny model
never has to multiply two large numbers in one step.

Records are JSONL `{"problem": str, "answer": str}`. CLI:

    python -m tropd_jax.tasks.arithmetic --out DIR --seed 0 --num-train 20000 --num-eval 256 --ops 3 --digits 1
"""

import argparse
import ast
import importlib.resources
import json
import os
import string
from typing import NamedTuple

import numpy as np

# An expression tree: an int leaf, or (operator, left, right).
Expr = int | tuple

_PRECEDENCE = {'+': 1, '-': 1, '*': 2}
_AST_OPERATORS = {ast.Add: '+', ast.Sub: '-', ast.Mult: '*'}


def apply(op: str, a: int, b: int) -> int:
    if op == '+':
        return a + b
    if op == '-':
        return a - b
    if op == '*':
        return a * b
    raise ValueError(f"unknown operator {op!r}; expected one of '+', '-', '*'")


def value(expr: Expr) -> int:
    """The integer value of an expression tree."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    return apply(op, value(left), value(right))


def render(expr: Expr) -> str:
    """Expression tree -> string with the fewest parentheses that keep its meaning under left associativity."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    left_text, right_text = render(left), render(right)
    # The left operand needs brackets only for lower precedence; the right one also for equal precedence, since
    # `a-(b-c)` and `a*(b*c)` would otherwise be read (and reduced) as `(a-b)-c` and `(a*b)*c`.
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f'({left_text})'
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        right_text = f'({right_text})'
    return f'{left_text}{op}{right_text}'


def parse(text: str) -> Expr:
    """String -> expression tree, with Python's precedence."""
    text = text.strip()
    try:
        node = ast.parse(text, mode='eval').body
    except SyntaxError as e:
        raise ValueError(f'not an arithmetic expression: {text!r}') from e

    def convert(node) -> Expr:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -convert(node.operand)  # a negative intermediate result, e.g. `-4*2`
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPERATORS:
            return (_AST_OPERATORS[type(node.op)], convert(node.left), convert(node.right))
        raise ValueError(f'unsupported element {ast.unparse(node)!r} in {text!r}; only integers, + - * and ( )')

    return convert(node)


def reduce_once(expr: Expr) -> Expr:
    """Evaluates the leftmost operation whose two operands are numbers."""
    if isinstance(expr, int):
        raise ValueError('a number has nothing left to reduce')
    op, left, right = expr
    if isinstance(left, int) and isinstance(right, int):
        return apply(op, left, right)
    if not isinstance(left, int):
        return (op, reduce_once(left), right)
    return (op, left, reduce_once(right))


def solution_steps(problem: str) -> list[str]:
    """The intermediate expressions of the worked solution, one reduction each; the last is the answer."""
    expr = parse(problem)
    steps = []
    while not isinstance(expr, int):
        expr = reduce_once(expr)
        steps.append(render(expr))
    return steps


def worked_solution(problem: str) -> str:
    """The chain-of-thought response the models are trained on (without the end-of-turn token)."""
    steps = solution_steps(problem)
    answer = steps[-1] if steps else str(parse(problem))
    return ''.join(f'= {step}\n' for step in steps) + f'\\boxed{{{answer}}}'


def _random_tree(rng: np.random.Generator, ops: int, digits: int) -> Expr:
    if ops == 0:
        return int(rng.integers(1, 10**digits))  # no zero operands: `0*(...)` would make many answers 0
    num_left = int(rng.integers(0, ops))  # operations in the left subtree; the rest minus this one go right
    op = '+-*'[int(rng.integers(0, 3))]
    return (op, _random_tree(rng, num_left, digits), _random_tree(rng, ops - 1 - num_left, digits))


def _within(expr: Expr, max_value: int) -> bool:
    """Whether every intermediate value lies in [0, max_value]."""
    if isinstance(expr, int):
        return 0 <= expr <= max_value
    return _within(expr[1], max_value) and _within(expr[2], max_value) and 0 <= value(expr) <= max_value


def random_expression(rng: np.random.Generator, ops: int, digits: int, max_value: int | None = None) -> Expr:
    """A random expression tree with `ops` operations on `digits`-digit operands, all intermediates in range."""
    if ops < 1:
        raise ValueError(f'ops must be at least 1, got {ops}')
    if digits < 1:
        raise ValueError(f'digits must be at least 1, got {digits}')
    max_value = 10 ** (digits + 1) - 1 if max_value is None else max_value
    if max_value < 10**digits - 1:
        raise ValueError(f'max_value={max_value} is below the largest {digits}-digit operand')
    for _ in range(100_000):
        expr = _random_tree(rng, ops, digits)
        if _within(expr, max_value):
            return expr
    raise ValueError(f'no expression with ops={ops}, digits={digits} keeps all values within [0, {max_value}]')


def _ops_range(ops: int | tuple[int, int]) -> tuple[int, int]:
    low, high = (ops, ops) if isinstance(ops, int) else ops
    if not 1 <= low <= high:
        raise ValueError(f'ops must be a positive int or a (low, high) range with low <= high, got {ops}')
    return low, high


def make_splits(
    seed: int,
    num_train: int,
    num_eval: int,
    ops: int | tuple[int, int] = 3,
    digits: int = 1,
    max_value: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train / eval records, deterministic in `seed`; each problem appears at most once overall.

    `ops` is a fixed count or an inclusive (low, high) range sampled uniformly per problem.
    """
    low, high = _ops_range(ops)
    rng = np.random.default_rng(seed)
    seen, records = set(), []
    attempts = 0
    while len(records) < num_train + num_eval:
        attempts += 1
        if attempts > 20 * (num_train + num_eval) + 1000:
            raise ValueError(
                f'only {len(records)} distinct problems found for ops={ops}, digits={digits}; '
                f'asked for {num_train} + {num_eval}'
            )
        expr = random_expression(rng, int(rng.integers(low, high + 1)), digits, max_value)
        text = render(expr)
        if text in seen:
            continue
        seen.add(text)
        records.append({'problem': text, 'answer': str(value(expr))})
    # Eval first: its problems never depend on num_train, so growing the train split keeps the eval split fixed.
    return records[num_eval:], records[:num_eval]


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: one token per printable ASCII character, a few whole words, and the chat special tokens.

PAD, BOS, IM_START, IM_END, UNK = '<|pad|>', '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|unk|>'
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END, UNK]
WORD_TOKENS = ['\\boxed{', 'user', 'assistant', 'system']
CHAT_TEMPLATE = (
    '{{ bos_token }}'
    '{% for message in messages %}'
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (105 tokens) with a ChatML-style template; eos is `<|im_end|>`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if c not in '\t\r\x0b\x0c']
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    # BPE without merges and without a pre-tokenizer splits text into characters; unknown characters become <|unk|>.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in WORD_TOKENS])
    tokenizer.decoder = decoders.Fuse()  # concatenate characters back, no spaces in between
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        padding_side='left',
        model_max_length=512,
    )


def save_tokenizer(tokenizer, path: str) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inside, class PreTrainedTokenizerFast)."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path, save_jinja_files=False)
    config_path = os.path.join(path, 'tokenizer_config.json')
    with open(config_path) as f:
        config = json.load(f)
    # The generic class name keeps the files readable by transformers v4 and serving stacks too.
    config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    with open(config_path, 'w') as f:
        json.dump(config, f, indent=2)


class TinyAssets(NamedTuple):
    """Paths of a shipped tiny pair: `tiny` (made by `scripts/make_tiny_pair.py`) or `tiny_long`
    (`scripts/make_tiny_long_pair.py`)."""

    tokenizer: str  # directory with tokenizer.json and tokenizer_config.json
    teacher: str  # HF checkpoint directory
    student: str  # HF checkpoint directory
    train_data: str  # JSONL of {"problem", "answer"}
    eval_data: str  # JSONL of held-out {"problem", "answer"}


def tiny_assets(name: str = 'tiny') -> TinyAssets:
    """The shipped pair `name`: `tiny` (this task) or `tiny_long` (`tropd_jax.tasks.doubling`)."""
    root = importlib.resources.files('tropd_jax') / 'assets' / name
    return TinyAssets(
        tokenizer=str(root / 'tokenizer'),
        teacher=str(root / 'teacher'),
        student=str(root / 'student'),
        train_data=str(root / 'data' / 'train.jsonl'),
        eval_data=str(root / 'data' / 'eval.jsonl'),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write train / eval JSONL splits of the arithmetic task.')
    parser.add_argument('--out', required=True, help='output directory; gets train.jsonl and eval.jsonl')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=20_000)
    parser.add_argument('--num-eval', type=int, default=256)
    parser.add_argument('--ops', default='3', help='operations per problem: N, or a range LOW-HIGH')
    parser.add_argument('--digits', type=int, default=1, help='digits per operand')
    parser.add_argument('--max-value', type=int, default=None, help='bound on every intermediate value')
    args = parser.parse_args(argv)
    low, _, high = args.ops.partition('-')
    ops = (int(low), int(high)) if high else int(low)
    train, evaluation = make_splits(args.seed, args.num_train, args.num_eval, ops, args.digits, args.max_value)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, 'train.jsonl'), train)
    write_jsonl(os.path.join(args.out, 'eval.jsonl'), evaluation)
    print(
        f'wrote {len(train)} train and {len(evaluation)} eval problems (ops={args.ops}, digits={args.digits}, '
        f'seed={args.seed}) to {args.out}'
    )


if __name__ == '__main__':
    main()
