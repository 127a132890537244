"""Tokenizer loading and the teacher / student tokenizer compatibility check."""

import pytest
import tokenizers
import transformers

from tropd_jax.models.tokenizer import check_tokenizers_compatible, load_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    '{% if add_generation_prompt %}<|assistant|>{% endif %}'
)


def make_tokenizer(path, words, *, template=TEMPLATE, pad=True):
    """A word-level tokenizer saved as a HF tokenizer directory (ids = positions in `words`)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token='<unk>',
        eos_token='<eos>',
        pad_token='<pad>' if pad else None,
        chat_template=template,
    )
    tokenizer.save_pretrained(path)
    return str(path)


WORDS = ['<unk>', '<pad>', '<eos>'] + [f'w{i}' for i in range(20)]


def test_load_tokenizer_with_chat_template(tmp_path):
    tokenizer = load_tokenizer(make_tokenizer(tmp_path, WORDS, pad=False))
    assert tokenizer.padding_side == 'left'
    assert tokenizer.pad_token == '<eos>'  # falls back to EOS
    text = tokenizer.apply_chat_template(
        [{'role': 'user', 'content': 'w3 w4'}], tokenize=False, add_generation_prompt=True
    )
    assert text == '<|user|>w3 w4<|assistant|>'
    batch = tokenizer(['w1', 'w1 w2 w3'], padding=True)
    assert batch['input_ids'][0] == [2, 2, 4] and batch['attention_mask'][0] == [0, 0, 1]


def test_load_tokenizer_without_template(tmp_path):
    path = make_tokenizer(tmp_path, WORDS, template=None)
    with pytest.raises(ValueError, match='no chat template'):
        load_tokenizer(path)
    assert load_tokenizer(path, chat_template=TEMPLATE).chat_template == TEMPLATE


def test_compatible_tokenizers_report_shared_real_vocabulary(tmp_path):
    teacher = load_tokenizer(make_tokenizer(tmp_path / 't', WORDS))
    student = load_tokenizer(make_tokenizer(tmp_path / 's', WORDS))
    # Embedding tables padded to different sizes are fine: only the real vocabulary is compared.
    assert check_tokenizers_compatible(teacher, student, teacher_vocab_size=64, student_vocab_size=32) == len(WORDS)
    with pytest.raises(ValueError, match='student model has 20 embedding rows, fewer than the 23 tokens'):
        check_tokenizers_compatible(teacher, student, student_vocab_size=20)


def test_incompatible_tokenizers_name_the_token(tmp_path):
    swapped = list(WORDS)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    teacher = load_tokenizer(make_tokenizer(tmp_path / 't', WORDS))
    student = load_tokenizer(make_tokenizer(tmp_path / 's', swapped))
    with pytest.raises(ValueError, match=r"id 5 is 'w2' for the teacher and 'w3' for the student"):
        check_tokenizers_compatible(teacher, student)
    longer = load_tokenizer(make_tokenizer(tmp_path / 'l', WORDS + ['w20']))
    with pytest.raises(ValueError, match=r"id 23 is None for the teacher and 'w20' for the student"):
        check_tokenizers_compatible(teacher, longer)
