"""The long-solution CPU run: TrOPD on the shipped tiny_long pair and repeated doubling (a 7-digit number times 512,
worked as nine doublings of 11 tokens each, then the boxed product: 112 response tokens with EOS).

    python -m tropd_jax.main --config=configs/tiny_long.py --workdir=runs/tiny_long

The teacher here is fallible (held-out avg@8 0.664 at temperature 1, 0.848 greedy) and the student starts far lower
(avg@8 0.245, 0.543 greedy), so the distillation works where the paper's claim lives: long responses in which one
wrong digit spoils the answer, and a teacher that is uncertain on the student's states. The run evaluates the
student before and after 150 TrOPD steps (32 prompts x 1 rollout, the teacher prefix cosine-annealed from 44 tokens,
four of the nine lines, to 0). On 2 busy CPU cores a step takes about 1.1 s (rollouts 0.15 s, scoring and update
0.95 s) after a first step of about 100 s that compiles, and each avg@8 evaluation (2,048 responses of 112 tokens)
about 3 minutes.
Compare a baseline with `--config.loss.method=opd --workdir=runs/tiny_long_opd`.
"""

from tropd_jax import config as config_lib
from tropd_jax.tasks.doubling import tiny_long_assets


def get_config(arg=None):
    if arg:
        raise ValueError(f'configs/tiny_long.py takes no variant, got {arg!r}')
    assets = tiny_long_assets()
    config = config_lib.default_config()

    config.model.student_path = assets.student
    config.model.teacher_path = assets.teacher
    config.model.tokenizer_path = assets.tokenizer
    config.model.remat = 'none'  # a 0.1M-parameter student: recomputing activations only costs time

    config.data.train_path = assets.train_data
    config.data.prompt_field = 'problem'
    config.data.answer_field = 'answer'
    config.data.max_prompt_length = 32  # prompts are 20 tokens

    config.rollout.num_rollouts = 1  # distinct problems lower the gradient noise more than repeats of one
    config.rollout.max_new_tokens = 128  # responses are 112 tokens with EOS; the rest is room for mistakes
    config.rollout.temperature = 1.0

    config.loss.method = 'tropd'
    config.loss.k = 16
    config.loss.beta = 0.001

    config.prefix.max_length = 44  # four of the nine lines of a worked solution

    config.optim.learning_rate = 3e-4
    config.optim.schedule = 'cosine'
    config.optim.warmup_steps = 10
    config.optim.b2 = 0.98
    config.optim.clip_norm = 1.0

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1

    config.train.steps = 150
    config.train.prompts_per_step = 32
    config.train.micro_batch_size = 32
    config.train.packing = False  # responses all have about the same length: packing saves little here

    config.checkpoint.every_steps = 25
    config.checkpoint.keep = 2

    config.eval.path = assets.eval_data
    config.eval.at_start = True
    config.eval.at_end = True
    config.eval.every_steps = 75
    config.eval.samples = 8  # avg@8 over 256 held-out problems, the same draws before and after
    config.eval.num_problems = 256
    config.eval.max_new_tokens = 128
    config.eval.batch_size = 256

    config.log.every_steps = 1
    config.lock()
    return config
