"""The CPU demo: TrOPD on the shipped tiny teacher / student pair and the synthetic arithmetic task.

    python -m tropd_jax.main --config=configs/tiny.py --workdir=runs/tiny

About four minutes on two CPU cores: evaluation of the student before training, 150 TrOPD steps (64 prompts x 1
rollout, the teacher prefix cosine-annealed from 24 tokens, about one worked solution, to 0), evaluation after, and
the trained student exported to runs/tiny/hf as a Hugging Face checkpoint. Progress, checkpoints and metrics go to
runs/tiny; running the command again resumes. The learning rate (3e-4, cosine) is the highest at which the
student's entropy stays flat here; at 1e-3 it climbs and accuracy falls (docs/benchmarks.md).
Plot the curves with `python -m tropd_jax.plotting --metrics=runs/tiny/metrics.jsonl --out=runs/tiny/plots`.
Compare a baseline with `--config.loss.method=opd --workdir=runs/tiny_opd`.
"""

from tropd_jax import config as config_lib
from tropd_jax.tasks.arithmetic import tiny_assets


def get_config(arg=None):
    if arg:
        raise ValueError(f'configs/tiny.py takes no variant, got {arg!r}')
    assets = tiny_assets()
    config = config_lib.default_config()

    config.model.student_path = assets.student
    config.model.teacher_path = assets.teacher
    config.model.tokenizer_path = assets.tokenizer
    config.model.remat = 'none'  # activations of a 0.3M-parameter student are small: recomputing them only costs time

    config.data.train_path = assets.train_data
    config.data.prompt_field = 'problem'
    config.data.answer_field = 'answer'
    config.data.max_prompt_length = 64

    config.rollout.num_rollouts = 1  # distinct problems lower the gradient noise more than repeats of one
    config.rollout.max_new_tokens = 64
    config.rollout.temperature = 1.0

    config.loss.method = 'tropd'
    config.loss.k = 16
    config.loss.beta = 0.001

    config.prefix.max_length = 24  # worked solutions are ~20 tokens; the default (max_new_tokens) is mostly teacher

    config.optim.learning_rate = 3e-4
    config.optim.schedule = 'cosine'
    config.optim.warmup_steps = 10
    config.optim.b2 = 0.98
    config.optim.clip_norm = 1.0

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1

    config.train.steps = 150
    config.train.prompts_per_step = 64
    config.train.micro_batch_size = 32  # packed rows: the 64 rollouts fit in about 30 rows of P + N columns
    config.train.packing = True  # 1.6x faster steps than 64 unpacked rows, the same training (docs/benchmarks.md)

    config.checkpoint.every_steps = 25
    config.checkpoint.keep = 2

    config.eval.path = assets.eval_data
    config.eval.at_start = True
    config.eval.at_end = True
    config.eval.every_steps = 50
    config.eval.samples = 8  # avg@8 over 256 held-out problems, the same draws before and after
    config.eval.num_problems = 256
    config.eval.max_new_tokens = 64  # worked solutions are at most ~45 tokens
    config.eval.batch_size = 128

    config.log.every_steps = 1
    config.lock()
    return config
