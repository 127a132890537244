"""The teacher's and the student's vocabularies: the same real tokens, embedding tables that may differ by padding.

Checkpoints pad their embedding tables past the tokenizer (Qwen2.5: 151,936 rows for the 1.5B model, 152,064 for
the 7B, 151,665 real tokens); the losses compare the two distributions over the real tokens only. A difference in the
real tokens themselves (another tokenizer, added tokens) makes the comparison meaningless and is an error.
"""

import logging


def check_vocabularies(teacher_tokens: int, student_tokens: int, teacher_rows: int, student_rows: int) -> int:
    """Checks that the two models differ at most by embedding padding; returns the shared real vocabulary size.

    Args:
      teacher_tokens, student_tokens: the real vocabulary of each model's tokenizer (`len(tokenizer)`).
      teacher_rows, student_rows: each model's embedding / LM-head rows (`ModelConfig.vocab_size`).

    Raises:
      ValueError when the real vocabularies differ (different tokenizers) or a model has fewer rows than real tokens.
    Logs (INFO) the padding when the rows differ, e.g. 152,064 vs 151,936 rows around 151,665 real tokens.
    """
    if teacher_tokens != student_tokens:
        raise ValueError(
            f"The teacher's and the student's vocabularies differ beyond padding: their tokenizers have "
            f'{teacher_tokens:,} and {student_tokens:,} real tokens. Distillation needs one shared tokenizer.'
        )
    for name, rows in (('teacher', teacher_rows), ('student', student_rows)):
        if rows < teacher_tokens:
            raise ValueError(
                f'The {name} model has {rows:,} embedding rows, fewer than the {teacher_tokens:,} real tokens of the '
                f'shared tokenizer: its vocabulary differs beyond padding (another tokenizer or vocabulary size).'
            )
    if teacher_rows != student_rows:
        logging.info(
            'teacher and student embedding rows differ only by padding: %s vs %s rows around the %s real tokens of '
            'the shared tokenizer; the losses and the sampler use those %s',
            f'{teacher_rows:,}',
            f'{student_rows:,}',
            f'{teacher_tokens:,}',
            f'{teacher_tokens:,}',
        )
    return teacher_tokens
