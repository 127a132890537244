"""The trainer's config schema (`default_config`) and the one function that checks a config before anything runs.

Every recipe in `configs/` starts from `default_config()` and changes fields; nothing else adds fields, so a field
that is not here is a typo. `validate_config` raises a ValueError (FileNotFoundError for a missing path) naming the
bad field and value; it runs before any model is loaded or any program compiled.
"""

import json
import logging
import math

import ml_collections

from tropd_jax import data, losses, paths, schedules
from tropd_jax.models.config import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_POLICIES

TEACHER_PLACEMENTS = ('colocated', 'separate')
TEACHER_QUANTIZATIONS = ('none', 'int8')
TEACHER_TEMPLATES = ('auto', 'student', 'teacher')


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with its default. `-1` / `0` sentinels are explained where they appear."""
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.student_path = ''  # local HF checkpoint directory of the student (trained)
    model.teacher_path = ''  # local HF checkpoint directory of the teacher (frozen)
    model.tokenizer_path = ''  # '' = the student's directory
    model.teacher_tokenizer_path = ''  # '' = the teacher's directory; must match the student's token for token
    model.dtype = 'float32'  # student compute dtype
    model.param_dtype = 'float32'  # student parameter (and optimizer moment) dtype
    model.teacher_dtype = 'float32'  # teacher compute and parameter dtype ('bfloat16' halves its memory)
    model.teacher_quantization = 'none'  # 'int8': teacher weights stored as int8 with a float scale per output
    #   channel (weight-only; computed in teacher_dtype), half of bfloat16's memory
    model.teacher_placement = 'colocated'  # 'colocated': the teacher sharded over the student's mesh;
    #   'separate': the teacher on its own devices (the last model.teacher_devices of them), scoring rollouts moved
    #   to it; only its top-k / chosen-token targets move back
    model.teacher_devices = 0  # devices of a separate teacher; 0 = half of them
    model.attention = 'auto'  # attention kernel: 'auto' (splash on TPU, cuDNN on GPU where it applies, else
    #   blockwise; naive for sequences of one block), 'naive' ([T, T] scores), 'blockwise', 'splash', 'cudnn'
    model.attention_block_size = 512  # query / key block of the blockwise kernel (ours)
    model.remat = 'full'  # student backward: 'full' (keep layer inputs only), 'save_dots', 'offload', 'none' (ours)
    model.scan_layers = False  # the student's scoring and train step as a lax.scan over its layers: compile time flat
    #   in depth, layers run strictly one after another, plus one compute-dtype copy of the layer weights (ours)
    model.mlp_chunk_size = 2048  # calls over more positions run the MLP this many at a time, forward and backward:
    #   its [B, T, intermediate] activations never exist whole; 0 = one piece (ours)

    config.data = d = ml_collections.ConfigDict()
    d.train_path = ''  # a .jsonl / .parquet file, or a directory of them
    d.format = 'auto'  # 'auto' (by extension), 'jsonl' or 'parquet'
    d.prompt_field = 'problem'
    d.answer_field = 'answer'  # kept with the prompt (for evaluation); '' = none
    d.prompt_template = '{prompt}'  # formats a string prompt before the chat template
    d.chat_template = True  # wrap the prompt as a user turn with the tokenizer's chat template
    d.max_prompt_length = 1024  # longer prompts are over-long records
    d.teacher_template = 'auto'  # what the teacher writes its prefixes and scores responses after: 'student' (the
    #   student's rendered prompt), 'teacher' (the prompt rendered with the teacher's chat template and system
    #   prompt, re-tokenised), 'auto' (the student's; warns once, with the teacher's measured log-prob difference,
    #   when the two differ)
    d.teacher_chat_template = ''  # a Jinja chat template replacing the teacher tokenizer's own; '' = its own
    d.teacher_system_prompt = ''  # a system turn that only the teacher's rendering gets
    d.on_bad_record = 'skip'  # 'skip' (count, report) or 'fail' (stop at the first one)
    d.seed = 0  # shuffling seed

    config.rollout = rollout = ml_collections.ConfigDict()
    rollout.num_rollouts = 4  # responses per prompt
    rollout.max_new_tokens = 8096
    rollout.temperature = 1.0
    rollout.top_k = 0  # 0 = no top-k cut
    rollout.top_p = 1.0
    rollout.batch_size = 0  # prompts per generation call; 0 = all prompts of the step at once
    # Continuous batching: rows decoded at once per generation call; a row that stops hands its slot (and KV cache)
    # to the next pending one. 0 = static batches (every row of a call decoded until its longest stops).
    rollout.decode_slots = 0

    config.prefix = prefix = ml_collections.ConfigDict()
    prefix.enabled = ml_collections.config_dict.placeholder(
        bool
    )  # None = the tropd* methods get teacher-prefix guidance, the baselines do not
    prefix.schedule = 'cosine'  # L_max(step): 'cosine' (paper), 'linear' or 'constant'
    prefix.max_length = -1  # L; -1 = rollout.max_new_tokens

    config.loss = loss = ml_collections.ConfigDict()
    loss.method = 'tropd'
    for name, value in losses.DEFAULT_HYPERPARAMETERS.items():
        # A None default (importance_ratio_cap) is a float placeholder, so `--config.loss.NAME=2.0` can set it.
        loss[name] = ml_collections.config_dict.placeholder(float) if value is None else value
    loss.importance_ratio = True  # rho_t against the sampler's log-probs (False: rho_t = 1 in value)
    loss.fused = True  # chunked loss from hidden states + LM heads (never holds [tokens, vocab] logits, exact for every
    #   method); False: the readable reference loss on full logits (same values; for debugging)
    loss.chunk_size = 1024  # tokens per chunk of the fused loss

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 5e-6
    optim.schedule = 'constant'  # 'constant' (paper), 'cosine' or 'linear' decay after warmup
    optim.warmup_steps = 0
    optim.weight_decay = 0.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.clip_norm = 1.0  # global-norm clipping; 0 = none

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = 1
    mesh.fsdp = -1  # -1 = the remaining devices (FSDP by default)
    mesh.tensor = 1

    config.train = train = ml_collections.ConfigDict()
    train.steps = 200
    train.prompts_per_step = 128
    train.micro_batch_size = 8  # sequences (packed: rows) per gradient-accumulation micro-batch
    train.seed = 0  # rollouts, prefix lengths, trust-region draws
    train.packing = False  # pack each step's rollouts, several to a row of P + N columns (segment ids, per-segment
    #   RoPE positions), for the teacher's scoring and the student's train step: the same loss, gradients and
    #   metrics as on one rollout per row, with far less padding computed (not with data.teacher_template='teacher')
    train.packing_buckets = 4  # packed row counts per doubling that get compiled: the rows needed are rounded up
    #   to a multiple of micro_batch_size, then to the next bucket (at most 19% more rows for 4); 0 = every multiple

    config.checkpoint = ckpt = ml_collections.ConfigDict()
    ckpt.every_steps = 50  # 0 = only at the end
    ckpt.keep = 3
    ckpt.async_save = True
    ckpt.export_hf_at_end = True  # write workdir/hf: the student as a HF checkpoint

    config.eval = ev = ml_collections.ConfigDict()
    ev.path = ''  # JSONL of {prompt_field, answer_field}; '' = no evaluation
    ev.every_steps = 0  # 0 = only before and after training
    ev.at_start = True
    ev.at_end = True
    ev.samples = 1  # samples per problem (avg@samples)
    ev.num_problems = 0  # 0 = all
    ev.max_new_tokens = -1  # -1 = rollout.max_new_tokens
    ev.batch_size = 64
    ev.temperature = 1.0
    ev.top_p = 1.0  # nucleus mass of the evaluation's samples (1 = the full distribution)

    config.log = log = ml_collections.ConfigDict()
    log.every_steps = 1
    log.tensorboard = True
    log.wandb = False  # also log to Weights & Biases (pip install -e ".[wandb]"; `wandb login` first)
    log.wandb_project = 'tropd_jax'
    log.wandb_entity = ''  # '' = your default W&B entity
    log.wandb_name = ''  # '' = the workdir's name
    log.progress_bar = True
    return config


def _unknown_fields(config, schema, prefix=''):
    for name in config.keys():
        path = prefix + name
        if name not in schema:
            known = ', '.join(sorted(schema.keys()))
            where = f' of {prefix[:-1]}' if prefix else ''
            raise ValueError(f'unknown config field {path!r}; known fields{where}: {known}')
        if isinstance(schema[name], ml_collections.ConfigDict):
            if not isinstance(config[name], (ml_collections.ConfigDict, dict)):
                raise ValueError(f'config field {path!r} must be a section, got {config[name]!r}')
            _unknown_fields(config[name], schema[name], path + '.')


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _checkpoint_vocab(path: str, field: str) -> int | None:
    """The vocabulary size in a HF checkpoint directory's config.json; a missing directory is an error."""
    if not path:
        raise FileNotFoundError(f'{field} is empty: set it to a local Hugging Face checkpoint directory')
    config_file = paths.join(path, 'config.json')
    if not paths.exists(config_file):
        raise FileNotFoundError(f'{field}={path!r} is not a checkpoint directory (no config.json there)')
    with paths.open_file(config_file) as f:
        hf = json.load(f)
    vocab = hf.get('vocab_size', hf.get('text_config', {}).get('vocab_size'))
    return int(vocab) if vocab is not None else None


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the -1 axis filled; a ValueError when it cannot match `num_devices`."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    text = f'mesh (data, fsdp, tensor)=({", ".join(map(str, sizes))})'
    _require(all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes), f'{text}: sizes must be >= 1 or -1')
    _require(sizes.count(-1) <= 1, f'{text}: at most one size may be -1')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        _require(num_devices % known == 0, f'{text} cannot fill {num_devices} devices ({num_devices} % {known} != 0)')
        sizes[sizes.index(-1)] = num_devices // known
    _require(
        math.prod(sizes) == num_devices, f'{text} needs {math.prod(sizes)} devices but {num_devices} are available'
    )
    return tuple(sizes)


def placement_devices(model_config, num_devices: int) -> tuple[int, int]:
    """(student devices, teacher devices) of `model.teacher_placement`: (num_devices, 0) when colocated; a separate
    teacher takes the last `model.teacher_devices` devices (0 = half), the student the rest."""
    placement = model_config.teacher_placement
    _require(
        placement in TEACHER_PLACEMENTS, f'model.teacher_placement={placement!r} is not one of {TEACHER_PLACEMENTS}'
    )
    if placement == 'colocated':
        return num_devices, 0
    teacher = model_config.teacher_devices or num_devices // 2
    _require(
        isinstance(teacher, int) and 1 <= teacher < num_devices,
        f'model.teacher_devices={model_config.teacher_devices} must leave the separate teacher at least one of '
        f'the {num_devices} devices and the student at least one (0 = half)',
    )
    return num_devices - teacher, teacher


def prefix_enabled(config) -> bool:
    """Whether rollouts get teacher prefixes: the config's choice, else the tropd* methods (as in the paper)."""
    if config.prefix.enabled is None:
        return config.loss.method.startswith('tropd')
    return bool(config.prefix.enabled)


def model_runtime_fields(model_config, *, trained: bool = True) -> dict:
    """The `ModelConfig` fields that say how to run a model (attention kernel, rematerialisation); a model that is
    never trained (the teacher) has nothing to rematerialise, and is not scanned (the stacked copy of its weights
    would cost more than it saves)."""
    return {
        'attention': model_config.attention,
        'attention_block_size': model_config.attention_block_size,
        'remat': model_config.remat if trained else 'none',
        'scan_layers': bool(model_config.get('scan_layers', False)) and trained,
        'mlp_chunk_size': int(model_config.get('mlp_chunk_size', 0)),
    }


def loss_hyperparameters(loss_config) -> dict:
    """The `losses.distillation_loss` keyword arguments of the config's loss section."""
    return {name: loss_config[name] for name in losses.DEFAULT_HYPERPARAMETERS}


def validate_config(config, *, num_devices: int, check_paths: bool = True) -> None:
    """Raises one clear error for the first problem found in `config`; returns None when it can run.

    The one field it changes: a warm-up as long as the run (a recipe shortened with `--config.train.steps=N`
    alone) is clamped to `train.steps - 1`, with a logged warning.

    Checks: unknown fields; the loss method and its hyperparameters; k against the models' vocabularies; batch
    arithmetic (micro-batches divide the batch, the batch divides over the mesh's batch axes); the mesh against
    `num_devices`; value ranges; and (with `check_paths`) that every checkpoint and data path exists.
    """
    _unknown_fields(config, default_config())
    c = config

    # Loss.
    _require(
        c.loss.method in losses.METHODS, f'loss.method={c.loss.method!r} is not one of {", ".join(losses.METHODS)}'
    )
    try:
        losses.resolve_hyperparameters(c.loss.method, loss_hyperparameters(c.loss))
    except ValueError as e:
        raise ValueError(f'loss: {e}') from None
    _require(c.loss.chunk_size >= 1, f'loss.chunk_size={c.loss.chunk_size} must be >= 1')
    _require(
        not (
            c.loss.fused and c.loss.method in losses.FULL_VOCABULARY_METHODS and c.model.teacher_placement == 'separate'
        ),
        f'loss.method={c.loss.method!r} with loss.fused=True recomputes the teacher logits from its hidden states and '
        f"LM head on the student's devices, which model.teacher_placement='separate' keeps apart: use "
        f"'colocated', or loss.fused=False",
    )

    # Batch arithmetic and the mesh.
    t = c.train
    _require(t.steps >= 1, f'train.steps={t.steps} must be >= 1')
    _require(t.prompts_per_step >= 1, f'train.prompts_per_step={t.prompts_per_step} must be >= 1')
    _require(c.rollout.num_rollouts >= 1, f'rollout.num_rollouts={c.rollout.num_rollouts} must be >= 1')
    batch = t.prompts_per_step * c.rollout.num_rollouts
    _require(
        t.micro_batch_size >= 1 and batch % t.micro_batch_size == 0,
        f'train.micro_batch_size={t.micro_batch_size} does not divide the batch of {batch} sequences '
        f'(train.prompts_per_step={t.prompts_per_step} x rollout.num_rollouts={c.rollout.num_rollouts})',
    )
    student_devices, teacher_devices = placement_devices(c.model, num_devices)
    data_axes, fsdp_axes, _ = mesh_shape(c.mesh, student_devices)
    _require(
        t.micro_batch_size % (data_axes * fsdp_axes) == 0,
        f'train.micro_batch_size={t.micro_batch_size} must be a multiple of mesh data x fsdp = '
        f'{data_axes * fsdp_axes} (each device needs whole sequences)',
    )
    _require(
        not teacher_devices or t.micro_batch_size % teacher_devices == 0,
        f'train.micro_batch_size={t.micro_batch_size} must be a multiple of model.teacher_devices='
        f'{teacher_devices} (the separate teacher splits each micro-batch over its devices)',
    )
    _require(isinstance(t.packing, bool), f'train.packing={t.packing!r} must be True or False')
    _require(
        isinstance(t.packing_buckets, int) and t.packing_buckets >= 0,
        f'train.packing_buckets={t.packing_buckets!r} must be an integer >= 0 (0 = every multiple of '
        f'train.micro_batch_size)',
    )
    _require(
        not (t.packing and c.data.teacher_template == 'teacher'),
        f'train.packing=True cannot be combined with data.teacher_template={c.data.teacher_template!r}: the '
        f"teacher's own template rows have other prompt lengths than the student's packed rows; set "
        f"train.packing=False, or data.teacher_template='auto' or 'student'",
    )
    rb = c.rollout.batch_size
    _require(
        rb == 0 or (rb >= 1 and t.prompts_per_step % rb == 0),
        f'rollout.batch_size={rb} must be 0 or divide train.prompts_per_step={t.prompts_per_step}',
    )

    _require(
        c.rollout.decode_slots >= 0, f'rollout.decode_slots={c.rollout.decode_slots} must be >= 0 (0 = static batches)'
    )

    # Rollouts and the prefix schedule.
    r = c.rollout
    _require(r.max_new_tokens >= 1, f'rollout.max_new_tokens={r.max_new_tokens} must be >= 1')
    _require(r.temperature > 0, f'rollout.temperature={r.temperature} must be > 0 for on-policy sampling')
    _require(r.top_k >= 0, f'rollout.top_k={r.top_k} must be >= 0 (0 = no cut)')
    _require(0 < r.top_p <= 1, f'rollout.top_p={r.top_p} must be in (0, 1]')
    _require(
        c.prefix.schedule in schedules.PREFIX_SCHEDULES,
        f'prefix.schedule={c.prefix.schedule!r} is not one of {schedules.PREFIX_SCHEDULES}',
    )
    _require(
        c.prefix.max_length == -1 or 0 <= c.prefix.max_length <= r.max_new_tokens,
        f'prefix.max_length={c.prefix.max_length} must be -1 or in [0, rollout.max_new_tokens={r.max_new_tokens}]',
    )

    # Optimizer.
    o = c.optim
    _require(o.learning_rate > 0, f'optim.learning_rate={o.learning_rate} must be > 0')
    _require(
        o.schedule in schedules.LEARNING_RATE_SCHEDULES,
        f'optim.schedule={o.schedule!r} is not one of {schedules.LEARNING_RATE_SCHEDULES}',
    )
    _require(o.warmup_steps >= 0, f'optim.warmup_steps={o.warmup_steps} must be >= 0')
    if o.warmup_steps >= t.steps:  # a run shortened with only --config.train.steps=N keeps the recipe's warm-up valid
        logging.warning('optim.warmup_steps=%d clamped to %d for train.steps=%d', o.warmup_steps, t.steps - 1, t.steps)
        o.warmup_steps = t.steps - 1
    _require(o.clip_norm >= 0, f'optim.clip_norm={o.clip_norm} must be >= 0 (0 = no clipping)')
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f'optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)')
    _require(o.weight_decay >= 0, f'optim.weight_decay={o.weight_decay} must be >= 0')

    # Models, data, checkpoints, logging.
    for field in ('dtype', 'param_dtype', 'teacher_dtype'):
        _require(c.model[field] in DTYPES, f'model.{field}={c.model[field]!r} is not one of {DTYPES}')
    _require(
        c.model.teacher_quantization in TEACHER_QUANTIZATIONS,
        f'model.teacher_quantization={c.model.teacher_quantization!r} is not one of {TEACHER_QUANTIZATIONS}',
    )
    _require(
        c.model.attention in ATTENTION_IMPLEMENTATIONS,
        f'model.attention={c.model.attention!r} is not one of {", ".join(ATTENTION_IMPLEMENTATIONS)}',
    )
    _require(
        c.model.attention_block_size >= 8, f'model.attention_block_size={c.model.attention_block_size} must be >= 8'
    )
    _require(
        isinstance(c.model.mlp_chunk_size, int) and c.model.mlp_chunk_size >= 0,
        f'model.mlp_chunk_size={c.model.mlp_chunk_size!r} must be a non-negative integer (0 = no chunks)',
    )
    _require(
        c.model.remat in REMAT_POLICIES, f'model.remat={c.model.remat!r} is not one of {", ".join(REMAT_POLICIES)}'
    )
    _require(c.data.format in data.FORMATS, f'data.format={c.data.format!r} is not one of {data.FORMATS}')
    _require(
        c.data.on_bad_record in data.BAD_RECORD_POLICIES,
        f'data.on_bad_record={c.data.on_bad_record!r} is not one of {data.BAD_RECORD_POLICIES}',
    )
    _require(c.data.max_prompt_length >= 1, f'data.max_prompt_length={c.data.max_prompt_length} must be >= 1')
    _require(
        c.data.teacher_template in TEACHER_TEMPLATES,
        f'data.teacher_template={c.data.teacher_template!r} is not one of {TEACHER_TEMPLATES}',
    )
    _require(
        c.data.chat_template or not c.data.teacher_system_prompt,
        'data.teacher_system_prompt needs data.chat_template=True (a system turn is part of a chat)',
    )
    try:
        filled = c.data.prompt_template.format(prompt='\0')
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f'data.prompt_template={c.data.prompt_template!r} is not a format string with only '
            f'{{prompt}} ({type(e).__name__}: {e}); write literal braces as {{{{ }}}}'
        ) from None
    _require(filled.count('\0') == 1, f'data.prompt_template={c.data.prompt_template!r} must contain {{prompt}} once')
    _require(c.checkpoint.every_steps >= 0, f'checkpoint.every_steps={c.checkpoint.every_steps} must be >= 0')
    _require(c.checkpoint.keep >= 1, f'checkpoint.keep={c.checkpoint.keep} must be >= 1')
    _require(c.log.every_steps >= 1, f'log.every_steps={c.log.every_steps} must be >= 1')
    _require(isinstance(c.log.wandb, bool), f'log.wandb={c.log.wandb!r} must be True or False')
    _require(c.eval.every_steps >= 0, f'eval.every_steps={c.eval.every_steps} must be >= 0')
    _require(c.eval.samples >= 1, f'eval.samples={c.eval.samples} must be >= 1')
    _require(c.eval.batch_size >= 1, f'eval.batch_size={c.eval.batch_size} must be >= 1')
    _require(0 < c.eval.top_p <= 1, f'eval.top_p={c.eval.top_p} must be in (0, 1]')

    if not check_paths:
        return
    vocabs = {}
    for field in ('student_path', 'teacher_path'):
        vocabs[field] = _checkpoint_vocab(c.model[field], f'model.{field}')
    for field in ('tokenizer_path', 'teacher_tokenizer_path'):
        if c.model[field] and not paths.isdir(c.model[field]):
            raise FileNotFoundError(f'model.{field}={c.model[field]!r} does not exist')
    known = [v for v in vocabs.values() if v is not None]
    if known:
        vocab = min(known)
        fields = ('k', 'eopd_k') if c.loss.method == 'eopd' else ('k',)
        for field in fields:
            _require(
                c.loss[field] <= vocab, f'loss.{field}={c.loss[field]} is larger than the vocabulary ({vocab} tokens)'
            )
    if not c.data.train_path or not paths.exists(c.data.train_path):
        raise FileNotFoundError(f'data.train_path={c.data.train_path!r} does not exist')
    if c.eval.path and not paths.exists(c.eval.path):
        raise FileNotFoundError(f'eval.path={c.eval.path!r} does not exist')
