"""The trainer's two models from its config: the tokenizer, the student and the (possibly int8) teacher on their
meshes, run the way the config says (attention kernel, rematerialisation), and the vocabulary they share.

It reads the trainer's config (`tropd_jax.config`) and the losses' needs (`tropd_jax.losses`), so it sits above
`tropd_jax.models`, which imports only its own modules, `sharding` and `paths`.
"""

from tropd_jax import config as config_lib
from tropd_jax import losses
from tropd_jax.models.hf import from_pretrained
from tropd_jax.models.quantize import quantize_int8
from tropd_jax.models.tokenizer import check_tokenizers_compatible, load_tokenizer
from tropd_jax.models.vocabulary import check_vocabularies


def load_models(config, mesh, teacher_mesh=None):
    """Tokenizer, student on `mesh` and teacher on `teacher_mesh` (default: `mesh`; int8 when
    `model.teacher_quantization` says so), after checking that the two models share the tokenizer.

    Returns `(tokenizer, student, student_config, teacher, vocab_size)`; `vocab_size` is the shared real vocabulary
    every loss and every sample is restricted to.
    """
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer_path or m.student_path)
    teacher_tokenizer = load_tokenizer(m.teacher_tokenizer_path or m.teacher_path)
    student, student_config = from_pretrained(m.student_path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh)
    teacher_mesh = mesh if teacher_mesh is None else teacher_mesh
    teacher, teacher_config = from_pretrained(
        m.teacher_path, dtype=m.teacher_dtype, param_dtype=m.teacher_dtype, mesh=teacher_mesh
    )
    if m.teacher_quantization == 'int8':
        teacher = quantize_int8(teacher, teacher_mesh)
    # How to run them (attention kernel, rematerialisation) comes from the run's config, not the checkpoints'.
    student.config = student_config = student_config.replace(**config_lib.model_runtime_fields(m))
    teacher.config = teacher_config = teacher_config.replace(**config_lib.model_runtime_fields(m, trained=False))
    # The losses compare the two distributions id by id, over the ids the tokenizer can produce.
    vocab_size = check_tokenizers_compatible(
        teacher_tokenizer,
        tokenizer,
        teacher_vocab_size=teacher_config.vocab_size,
        student_vocab_size=student_config.vocab_size,
    )
    check_vocabularies(len(teacher_tokenizer), len(tokenizer), teacher_config.vocab_size, student_config.vocab_size)
    needed = losses.topk_size(config.loss.method, config_lib.loss_hyperparameters(config.loss))
    if needed > vocab_size:
        raise ValueError(f'loss.k={needed} is larger than the shared vocabulary ({vocab_size} tokens)')
    return tokenizer, student, student_config, teacher, vocab_size
