"""The paper's math recipe: DeepSeek-R1-Distill-Qwen-1.5B distilled from Skywork-OR1-Math-7B with TrOPD.

    python -m tropd_jax.main --config=configs/math.py --workdir=runs/math \
        --config.model.student_path=/models/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.model.teacher_path=/models/Skywork-OR1-Math-7B \
        --config.data.train_path=/data/openthoughts3_math.jsonl --config.eval.path=/data/aime24.jsonl

Recommended hardware: a TPU v5p-8 (4 chips) or larger, or 4+ 80 GB GPUs. Check that it fits before renting one:

    pip install -e ".[tpu]" && python -m tropd_jax.aot --config=configs/math.py --topology=v5p-8

Paper values: 200 steps, constant learning rate 5e-6, k = 64, beta = 0.001, 128 prompts x 4 rollouts per step,
8096 new tokens, temperature 1. Every method of the paper is one field away: `--config.loss.method=opd`.
Fields marked (ours) are choices the paper does not state.

`configs/math.py:tiny` keeps the recipe but swaps in the shipped tiny teacher / student / arithmetic data and
shrinks every size, so the same code path runs on a laptop CPU in a few minutes.
"""

from tropd_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.default_config()

    # Local Hugging Face checkpoint directories (download them first; nothing is fetched at run time).
    config.model.student_path = 'models/DeepSeek-R1-Distill-Qwen-1.5B'
    config.model.teacher_path = 'models/Skywork-OR1-Math-7B'
    config.model.dtype = 'bfloat16'  # student activations (ours)
    config.model.param_dtype = 'float32'  # master weights and AdamW moments (ours)
    # The student's layers as one lax.scan (ours): its fwd + bwd memory stays linear in length and depth however XLA
    # schedules them (on 8 v5p chips 6.1 GiB per chip scanned; unrolled, 36.0 GiB of temporaries; docs/benchmarks.md).
    config.model.scan_layers = True
    config.model.teacher_dtype = 'bfloat16'  # the frozen teacher only runs inference (ours)

    # Math prompts of OpenThoughts3 as JSONL {"problem", "answer"}.
    config.data.train_path = 'data/openthoughts3_math.jsonl'
    config.data.prompt_field = 'problem'
    config.data.answer_field = 'answer'
    config.data.prompt_template = "{prompt}\nLet's think step by step and output the final answer within \\boxed{{}}."
    config.data.chat_template = True
    config.data.max_prompt_length = 1024  # (ours)

    config.rollout.num_rollouts = 4
    config.rollout.max_new_tokens = 8096
    config.rollout.temperature = 1.0
    # All 512 rollouts of a step in one generation call through 128 decode slots (continuous batching): the KV
    #   caches of 512 rows of 9,120 tokens do not fit a v5p-8 at once, those of 128 do (ours)
    config.rollout.batch_size = 0
    config.rollout.decode_slots = 128

    # config.prefix.enabled stays None (default): tropd* methods get teacher prefixes, cosine-annealed 8096 -> 0
    config.prefix.schedule = 'cosine'

    config.loss.method = 'tropd'
    config.loss.k = 64
    config.loss.beta = 0.001
    config.loss.fused = True  # 151k-token vocabulary: never materialise [tokens, vocab] logits
    config.loss.chunk_size = 2048  # (ours)

    config.optim.learning_rate = 5e-6
    config.optim.schedule = 'constant'
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.0  # (ours)
    config.optim.clip_norm = 1.0  # (ours)

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # FSDP over every device

    config.train.steps = 200
    config.train.prompts_per_step = 128
    config.train.micro_batch_size = 16  # sequences per gradient-accumulation micro-batch (ours)
    config.train.seed = 0
    # Pack each step's rollouts, several to a row of P + N columns, for scoring and the train step: the same training,
    # about 9% padding computed instead of 77% at these lengths (docs/benchmarks.md); micro-batches are packed rows.
    config.train.packing = True

    config.checkpoint.every_steps = 20
    config.checkpoint.keep = 3

    config.eval.path = ''  # e.g. AIME 24 as JSONL {"problem", "answer"}; '' = no periodic evaluation
    config.eval.every_steps = 50
    config.eval.samples = 4  # the paper reports avg@32; run `python -m tropd_jax.evaluate` on the export for that
    config.eval.max_new_tokens = 8096
    config.eval.batch_size = 128

    if arg == 'tiny':
        _shrink_to_tiny(config)
    elif arg:
        raise ValueError(f'unknown configs/math.py variant {arg!r}; expected nothing or "tiny"')
    config.lock()
    return config


def _shrink_to_tiny(config):
    """The shipped tiny pair and arithmetic data; every size cut to CPU scale."""
    from tropd_jax.tasks.arithmetic import tiny_assets

    assets = tiny_assets()
    config.model.student_path, config.model.teacher_path = assets.student, assets.teacher
    config.model.tokenizer_path = assets.tokenizer
    config.model.dtype = config.model.param_dtype = config.model.teacher_dtype = 'float32'
    config.data.train_path = assets.train_data
    config.data.prompt_template = '{prompt}'
    config.data.max_prompt_length = 64
    config.rollout.max_new_tokens = 64
    config.rollout.batch_size = 0
    config.loss.k = 16
    config.optim.learning_rate = 1e-3
    config.train.steps = 20
    config.train.prompts_per_step = 8
    config.train.micro_batch_size = 16
    config.checkpoint.every_steps = 10
    config.eval.path = assets.eval_data
    config.eval.every_steps = 0
    config.eval.samples = 1
    config.eval.num_problems = 32
    config.eval.max_new_tokens = 64
    config.eval.batch_size = 32
