"""The paper's multi-domain recipe (math + code + science prompts): Qwen3-SFT-1.7B distilled from Qwen3-Nemotron-4B.

    python -m tropd_jax.main --config=configs/multidomain.py --workdir=runs/multidomain \
        --config.model.student_path=/models/Qwen3-SFT-1.7B --config.model.teacher_path=/models/Qwen3-Nemotron-4B \
        --config.data.train_path=/data/multidomain.jsonl

`configs/multidomain.py:deepseek` is the other multi-domain pair of the paper: DeepSeek-R1-Distill-Qwen-1.5B from
Skywork-OR1-7B. Recommended hardware: a TPU v5p-8 (4 chips) or larger; check it fits first:
`python -m tropd_jax.aot --config=configs/multidomain.py --topology=v5p-8`. Everything else is the math recipe
(`configs/math.py`): 200 steps, lr 5e-6 constant, k = 64,
beta = 0.001, 128 prompts x 4 rollouts, 8096 new tokens, temperature 1.
"""

from tropd_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.default_config()

    config.model.student_path = 'models/Qwen3-SFT-1.7B'
    config.model.teacher_path = 'models/Qwen3-Nemotron-4B'
    config.model.dtype = 'bfloat16'  # (ours)
    config.model.param_dtype = 'float32'  # (ours)
    config.model.teacher_dtype = 'bfloat16'  # (ours)

    # Mixed math / code / science prompts as JSONL; the prompt already says how to answer.
    config.data.train_path = 'data/multidomain.jsonl'
    config.data.prompt_field = 'prompt'
    config.data.answer_field = ''  # code and science prompts have no single gradable answer
    config.data.prompt_template = '{prompt}'
    config.data.chat_template = True
    config.data.max_prompt_length = 2048  # code prompts are longer (ours)

    config.rollout.num_rollouts = 4
    config.rollout.max_new_tokens = 8096
    config.rollout.temperature = 1.0
    config.rollout.batch_size = 0  # all prompts in one generation call ...
    # ... through 96 decode slots (continuous batching): at 2,048 + 8,096 tokens the teacher's rollouts through 128
    # take 92% of a v5p chip's HBM, through 96 72% (`tropd_jax.aot`, v5p-8) (ours)
    config.rollout.decode_slots = 96

    config.loss.method = 'tropd'
    config.loss.k = 64
    config.loss.beta = 0.001
    config.loss.fused = True
    config.loss.chunk_size = 2048  # (ours)

    config.optim.learning_rate = 5e-6
    config.optim.schedule = 'constant'
    config.optim.clip_norm = 1.0  # (ours)

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1

    config.train.steps = 200
    config.train.prompts_per_step = 128
    config.train.micro_batch_size = 16  # (ours)
    # Pack each step's rollouts, several to a row of P + N columns, for scoring and the train step: the same training,
    # about 9% padding computed instead of 77% at these lengths (docs/benchmarks.md); micro-batches are packed rows.
    config.train.packing = True

    config.checkpoint.every_steps = 20
    config.checkpoint.keep = 3
    config.eval.path = ''  # benchmarks (GPQA, MMLU-Redux, IFBench, LiveCodeBench) are run on the export

    if arg == 'deepseek':
        config.model.student_path = 'models/DeepSeek-R1-Distill-Qwen-1.5B'
        config.model.teacher_path = 'models/Skywork-OR1-7B'
    elif arg:
        raise ValueError(f'unknown configs/multidomain.py variant {arg!r}; expected nothing or "deepseek"')
    config.lock()
    return config
