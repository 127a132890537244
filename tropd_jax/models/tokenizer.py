"""Tokenizers: loading through `transformers.AutoTokenizer`, and the teacher / student compatibility check.

Distillation compares the teacher's and the student's distributions token id by token id, so both tokenizers
must map every token string to the same id. The models' embedding tables may still have different numbers of
rows (checkpoints pad the vocabulary, e.g. 151,936 vs 152,064 for Qwen2.5 1.5B / 7B): only the shared real
vocabulary (every id the tokenizer can produce) is ever compared.
"""

import transformers

from tropd_jax import paths


def load_tokenizer(path: str, *, chat_template: str | None = None):
    """The tokenizer of a local HF checkpoint directory, set up for left-padded batches.

    Args:
      path: a directory with the tokenizer files (tokenizer.json / tokenizer_config.json, chat template).
      chat_template: a Jinja template replacing the checkpoint's own.

    Returns:
      The `transformers` tokenizer with `padding_side='left'` and a pad token (the EOS token when the checkpoint
      defines none). Raises ValueError when there is no chat template at all, since prompts are formatted with it.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths.local_copy(path))
    tokenizer.padding_side = 'left'
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(f'The tokenizer in {path!r} has no chat template; pass chat_template=.')
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f'The tokenizer in {path!r} defines neither a pad nor an EOS token.')
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizers_compatible(
    teacher_tokenizer,
    student_tokenizer,
    *,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
) -> int:
    """Checks that both tokenizers map tokens identically and returns the shared real vocabulary size.

    Args:
      teacher_tokenizer, student_tokenizer: `transformers` tokenizers.
      teacher_vocab_size, student_vocab_size: optional embedding rows of each model (`ModelConfig.vocab_size`); each
        must cover the real vocabulary. Padding rows beyond it may differ between the models.

    Returns:
      The number of token ids both models score: ids 0 .. size - 1, the largest id plus one (`len(tokenizer)`).

    Raises:
      ValueError naming the first token id that differs, or the model whose embedding is too small.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        teacher_ids = {i: t for t, i in teacher_vocab.items()}
        student_ids = {i: t for t, i in student_vocab.items()}
        for i in sorted(set(teacher_ids) | set(student_ids)):
            if teacher_ids.get(i) != student_ids.get(i):
                raise ValueError(
                    f'Teacher and student tokenizers map tokens differently: id {i} is {teacher_ids.get(i)!r} for the '
                    f'teacher and {student_ids.get(i)!r} for the student (vocabularies of {len(teacher_vocab)} and '
                    f'{len(student_vocab)} tokens). Distillation needs one shared tokenizer.'
                )
    size = max(teacher_vocab.values()) + 1  # `len(tokenizer)` when the ids are contiguous, as in Qwen and Llama
    for name, rows in (('teacher', teacher_vocab_size), ('student', student_vocab_size)):
        if rows is not None and rows < size:
            raise ValueError(
                f'The {name} model has {rows} embedding rows, fewer than the {size} tokens of its tokenizer.'
            )
    return size
