"""Does a config fit? Compile its programs ahead of time for a device topology and print per-chip memory.

    python -m tropd_jax.aot --config=configs/math.py --topology=v5p-8
    python -m tropd_jax.aot --config=configs/multidomain.py --topology=v5p-16 --config.train.micro_batch_size=32
    python -m tropd_jax.aot --config=configs/tiny.py --topology=cpu:8

No weights, no data and no accelerator are needed: the student and the teacher are built shape-only from their
`config.json` (the checkpoint directory's, else the one shipped for that model name under `configs/models/`), and
the programs are compiled for the topology on this machine (TPU topologies need libtpu: `pip install -e ".[tpu]"`;
`cpu:N` compiles for N CPU devices). Programs, each at the config's shapes and mesh:

  rollout_teacher   the teacher writing prefixes: prefill + decode of `rollout.batch_size` prompts x rollouts
                    (through `rollout.decode_slots` slots when set: continuous batching)
  rollout_student   the student's continuation (same shapes)
  teacher_scoring   the teacher's top-k targets for one micro-batch (no gradient); a separate teacher's for the whole
                    batch, on its own devices (`model.teacher_placement=separate`)
  student_grad      the student's forward + backward and loss on one micro-batch (the teacher's targets given)
  train_step        the whole step: every micro-batch's scoring and gradient, clipping, AdamW (with a separate
                    teacher: its targets are an input, its parameters are not)

For each, one table: the per-chip bytes of the student's parameters, optimizer state, teacher parameters, other
inputs, the KV cache (rollouts), the compiler's temporaries and the program's total; then what the trainer holds on
the same chips meanwhile without passing it in ("held meanwhile": during rollouts, the student's optimizer state and
the model that is not generating, when it shares the chips), and the total of both against the chip's HBM, plus the
model FLOPs of the program, and the host memory it uses (`model.remat=offload`), which is not counted against HBM. The
programs are traced for the topology's devices, not this machine's: on a TPU topology `model.attention=auto` is the
splash kernel, as on the TPU itself. The exit status is 1 when any program does not fit (its name is printed), 0
otherwise.
"""

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from tropd_jax import config as config_lib
from tropd_jax import sampling, sharding
from tropd_jax import step as step_lib
from tropd_jax.models import attention as attention_lib
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.decoder import Decoder
from tropd_jax.models.quantize import quantize_int8
from tropd_jax.placement import Placement

GIB = 1024**3
# HBM per chip as libtpu reports it, and how many TensorCores a slice name counts per chip (v4 / v5p names count
# cores, v5e / v6e names count chips).
CHIPS = {'v4': (32.0, 2), 'v5p': (95.74, 2), 'v5e': (15.75, 1), 'v6e': (31.25, 1)}
_CUBE_SHAPES = {
    1: '1x1x1',
    2: '1x2x1',
    4: '2x2x1',
    8: '2x2x2',
    16: '2x2x4',
    32: '2x4x4',
    64: '4x4x4',
    128: '4x4x8',
    256: '4x8x8',
    512: '8x8x8',
}
_PLANE_SHAPES = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
PROGRAMS = ('rollout_teacher', 'rollout_student', 'teacher_scoring', 'student_grad', 'train_step')
RESIDENT = 'held meanwhile: '  # the row label of state the trainer keeps on the chips that a program does not take


@dataclasses.dataclass
class Topology:
    name: str
    devices: list
    hbm_bytes: float | None  # None: no limit to check against (CPU)


def libtpu_topology_name(name: str) -> str:
    """'v5p-8' -> 'v5p:2x2x1' (4 chips); names already in libtpu's form pass through."""
    if ':' in name:
        return name
    match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
    if not match:
        raise ValueError(
            f'--topology={name!r}: expected a slice such as v5p-8, v5e-4, v4-16, v6e-8, a libtpu name '
            f'such as v5p:2x2x1, or cpu:N'
        )
    kind = 'v5e' if match.group(1) == 'v5litepod' else match.group(1)
    cores = int(match.group(2))
    chips = cores // CHIPS[kind][1]
    shapes = _CUBE_SHAPES if kind in ('v4', 'v5p') else _PLANE_SHAPES
    if chips not in shapes or cores % CHIPS[kind][1]:
        raise ValueError(
            f'--topology={name!r}: no {kind} slice of {cores} cores; known sizes: '
            f'{", ".join(f"{kind}-{c * CHIPS[kind][1]}" for c in shapes)}'
        )
    return f'{kind}:{shapes[chips]}'


def get_topology(name: str, hbm_gib: float | None = None) -> Topology:
    """The devices of `name` ('cpu:N' or a TPU slice) to compile for, and their memory per chip."""
    if name.startswith('cpu:'):
        count = int(name.split(':', 1)[1])
        devices = jax.devices('cpu')
        if len(devices) < count:
            raise ValueError(
                f'--topology={name}: this process has {len(devices)} CPU devices; run it as a fresh process '
                f'(the device count is set before JAX starts)'
            )
        return Topology(name, devices[:count], None if hbm_gib is None else hbm_gib * GIB)
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    libtpu_name = libtpu_topology_name(name)
    kind = libtpu_name.split(':')[0]
    # The TPU plugin must load even where JAX_PLATFORMS=cpu was set (this process never runs on the TPU).
    jax.config.update('jax_platforms', None)
    if 'TPU_ACCELERATOR_TYPE' not in os.environ:
        # Not on a TPU VM: tell libtpu so, instead of letting it look for a TPU's host and metadata server (which only
        # prints warnings), and let several compiling processes load it at once.
        os.environ.update(
            TPU_ACCELERATOR_TYPE=name if '-' in name else 'v5p-8',
            TPU_WORKER_HOSTNAMES='localhost',
            TPU_SKIP_MDS_QUERY='1',
            ALLOW_MULTIPLE_LIBTPU_LOAD='1',
        )
    try:
        desc = topologies.get_topology_desc(platform='tpu', topology_name=libtpu_name)
    except Exception as e:  # a missing libtpu, or a name libtpu does not know
        raise RuntimeError(
            f'--topology={name}: cannot describe TPU topology {libtpu_name!r} ({type(e).__name__}: '
            f'{e}); TPU topologies need libtpu: pip install -e ".[tpu]"'
        ) from None
    hbm = hbm_gib if hbm_gib is not None else CHIPS.get(kind, (None,))[0]
    return Topology(
        f'{name} ({libtpu_name}, {len(desc.devices)} chips)', list(desc.devices), None if hbm is None else hbm * GIB
    )


def model_config_path(checkpoint_path: str, config_file: str) -> str:
    """A checkpoint's config.json: its own when the directory exists, else `configs/models/<name>/config.json`
    beside the recipe file."""
    own = os.path.join(checkpoint_path, 'config.json')
    if os.path.isfile(own):
        return own
    shipped = os.path.join(
        os.path.dirname(os.path.abspath(config_file)),
        'models',
        os.path.basename(os.path.normpath(checkpoint_path)),
        'config.json',
    )
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f'no config.json for {checkpoint_path!r}: neither {own} nor {shipped} exists')


def model_config(path: str, *, dtype: str, param_dtype: str, runtime: dict) -> ModelConfig:
    with open(path) as f:
        hf = json.load(f)
    return ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype).replace(**runtime)


def abstract_model(model_config: ModelConfig, mesh, quantization: str = 'none'):
    """(graphdef, state of ShapeDtypeStructs placed by the logical rules) of a `Decoder` (int8 weights with
    `quantization='int8'`); nothing is allocated."""
    model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
    if quantization == 'int8':
        model = quantize_int8(model)
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh)
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def bytes_per_chip(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        total += math.prod(shape) * itemsize
    return total


def _abstract(shape, dtype, mesh, spec=None):
    spec = PartitionSpec() if spec is None else spec
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _param_count(c: ModelConfig) -> int:
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    layer = attention + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)


def forward_flops(c: ModelConfig, rows: int, context: int, new: int) -> float:
    """Forward FLOPs of `new` tokens per row after `context` earlier ones: 2 per weight per token, plus causal
    attention (q k and p v, 2 x 2 x N x D per attended key)."""
    tokens = rows * new
    attended = rows * (new * context + new * (new + 1) / 2)
    return 2.0 * _param_count(c) * tokens + 4.0 * c.num_layers * c.num_heads * c.head_dim * attended


@dataclasses.dataclass
class Result:
    program: str
    fits: bool
    rows: dict  # label -> bytes per chip
    total: float | None
    flops: float
    error: str = ''
    where: str = ''  # the devices it runs on, when not all of them (a separate teacher)
    resident: float = 0.0  # bytes per chip the trainer holds while the program runs that are not its inputs
    host: float = 0.0  # bytes per chip of host memory the program uses (`model.remat=offload`), not in the total


@dataclasses.dataclass
class Program:
    """One of the trainer's programs, as `compile_and_measure` takes it."""

    lower: Callable[[], jax.stages.Lowered]  # lowers it for the topology (inputs abstract)
    inputs: dict  # label -> pytree of its abstract inputs, counted per chip
    flops: float  # model FLOPs
    extra_rows: dict = dataclasses.field(default_factory=dict)  # label -> bytes per chip beside the inputs (KV cache)
    where: str = ''  # the chips it runs on, when not all of them (a separate teacher)
    resident: dict = dataclasses.field(default_factory=dict)  # label -> pytree the trainer holds there meanwhile


def compile_and_measure(name: str, program: Program, hbm: float | None) -> Result:
    """Lowers and compiles one program; its `inputs` name the per-chip bytes of its inputs, and its `resident` what
    else the trainer keeps on the same chips while it runs: the program fits when its own total plus that does."""
    rows = {label: float(bytes_per_chip(tree)) for label, tree in program.inputs.items()}
    rows.update(program.extra_rows)
    held_rows = {f'{RESIDENT}{label}': float(bytes_per_chip(tree)) for label, tree in program.resident.items()}
    rows.update(held_rows)
    held = sum(held_rows.values())
    flops, where = program.flops, program.where
    try:
        compiled = program.lower().compile()
    except Exception as e:  # pylint: disable=broad-except
        text = str(e)
        if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
            raise
        needed = re.search(r'required for HLO temporaries \(([\d.]+)([KMGT])\)', text)
        if needed:
            rows['temporaries'] = float(needed.group(1)) * 1024 ** ' KMGT'.index(needed.group(2))
        first = text.strip().splitlines()[0]
        return Result(name, False, rows, None, flops, error=first[:400], where=where, resident=held)
    memory = compiled.memory_analysis()
    rows['outputs (not donated)'] = float(max(memory.output_size_in_bytes - memory.alias_size_in_bytes, 0))
    rows['temporaries'] = float(memory.temp_size_in_bytes)
    rows['program'] = float(memory.generated_code_size_in_bytes)
    total = float(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    fits = hbm is None or total + held <= hbm
    host = float(getattr(memory, 'host_temp_size_in_bytes', 0) or 0)
    error = '' if fits else 'total exceeds HBM'
    return Result(name, fits, rows, total, flops, error=error, where=where, resident=held, host=host)


@dataclasses.dataclass
class Trainer:
    """The trainer of a config, shape-only on a topology: the models, the step and the batch shapes every program
    builder reads (`trainer`)."""

    config: object
    placement: Placement
    student_config: ModelConfig
    teacher_config: ModelConfig
    vocab_size: int
    student_graphdef: object
    params: object  # the student's parameters (abstract, placed)
    teacher_graphdef: object
    teacher_state: object
    settings: step_lib.StepSettings
    opt_state: object
    train_step: Callable  # `step.jit_train_step`'s
    batch_shardings: dict
    prompt_length: int  # P
    length: int  # P + N

    @property
    def batch(self) -> int:
        return self.config.train.prompts_per_step * self.config.rollout.num_rollouts

    @property
    def micro(self) -> int:
        return self.config.train.micro_batch_size

    def key(self, mesh):
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        return jax.ShapeDtypeStruct((), key_dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    def where(self, model: str) -> str:
        """'' colocated; else which of the topology's chips `model` ('student' or 'teacher') runs on."""
        if not self.placement.separate:
            return ''
        mesh = self.placement.teacher_mesh if model == 'teacher' else self.placement.student_mesh
        total = self.placement.student_mesh.size + self.placement.teacher_mesh.size
        return f"the {model}'s {mesh.size} of {total} chips"

    def batch_of(self, rows: int) -> dict:
        """The train step's batch of `rows` rows (abstract, placed as the step takes it)."""
        mesh = self.placement.student_mesh
        return {
            k: _abstract(
                (rows,) if k == 'finish_reason' else (rows, self.length),
                jnp.float32 if k == 'logprobs' else jnp.int32,
                mesh,
                self.batch_shardings[k].spec,
            )
            for k in step_lib.batch_keys(self.settings)
        }

    def micro_batch(self) -> dict:
        """One micro-batch as the step's scan hands it to the teacher and the student (`rollout_ids` added)."""
        micro_batch = self.batch_of(self.micro)
        micro_batch.pop('finish_reason')
        micro_batch.setdefault('rollout_ids', micro_batch['tokens'])  # [m, S] int32; the step adds it to plain rows
        return micro_batch

    def teacher_outputs(self, teacher_state, micro):
        return step_lib.teacher_outputs(
            teacher_state, micro, teacher_graphdef=self.teacher_graphdef, settings=self.settings
        )

    def teacher_targets(self, leading=()) -> object:
        """The teacher's targets for one micro-batch (abstract, split along its rows on the student's mesh), with
        `leading` axes (`(n,)`: a whole batch's, micro-batch by micro-batch)."""
        rows = PartitionSpec(*(None,) * len(leading), ('data', 'fsdp'))
        return jax.tree.map(
            lambda x: _abstract((*leading, *x.shape), x.dtype, self.placement.student_mesh, rows),
            jax.eval_shape(self.teacher_outputs, self.teacher_state, self.micro_batch()),
        )


def abstract_trainer(config, topology: Topology, config_file: str) -> Trainer:
    """The trainer of `config` on `topology`, built from the models' `config.json` alone (nothing allocated)."""
    config_lib.validate_config(config, num_devices=len(topology.devices), check_paths=False)
    placement = Placement.from_config(config, topology.devices)
    mesh = placement.student_mesh
    m = config.model
    student_config = model_config(
        model_config_path(m.student_path, config_file),
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        runtime=config_lib.model_runtime_fields(m),
    )
    teacher_config = model_config(
        model_config_path(m.teacher_path, config_file),
        dtype=m.teacher_dtype,
        param_dtype=m.teacher_dtype,
        runtime=config_lib.model_runtime_fields(m, trained=False),
    )
    vocab_size = min(student_config.vocab_size, teacher_config.vocab_size)
    student_graphdef, params = abstract_model(student_config, mesh)
    teacher_graphdef, teacher_state = abstract_model(teacher_config, placement.teacher_mesh, m.teacher_quantization)
    prompt_length = sampling.bucket_length(config.data.max_prompt_length)
    settings = step_lib.step_settings(config, vocab_size)
    # Packed rows: the largest packed batch (one rollout per row), scored with a prompt length of 1.
    settings = dataclasses.replace(settings, prompt_length=1 if settings.packed else prompt_length)
    optimizer = step_lib.make_optimizer(settings.optimizer)
    train_step, batch_shardings, _, opt_shardings = step_lib.jit_train_step(
        mesh,
        params,
        jax.eval_shape(optimizer.init, params),
        teacher_state,
        step_lib.batch_keys(settings),
        settings,
        student_graphdef,
        teacher_graphdef,
    )
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(optimizer.init, params),
        opt_shardings,
    )
    return Trainer(
        config,
        placement,
        student_config,
        teacher_config,
        vocab_size,
        student_graphdef,
        params,
        teacher_graphdef,
        teacher_state,
        settings,
        opt_state,
        train_step,
        batch_shardings,
        prompt_length,
        prompt_length + config.rollout.max_new_tokens,
    )


def rollout_program(trainer: Trainer, model: str) -> Program:
    """`model` ('teacher' or 'student') generating for `make_rollouts`: `rollout.batch_size` prompts (x rollouts)
    per call. Between train steps the student's parameters and optimizer state and the teacher's parameters stay
    where they are; a rollout program shares its chips with those it does not take."""
    t, r = trainer, trainer.config.rollout
    teacher = model == 'teacher'
    graphdef, state = (t.teacher_graphdef, t.teacher_state) if teacher else (t.student_graphdef, t.params)
    model_config = t.teacher_config if teacher else t.student_config
    mesh = t.placement.teacher_mesh if teacher else t.placement.student_mesh
    rows = (r.batch_size or t.config.train.prompts_per_step) * r.num_rollouts
    shapes = dict(rows=rows, prompt_length=t.prompt_length, max_new_tokens=r.max_new_tokens)
    cache = sampling.decode_cache_bytes(model_config, mesh, decode_slots=r.decode_slots, **shapes)
    lower = lambda: sampling.lower_generate(
        graphdef,
        state,
        mesh,
        top_k=r.top_k,
        top_p=r.top_p,
        vocab_size=t.vocab_size,
        decode_slots=r.decode_slots,
        **shapes,
    )
    # The inputs besides the weights: prompt tokens and mask, key, forced tokens, forced and max lengths,
    # temperature, EOS ids.
    others = (
        _abstract((rows, t.prompt_length), jnp.int32, mesh),
        _abstract((rows, t.prompt_length), jnp.int32, mesh),
        t.key(mesh),
        _abstract((rows, r.max_new_tokens), jnp.int32, mesh),
        _abstract((rows,), jnp.int32, mesh),
        _abstract((rows,), jnp.int32, mesh),
        _abstract((), jnp.float32, mesh),
        _abstract((1,), jnp.int32, mesh),
    )
    if teacher:
        resident = {} if t.placement.separate else {'student parameters': t.params, 'optimizer state': t.opt_state}
    else:
        resident = {'optimizer state': t.opt_state}
        if not t.placement.separate:
            resident['teacher parameters'] = t.teacher_state
    return Program(
        lower,
        {f'{model} parameters': state, 'other inputs': others},
        forward_flops(model_config, rows, t.prompt_length, r.max_new_tokens),
        {'KV cache (estimate)': float(cache)},
        t.where(model),
        resident,
    )


def teacher_scoring_program(trainer: Trainer) -> Program:
    """The teacher's targets for one micro-batch; a separate teacher's for the whole batch (micro-batch by
    micro-batch), on its own devices."""
    t = trainer
    flops = forward_flops(t.teacher_config, t.micro, 0, t.length - 1)
    if t.placement.separate:
        score = t.placement.jit_teacher_scores(
            step_lib.teacher_scores, step_lib.teacher_input_keys, t.teacher_state, t.teacher_graphdef
        )
        full_batch = t.batch_of(t.batch)
        teacher_batch = {
            k: _abstract(
                full_batch[k].shape, full_batch[k].dtype, t.placement.teacher_mesh, PartitionSpec(('data', 'fsdp'))
            )
            for k in step_lib.teacher_input_keys(t.settings)
        }
        return Program(
            lambda: score.lower(t.teacher_state, teacher_batch, t.settings),
            {'teacher parameters': t.teacher_state, 'other inputs': teacher_batch},
            (t.batch // t.micro) * flops,
            where=t.where('teacher'),
        )
    micro_batch = t.micro_batch()

    def lower():
        with jax.set_mesh(t.placement.student_mesh):
            return jax.jit(t.teacher_outputs).lower(t.teacher_state, micro_batch)

    return Program(lower, {'teacher parameters': t.teacher_state, 'other inputs': micro_batch}, flops)


def student_grad_program(trainer: Trainer) -> Program:
    """The student's forward, backward and loss on one micro-batch, the teacher's targets given."""
    t = trainer
    micro_batch, teacher_out = t.micro_batch(), t.teacher_targets()
    param_shardings = jax.tree.map(lambda x: x.sharding, t.params)

    def student_grad(params, micro, teacher_out, key):
        grads, stats = step_lib.student_grads(
            params, micro, teacher_out, key, student_graphdef=t.student_graphdef, settings=t.settings
        )
        # Gradients are placed as the parameters are (the train step accumulates them so), not left to XLA's choice.
        return jax.lax.with_sharding_constraint(grads, param_shardings), stats

    def lower():
        with jax.set_mesh(t.placement.student_mesh):
            return jax.jit(student_grad).lower(t.params, micro_batch, teacher_out, t.key(t.placement.student_mesh))

    return Program(
        lower,
        {'student parameters': t.params, 'other inputs': (micro_batch, teacher_out)},
        3 * forward_flops(t.student_config, t.micro, 0, t.length - 1),
        where=t.where('student'),
    )


def train_step_program(trainer: Trainer) -> Program:
    """The whole step: every micro-batch's scoring and gradient, clipping, AdamW; with a separate teacher its
    targets for the batch (`[n, m, ...]`, split along m) are an input and its parameters are not."""
    t = trainer
    student_flops = 3 * forward_flops(t.student_config, t.micro, 0, t.length - 1)
    teacher_flops = forward_flops(t.teacher_config, t.micro, 0, t.length - 1)
    if t.placement.separate:
        teacher_in = t.teacher_targets(leading=(t.batch // t.micro,))
        teacher_group, flops = {'teacher targets': teacher_in}, (t.batch // t.micro) * student_flops
    else:
        teacher_in = t.teacher_state
        teacher_group = {'teacher parameters': teacher_in}
        flops = (t.batch // t.micro) * (student_flops + teacher_flops)
    full_batch = t.batch_of(t.batch)
    mesh = t.placement.student_mesh

    def lower():
        with jax.set_mesh(mesh):
            return t.train_step.lower(t.params, t.opt_state, teacher_in, full_batch, t.key(mesh), t.settings)

    inputs = {
        'student parameters': t.params,
        'optimizer state': t.opt_state,
        **teacher_group,
        'other inputs': full_batch,
    }
    return Program(lower, inputs, flops, where=t.where('student'))


BUILDERS = {
    'rollout_teacher': lambda trainer: rollout_program(trainer, 'teacher'),
    'rollout_student': lambda trainer: rollout_program(trainer, 'student'),
    'teacher_scoring': teacher_scoring_program,
    'student_grad': student_grad_program,
    'train_step': train_step_program,
}


def build_programs(config, topology: Topology, config_file: str, programs=PROGRAMS) -> dict[str, Program]:
    """Name -> `Program` for each of `programs` of `config` on `topology`. With `model.teacher_placement=separate`
    the teacher's programs (its rollouts, its scoring of the whole batch) run on the teacher's devices, the
    student's on the others, and the train step takes the teacher's targets."""
    trainer = abstract_trainer(config, topology, config_file)
    return {name: BUILDERS[name](trainer) for name in programs}


def _gib(x):
    return '-' if x is None else f'{x / GIB:,.2f}'


def format_result(r: Result, hbm: float | None) -> str:
    """One program's table; in MiB when everything is under 1 GiB (tiny models), else GiB."""
    unit, scale = ('GiB', GIB) if max([*r.rows.values(), r.total or 0, hbm or 0]) >= GIB else ('MiB', 1024**2)
    show = lambda x: f'{x / scale:,.2f}' if x is not None else '> HBM'
    own = {k: v for k, v in r.rows.items() if not k.startswith(RESIDENT)}
    held = {k: v for k, v in r.rows.items() if k.startswith(RESIDENT)}
    width = max(24, *(len(k) + 2 for k in r.rows))
    row = lambda label, text: f'  {label:<{width}}{text:>10}'
    lines = [f'{r.program}:' + ('' if r.fits else '  DOES NOT FIT'), row('per chip', unit)]
    lines += [row(label, show(value)) for label, value in own.items()]
    if held:
        lines.append(row('program total', show(r.total)))
        lines += [row(label, show(value)) for label, value in held.items()]
    whole = None if r.total is None else r.total + r.resident
    lines.append(
        row('total', show(whole))
        + ('' if hbm is None or whole is None else f'   ({100 * whole / hbm:.0f}% of {_gib(hbm)} GiB HBM)')
    )
    if r.host:
        lines.append(row('host memory (offloaded)', show(r.host)))
    lines.append(row('model FLOPs', f'{r.flops:.3g}'))
    if r.where:
        lines.append(f'  runs on {r.where}')
    if r.error:
        lines.append(f'  {r.error}')
    return '\n'.join(lines)


def run(config, topology: Topology, config_file: str, programs=PROGRAMS) -> list[Result]:
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f'unknown programs {unknown}; known: {", ".join(PROGRAMS)}')
    built = build_programs(config, topology, config_file, programs)
    results = []
    for name, program in built.items():
        # Traced for the topology's devices, not this host's: `attention='auto'` picks the TPU's splash kernel.
        with attention_lib.target_backend(topology.devices[0].platform):
            result = compile_and_measure(name, program, topology.hbm_bytes)
        print(format_result(result, topology.hbm_bytes), flush=True)
        results.append(result)
    return results


def define_flags():
    """The command line's flags (defined only when run as a program, so importing this module defines none)."""
    global _CONFIG, _TOPOLOGY, _PROGRAMS, _HBM_GIB, _JSON
    _CONFIG = config_flags.DEFINE_config_file(
        'config', None, 'Training config file (configs/NAME.py[:ARG]).', lock_config=True
    )
    _TOPOLOGY = flags.DEFINE_string(
        'topology',
        None,
        'A TPU slice (v5p-8, v5e-4, v4-16, v6e-8, or libtpu names such as v5p:2x2x1) or cpu:N for N CPU devices.',
    )
    _PROGRAMS = flags.DEFINE_list('programs', list(PROGRAMS), 'Which programs to compile.')
    _HBM_GIB = flags.DEFINE_float('hbm_gib', None, "Memory per chip in GiB (default: the chip's HBM; none for cpu:N).")
    _JSON = flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
    flags.mark_flags_as_required(['config', 'topology'])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _TOPOLOGY.value.startswith('cpu:'):
        jax.config.update('jax_num_cpu_devices', int(_TOPOLOGY.value.split(':', 1)[1]))
    topology = get_topology(_TOPOLOGY.value, _HBM_GIB.value)
    config_file = flags.FLAGS['config'].config_filename.split(':')[0]
    print(
        f'{config_file} on {topology.name}'
        + ('' if topology.hbm_bytes is None else f', {_gib(topology.hbm_bytes)} GiB per chip'),
        flush=True,
    )
    results = run(_CONFIG.value, topology, config_file, tuple(_PROGRAMS.value))
    if _JSON.value:
        with open(_JSON.value, 'w') as f:
            json.dump(
                {
                    'config': config_file,
                    'topology': topology.name,
                    'hbm_bytes': topology.hbm_bytes,
                    'programs': [dataclasses.asdict(r) for r in results],
                },
                f,
                indent=1,
            )
    failed = [r.program for r in results if not r.fits]
    if failed:
        print(f'does not fit on {topology.name}: {", ".join(failed)}', file=sys.stderr)
        return 1
    print(f'every program fits on {topology.name}')
    return 0


if __name__ == '__main__':
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
