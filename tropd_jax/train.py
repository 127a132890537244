"""The trainer: rollouts, teacher and student scoring, the distillation loss, AdamW, checkpoints, metrics.

One training step (SPEC.md):
  1. take `prompts_per_step` prompts from the data iterator;
  2. draw each rollout's prefix length l ~ Uniform{0..L_max(step)} (cosine-annealed; 0 for methods without guidance);
  3. sample `num_rollouts` responses per prompt: the teacher writes l tokens, the student continues (`sampling`);
  4. `train_step`: over micro-batches of the rollouts (a `lax.scan`, so only one micro-batch of logits exists at a
     time), score with the teacher (no gradient) and the student, take the loss and its gradient, accumulate;
     then clip, apply AdamW, or skip the update when the loss or gradient is not finite.

Micro-batches are weighted (`tropd_jax.grad_accum`) so that the accumulated gradient is exactly the gradient of the
loss aggregated over the whole batch (token-mean: each micro-batch's loss times its share of the batch's response
tokens; seq-mean: its share of the batch's sequences), and the loss metrics are `(sum, count)` pairs that add up
over micro-batches. The one batch-level choice made per micro-batch instead is the top-q student-entropy
selection of `entropy_opd` / `reopold`. Trust-region draws are keyed by the step's key, the token's rollout index and
its position in the rollout, so they do not depend on where the token sits (which micro-batch, packed or not).

Packing (`train.packing`): the step's rollouts are packed host-side (`tropd_jax.packing`) into rows of the same
`P + N` columns, several rollouts per row with segment ids and per-segment RoPE positions, and the teacher's scoring
and the student's forward, backward and loss run on those rows: the same loss, gradients and metrics as on the
`[R, P + N]` rollout rows (up to float rounding), with far less padding computed. The packed row count is rounded
up to a multiple of the micro-batch size and then to one of a few buckets (`packing.bucket_rows`,
`train.packing_buckets` per doubling, at most R), which bounds the number of compiled shapes; each step logs its
`padding_fraction`. With `entropy_opd` / `reopold` the per-micro-batch top-q selection sees other micro-batches when
packed (the same training only when one micro-batch holds the whole batch).

Randomness: step s uses `fold_in(key(train.seed), s)` for its prefix lengths, samples and trust-region draws, and the
data iterator state is checkpointed, so a run resumed from any checkpoint repeats the uninterrupted run exactly.

The train step is one `jax.jit` with explicit input and output shardings on the ('data', 'fsdp', 'tensor') mesh:
student parameters and AdamW moments follow the logical rules of `tropd_jax.sharding` (FSDP by default), the teacher
likewise, and rollouts are split along the batch over data x fsdp.
"""

import contextlib
import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import (
    checkpoint,
    data,
    evaluate,
    fused_loss,
    grad_accum,
    losses,
    metrics,
    packing,
    paths,
    preemption,
    sampling,
    schedules,
    scoring,
    sharding,
)
from tropd_jax import config as config_lib
from tropd_jax.hooks import Hooks
from tropd_jax.models import load_tokenizer
from tropd_jax.models.hf import save_pretrained_state
from tropd_jax.models.loading import load_models


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float
    schedule: str
    warmup_steps: int
    total_steps: int
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float

    @classmethod
    def from_config(cls, config) -> 'OptimizerSettings':
        o = config.optim
        return cls(
            o.learning_rate,
            o.schedule,
            o.warmup_steps,
            config.train.steps,
            o.weight_decay,
            o.b1,
            o.b2,
            o.eps,
            o.clip_norm,
        )


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the learning-rate schedule (exposed in the state for logging)."""
    schedule = schedules.learning_rate_schedule(
        s.learning_rate, s.total_steps, schedule=s.schedule, warmup_steps=s.warmup_steps
    )
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(s.clip_norm) if s.clip_norm > 0 else optax.identity(), adamw)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static about the train step (hashable, so the compiled step is reused across runs)."""

    method: str
    hyperparameters: tuple  # sorted (name, value) pairs of `losses.DEFAULT_HYPERPARAMETERS`
    vocab_size: int  # the shared real vocabulary
    prompt_length: int
    micro_batch_size: int
    importance_ratio: bool
    fused: bool
    chunk_size: int
    optimizer: OptimizerSettings
    separate_teacher: bool = False  # the teacher's targets come scored (`teacher_scores`), not its parameters
    teacher_prompt_length: int = 0  # P_T of the batch's `teacher_tokens` (the teacher's own template); 0 = none
    reopold_refining: bool = False  # REOPOLD's phase; the loop sets it from step / total steps (one recompile)
    packed: bool = False  # the batch is packed rows (`PACKED_KEYS` too); prompt_length is then 1


def step_settings(config, vocab_size: int, prompt_length: int = 0) -> StepSettings:
    """The train step's static settings from a config (`prompt_length` is set per batch)."""
    return StepSettings(
        method=config.loss.method,
        hyperparameters=tuple(sorted(config_lib.loss_hyperparameters(config.loss).items())),
        vocab_size=vocab_size,
        prompt_length=prompt_length,
        micro_batch_size=config.train.micro_batch_size,
        importance_ratio=config.loss.importance_ratio,
        fused=config.loss.fused,
        chunk_size=config.loss.chunk_size,
        optimizer=OptimizerSettings.from_config(config),
        separate_teacher=config.model.teacher_placement == 'separate',
        packed=config.train.packing,
    )


def _packed_inputs(micro, s: StepSettings) -> tuple:
    """The `scoring` arguments of packed rows (positions, segment ids), or none."""
    return (micro['positions'], micro['segment_ids']) if s.packed else ()


def teacher_outputs(teacher_state, micro, *, teacher_graphdef, s: StepSettings):
    """The teacher's targets for one micro-batch (`[m, S]` arrays): top-k statistics for the fused loss, else its
    full response logits; no gradient."""
    if s.teacher_prompt_length:  # the same responses after the prompts as the teacher renders them
        tokens, input_mask, p = micro['teacher_tokens'], micro['teacher_input_mask'], s.teacher_prompt_length
    else:
        tokens, input_mask, p = micro['tokens'], micro['input_mask'], s.prompt_length
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    if s.fused:
        return scoring.teacher_targets(
            teacher,
            tokens,
            input_mask,
            p,
            k=losses.topk_size(s.method, dict(s.hyperparameters)),
            vocab_size=s.vocab_size,
            chunk_size=s.chunk_size,
            full_vocabulary=s.method in losses.FULL_VOCABULARY_METHODS,
            **dict(zip(('packed_positions', 'segment_ids'), _packed_inputs(micro, s))),
        )
    return jax.lax.stop_gradient(scoring.response_logits(teacher, tokens, input_mask, p, *_packed_inputs(micro, s)))


def student_grads(params, micro, teacher_out, key, *, student_graphdef, s: StepSettings):
    """The gradient of the loss of one micro-batch (`[m, S]` arrays, with `rollout_ids`) given the teacher's targets,
    and the loss metrics' `(sum, count)` pairs."""
    hp = dict(s.hyperparameters)
    p = s.prompt_length
    tokens, input_mask = micro['tokens'], micro['input_mask']
    t = scoring.targets(tokens, input_mask, micro['response_mask'], micro['prefix_mask'], micro['logprobs'], p)
    positions = micro['positions'] if s.packed else scoring.positions(input_mask)
    # The sampler's log-probs always reach the loss (its mismatch metrics); rho_t uses them only if importance_ratio.
    # M_t is keyed by the token's rollout and its position in it, which packing does not change.
    extra = dict(
        rollout_logprobs=t.rollout_logprobs,
        use_importance_ratio=s.importance_ratio,
        progress=1.0 if s.reopold_refining else 0.0,
        draw_ids=(micro['rollout_ids'][:, p:], positions[:, p:]),
        segment_ids=micro['segment_ids'][:, p:] if s.packed else None,
    )

    def loss_fn(params):
        student = nnx.merge(student_graphdef, params)
        if s.fused:
            hidden = scoring.response_hidden(student, tokens, input_mask, p, *_packed_inputs(micro, s))
            loss, stats = fused_loss.fused_distillation_loss(
                s.method,
                hidden,
                student.lm_head_weight(),
                teacher_out,
                t.tokens,
                t.response_mask,
                t.prefix_mask,
                key,
                vocab_size=s.vocab_size,
                chunk_size=s.chunk_size,
                **extra,
                **hp,
            )
        else:
            logits = scoring.response_logits(student, tokens, input_mask, p, *_packed_inputs(micro, s))
            loss, stats = losses.distillation_loss(
                s.method,
                logits,
                teacher_out,
                t.tokens,
                t.response_mask,
                t.prefix_mask,
                key,
                vocab_size=s.vocab_size,
                **extra,
                **hp,
            )
        return loss, stats

    return jax.grad(loss_fn, has_aux=True)(params)


def teacher_scores(teacher_state, batch, teacher_graphdef, s: StepSettings):
    """A separate teacher's targets for a whole batch (`[B, P + N]` `tokens` and `input_mask`, or `teacher_tokens` and
    `teacher_input_mask`; packed rows add `positions` and `segment_ids`), one micro-batch at a time as the train step
    takes them: every leaf of `teacher_outputs` with a leading `[n]` micro-batch axis."""
    micro = grad_accum.micro_batches(dict(batch), s.micro_batch_size)

    def score(mb):
        mb = {k: sharding.constrain(v, ('batch',) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
        return teacher_outputs(teacher_state, mb, teacher_graphdef=teacher_graphdef, s=s)

    return jax.lax.map(score, micro)


def _micro_batch_grads(params, teacher, micro, key, *, student_graphdef, teacher_graphdef, s: StepSettings):
    """`student_grads` after the teacher's pass over the same micro-batch (`teacher` is its state), or with the
    targets a separate teacher scored (`teacher` is this micro-batch's slice of `teacher_scores`)."""
    if s.separate_teacher:
        teacher_out = teacher
    else:
        teacher_out = teacher_outputs(teacher, micro, teacher_graphdef=teacher_graphdef, s=s)
    return student_grads(params, micro, teacher_out, key, student_graphdef=student_graphdef, s=s)


def accumulate_gradients(params, teacher_state, batch, key, *, student_graphdef, teacher_graphdef, s: StepSettings):
    """The gradient of the batch loss and the loss metrics, one micro-batch at a time (`grad_accum.accumulate`).

    Arguments as `train_step`. Returns `(grads, metrics)`: float32 gradients like `params`, and the float32 scalar
    metrics of `losses.distillation_loss` over the whole batch (`losses.metric_values` of the summed pairs).
    """
    batch = {k: v for k, v in batch.items() if k != 'finish_reason'}
    batch_size, columns = batch['tokens'].shape
    if not s.packed:  # every row is one rollout; its index keys the trust-region draws as a packed segment's does
        rows = jnp.arange(batch_size, dtype=jnp.int32)[:, None]
        batch['rollout_ids'] = jnp.broadcast_to(rows, (batch_size, columns))
    weights = grad_accum.micro_batch_weights(
        batch['response_mask'][:, s.prompt_length :], s.micro_batch_size, dict(s.hyperparameters)['aggregation']
    )
    constrain = lambda v: sharding.constrain(v, ('batch',) + (None,) * (v.ndim - 1))

    def grad_fn(params, xs):
        micro, scored = xs
        teacher = teacher_state if scored is None else jax.tree.map(constrain, scored)
        return _micro_batch_grads(
            params,
            teacher,
            jax.tree.map(constrain, micro),
            key,
            student_graphdef=student_graphdef,
            teacher_graphdef=teacher_graphdef,
            s=s,
        )

    scored = teacher_state if s.separate_teacher else None  # [n, m, ...] targets, scanned along with the micro-batches
    grads, pairs = grad_accum.accumulate(
        grad_fn, params, weights, (grad_accum.micro_batches(batch, s.micro_batch_size), scored)
    )
    return grads, losses.metric_values(pairs)


def train_step(
    params, opt_state, teacher_state, batch, key, student_graphdef, teacher_graphdef, settings: StepSettings
):
    """One optimizer step on a batch of rollouts.

    Args:
      params: the student's `nnx.State`; opt_state: its optimizer state; teacher_state: the teacher's, or with
        `settings.separate_teacher` its targets for this batch (`teacher_scores`, moved to the student's devices).
      batch: dict of `[B, P + N]` arrays `tokens`, `input_mask`, `response_mask`, `prefix_mask`, `logprobs` and the
        `[B]` int `finish_reason` (see `sampling.Rollout`). With `settings.packed`: the same arrays packed into
        `[K, P + N]` rows (`pack_rollouts`), plus `positions`, `segment_ids` and `rollout_ids` (`PACKED_KEYS`);
        `finish_reason` stays `[B]`, one per rollout.
      key: PRNG key of the trust-region draws.
    Returns:
      (params, opt_state, metrics): float32 scalar metrics; when the loss or gradient is not finite the returned
      params and opt_state are the inputs (`skipped` = 1).
    """
    s = settings
    if s.packed and s.teacher_prompt_length:
        raise ValueError("packed rows cannot carry the teacher's own template rows (data.teacher_template=teacher)")
    grads, out = accumulate_gradients(
        params, teacher_state, batch, key, student_graphdef=student_graphdef, teacher_graphdef=teacher_graphdef, s=s
    )

    optimizer = make_optimizer(s.optimizer)
    grad_norm = optax.tree.norm(grads)  # before clipping
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    update_norm = optax.tree.norm(updates)  # the step's size after clipping and AdamW (grad_norm is before)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(out['loss']) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)

    num_rollouts = batch['finish_reason'].shape[0]  # rows may hold several rollouts (packed) or none (padding rows)
    response = batch['response_mask'][:, s.prompt_length :].astype(jnp.float32)
    prefix = batch['prefix_mask'][:, s.prompt_length :].astype(jnp.float32) * response
    out.update(
        grad_norm=grad_norm,
        update_norm=update_norm,
        skipped=1.0 - finite.astype(jnp.float32),
        learning_rate=learning_rate(new_opt_state),
        response_length=response.sum() / num_rollouts,
        prefix_length=prefix.sum() / num_rollouts,
        truncated_fraction=(batch['finish_reason'] == sampling.FINISH_LENGTH).astype(jnp.float32).mean(),
        response_tokens=response.sum(),
        padding_fraction=1.0 - batch['input_mask'].astype(jnp.float32).mean(),  # of the tokens computed
    )
    return params, opt_state, {k: v.astype(jnp.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Host side: setup, rollouts, the loop.


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the update that produced `opt_state`, looked up by name (`optax.inject_hyperparams`
    keeps it in `hyperparams`, wherever `make_optimizer` puts AdamW in its chain; the schedule's own state, which
    has the same name, is not an array)."""
    return optax.tree_utils.tree_get(
        opt_state, 'learning_rate', filtering=lambda _, value: isinstance(value, jax.Array)
    )


def _global_array(x: np.ndarray, mesh, spec: PartitionSpec) -> jax.Array:
    """A global array from a host array every process holds in full (each process places its own shards, if any)."""
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index], dtype=x.dtype)


def _global_key(key, mesh) -> jax.Array:
    """A PRNG key every process computed alike, replicated on `mesh` (whose devices may all be other processes')."""
    data = _global_array(np.asarray(jax.random.key_data(key)), mesh, PartitionSpec())
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def separate_rollout(
    teacher,
    student,
    prompt_tokens,
    prompt_mask,
    prefix_lengths,
    key,
    *,
    mesh,
    teacher_mesh,
    num_rollouts,
    teacher_prompt_tokens=None,
    teacher_prompt_mask=None,
    **settings,
):
    """`sampling.rollout` (same arguments, as host arrays, and the same samples) with the teacher on its own mesh:
    the teacher writes the prefixes on its devices, only the prefix tokens and lengths move to the student's."""
    put = lambda x, on: _global_array(np.asarray(x), on, PartitionSpec())
    tokens = np.repeat(prompt_tokens, num_rollouts, axis=0)
    mask = np.repeat(prompt_mask, num_rollouts, axis=0)
    if teacher_prompt_tokens is None:
        teacher_tokens, teacher_mask = tokens, mask
    else:  # the teacher writes its prefixes after its own rendering of the prompts
        teacher_tokens = np.repeat(teacher_prompt_tokens, num_rollouts, axis=0)
        teacher_mask = np.repeat(teacher_prompt_mask, num_rollouts, axis=0)
    with jax.set_mesh(sharding.every_device_mesh()):  # as `make_rollouts` drew `key`: every process reads it
        teacher_key, student_key = jax.random.split(key)
    student_key = _global_key(student_key, mesh)
    if int(np.max(prefix_lengths)) <= 0:
        return sampling.generate(student, put(tokens, mesh), put(mask, mesh), student_key, **settings)
    with jax.set_mesh(teacher_mesh):
        prefix = sampling.generate(
            teacher,
            put(teacher_tokens, teacher_mesh),
            put(teacher_mask, teacher_mesh),
            _global_key(teacher_key, teacher_mesh),
            max_lengths=put(prefix_lengths, teacher_mesh),
            **settings,
        )
        written = prefix.responses
    # The teacher's devices may be other processes' (its own hosts): `sharding.transfer`, not `jax.device_put`.
    forced_tokens, forced_lengths = sharding.transfer((written, prefix.lengths), NamedSharding(mesh, PartitionSpec()))
    return sampling.generate(
        student,
        put(tokens, mesh),
        put(mask, mesh),
        student_key,
        forced_tokens=forced_tokens,
        forced_lengths=forced_lengths,
        **settings,
    )


def make_rollouts(
    teacher, student, prompt_batch, key, step, config, mesh, *, pad_id, eos, vocab_size, teacher_mesh=None
):
    """Pads the step's prompts, draws prefix lengths from the schedule, and samples the rollouts.

    Returns `(rollout, max_prefix_length)`; prompts are generated `rollout.batch_size` at a time (0 = all at once).
    A `teacher_mesh` other than `mesh` (a separate teacher) writes the teacher's prefixes on its own devices. With
    `data.teacher_template=teacher` the teacher writes them after its own rendering of the prompts
    (`teacher_prompt_tokens`), the student continues after its own.
    """
    r = config.rollout
    tokens, mask = sampling.pad_prompts([p['prompt_tokens'] for p in prompt_batch], pad_id=pad_id)
    teacher_tokens = teacher_mask = None
    if config.data.teacher_template == 'teacher':
        teacher_tokens, teacher_mask = sampling.pad_prompts(
            [p['teacher_prompt_tokens'] for p in prompt_batch], pad_id=pad_id
        )
    total = config.train.steps
    length = config.prefix.max_length if config.prefix.max_length >= 0 else r.max_new_tokens
    l_max = (
        schedules.max_prefix_length(step, total, length, config.prefix.schedule)
        if config_lib.prefix_enabled(config)
        else 0
    )
    num_prompts = len(prompt_batch)
    chunk = r.batch_size or num_prompts
    separate = teacher_mesh is not None and teacher_mesh is not mesh
    # A separate teacher's processes may hold none of the student's devices: their draws go on every device.
    with jax.set_mesh(sharding.every_device_mesh()) if separate else contextlib.nullcontext():
        if separate:  # `key` may be on the student's mesh (or on none)
            key = _global_key(key, sharding.every_device_mesh())
        prefix_key, sample_key = jax.random.split(key)
        prefix_lengths = np.asarray(schedules.sample_prefix_lengths(prefix_key, l_max, num_prompts * r.num_rollouts))
        chunk_keys = [jax.random.fold_in(sample_key, i) for i in range(len(range(0, num_prompts, chunk)))]
    replicated = PartitionSpec()
    parts = []
    settings = dict(
        max_new_tokens=r.max_new_tokens,
        num_rollouts=r.num_rollouts,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        eos_ids=eos,
        pad_id=pad_id,
        vocab_size=vocab_size,
        decode_slots=r.decode_slots,
    )
    for i, start in enumerate(range(0, num_prompts, chunk)):
        rows = slice(start * r.num_rollouts, (start + chunk) * r.num_rollouts)
        prompts = slice(start, start + chunk)
        teacher_prompts = (
            {}
            if teacher_tokens is None
            else dict(teacher_prompt_tokens=teacher_tokens[prompts], teacher_prompt_mask=teacher_mask[prompts])
        )
        if separate:
            parts.append(
                separate_rollout(
                    teacher,
                    student,
                    tokens[prompts],
                    mask[prompts],
                    prefix_lengths[rows],
                    chunk_keys[i],
                    mesh=mesh,
                    teacher_mesh=teacher_mesh,
                    **teacher_prompts,
                    **settings,
                )
            )
            continue
        parts.append(
            sampling.rollout(
                teacher,
                student,
                _global_array(tokens[prompts], mesh, replicated),
                _global_array(mask[prompts], mesh, replicated),
                _global_array(prefix_lengths[rows], mesh, replicated),
                chunk_keys[i],
                **{k: _global_array(v, mesh, replicated) for k, v in teacher_prompts.items()},
                **settings,
            )
        )
    if len(parts) == 1:
        return parts[0], l_max
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), l_max


def jit_train_step(mesh, params, opt_state, teacher_state, batch_keys, settings, student_graphdef, teacher_graphdef):
    """`train_step` under `jax.jit` with explicit shardings for this mesh.

    Returns `(step, batch_shardings, param_shardings, opt_shardings)`; `step(params, opt_state, teacher_state, batch,
    key, settings)` runs it and `step.lower(...)` (same arguments, abstract ones allowed) lowers it ahead of time.
    The inputs only lend their shapes and dtypes: they may be abstract (`jax.ShapeDtypeStruct`).
    """
    param_shardings = sharding.state_shardings(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # AdamW moments mirror the parameters; counts and hyperparameters are replicated scalars.
    opt_shardings = optax.tree_utils.tree_map_params(
        make_optimizer(settings.optimizer),
        lambda _, s: s,
        opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    if settings.separate_teacher:  # the scored targets [n, m, ...], split along m as the micro-batches are
        teacher_shardings = NamedSharding(mesh, PartitionSpec(None, ('data', 'fsdp')))
    else:
        teacher_shardings = sharding.state_shardings(teacher_state, mesh)
    # Rollouts split along the batch over data x fsdp (validation made the batch divisible by it).
    batch_shardings = {k: NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))) for k in batch_keys}
    # `train_step` itself (not a closure) is jitted, with the static settings as arguments, so that a second run in
    # the same process with the same shapes reuses the compiled program.
    jitted = jax.jit(
        train_step,
        static_argnums=(5, 6, 7),  # the graphdefs and settings
        in_shardings=(param_shardings, opt_shardings, teacher_shardings, batch_shardings, replicated),
        out_shardings=(param_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )

    # Processes that hold none of the student's devices (a separate teacher's own hosts) read the metrics too.
    everywhere = {d.process_index for d in mesh.devices.flat} == set(range(jax.process_count()))

    def step(params, opt_state, teacher_state, batch, key, settings):
        params, opt_state, metrics = jitted(
            params, opt_state, teacher_state, batch, key, student_graphdef, teacher_graphdef, settings
        )
        if not everywhere:
            metrics = sharding.transfer(metrics, NamedSharding(sharding.every_device_mesh(), PartitionSpec()))
        return params, opt_state, metrics

    step.lower = lambda params, opt_state, teacher_state, batch, key, settings: jitted.lower(
        params, opt_state, teacher_state, batch, key, student_graphdef, teacher_graphdef, settings
    )
    return step, batch_shardings, param_shardings, opt_shardings


BATCH_KEYS = ('tokens', 'input_mask', 'response_mask', 'prefix_mask', 'logprobs', 'finish_reason')
TEACHER_INPUT_KEYS = ('tokens', 'input_mask')  # what a separate teacher needs of a rollout to score it
TEACHER_TEMPLATE_KEYS = ('teacher_tokens', 'teacher_input_mask')  # the same, after the teacher's own template
PACKED_KEYS = ('positions', 'segment_ids', 'rollout_ids')  # what packed rows add (`pack_rollouts`)


def batch_keys(settings: StepSettings) -> tuple[str, ...]:
    """The arrays of the train step's batch (without the teacher's template rows)."""
    return BATCH_KEYS + (PACKED_KEYS if settings.packed else ())


def teacher_input_keys(settings: StepSettings) -> tuple[str, ...]:
    if settings.teacher_prompt_length:
        return TEACHER_TEMPLATE_KEYS
    return TEACHER_INPUT_KEYS + (('positions', 'segment_ids') if settings.packed else ())


def _host_array(x) -> np.ndarray:
    """A (possibly multi-process, replicated or sharded) array's full value on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def pack_rollouts(rollout, micro_batch_size: int, buckets_per_doubling: int) -> dict:
    """The step's rollouts packed (`packing.plan`, first-fit decreasing; `packing.pack`) into rows of the rollouts'
    own `P + N` columns, host-side: `[K, P + N]` `BATCH_KEYS` arrays plus `PACKED_KEYS` (`rollout_ids`: each token's
    rollout index, which keys its trust-region draws), and the `[R]` `finish_reason` as it is.

    K, the rows computed, is the rows needed rounded up to a multiple of `micro_batch_size` and then to a bucket
    (`packing.bucket_rows`, `buckets_per_doubling`), at most R: the number of compiled shapes stays small.
    """
    arrays = {k: _host_array(getattr(rollout, k)) for k in BATCH_KEYS}
    finish_reason = arrays.pop('finish_reason')
    rows, columns = arrays['tokens'].shape
    arrays['rollout_ids'] = np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None], (rows, columns))
    plan = packing.plan(arrays['input_mask'], row_length=columns, multiple_of=micro_batch_size)
    plan = plan._replace(num_rows=packing.bucket_rows(plan.num_rows, micro_batch_size, buckets_per_doubling, rows))
    packed = packing.pack(arrays, plan)
    packed['finish_reason'] = finish_reason
    return packed


def make_meshes(config, devices=None):
    """(student mesh, teacher mesh) for `model.teacher_placement`: the same mesh twice when colocated; when
    separate, the student's mesh (`config.mesh`) over the first devices and an FSDP mesh over the teacher's last
    `model.teacher_devices` (in process order, so a teacher of whole hosts gets its own hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    n_student, n_teacher = config_lib.placement_devices(config.model, len(devices))
    student_mesh = sharding.make_mesh(*config_lib.mesh_shape(config.mesh, n_student), devices=devices[:n_student])
    if not n_teacher:
        return student_mesh, student_mesh
    processes = lambda ds: sorted({d.process_index for d in ds})
    logging.info(
        'separate teacher on %d devices of processes %s, student on %d devices of processes %s',
        n_teacher,
        processes(devices[n_student:]),
        n_student,
        processes(devices[:n_student]),
    )
    return student_mesh, sharding.make_mesh(1, n_teacher, 1, devices=devices[n_student:])


def jit_teacher_scores(teacher_mesh, student_mesh, teacher_state, teacher_graphdef):
    """`teacher_scores` on a separate teacher's mesh: `score(teacher_state, batch, settings)` moves the batch's
    `tokens` and `input_mask` to the teacher's devices, scores them there, and moves only the targets (top-k ids and
    log-probs, chosen-token log-probs, entropy: O(k) per token with the fused loss) back to the student's devices,
    split along the micro-batch rows as `jit_train_step` takes them. `score.lower(teacher_state, batch, settings)`
    lowers the teacher's program (abstract inputs allowed)."""
    rows = lambda mesh: NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
    jitted = jax.jit(
        teacher_scores,
        static_argnums=(2, 3),
        in_shardings=(sharding.state_shardings(teacher_state, teacher_mesh), rows(teacher_mesh)),
        out_shardings=NamedSharding(teacher_mesh, PartitionSpec(None, ('data', 'fsdp'))),
    )
    back = NamedSharding(student_mesh, PartitionSpec(None, ('data', 'fsdp')))

    def score(teacher_state, batch, settings):
        inputs = sharding.transfer({k: batch[k] for k in teacher_input_keys(settings)}, rows(teacher_mesh))
        with jax.set_mesh(teacher_mesh):
            out = jitted(teacher_state, inputs, teacher_graphdef, settings)
        return sharding.transfer(out, back)

    def lower(teacher_state, batch, settings):
        with jax.set_mesh(teacher_mesh):
            return jitted.lower(
                teacher_state, {k: batch[k] for k in teacher_input_keys(settings)}, teacher_graphdef, settings
            )

    score.lower = lower
    return score


def with_teacher_rows(batch, rollout, prompt_batch, settings, batch_shardings, num_rollouts, pad_id):
    """`batch` plus `teacher_tokens` / `teacher_input_mask`: its responses after the prompts as the teacher renders
    them (`scoring.teacher_rows`), and the settings with their prompt length."""
    tokens, input_mask = scoring.teacher_rows(
        rollout.tokens,
        rollout.input_mask,
        rollout.prompt_length,
        [p['teacher_prompt_tokens'] for p in prompt_batch],
        num_rollouts,
        pad_id,
    )
    batch = {
        **batch,
        'teacher_tokens': jax.device_put(tokens, batch_shardings['teacher_tokens']),
        'teacher_input_mask': jax.device_put(input_mask, batch_shardings['teacher_input_mask']),
    }
    response_columns = rollout.tokens.shape[1] - rollout.prompt_length
    return batch, dataclasses.replace(settings, teacher_prompt_length=tokens.shape[1] - response_columns)


def warn_on_template_mismatch(
    prompts, teacher, student, mesh, teacher_mesh, *, pad_id, eos, vocab_size, key, count=4, max_new_tokens=32
):
    """`data.teacher_template=auto`: when the teacher's rendering of some prompts differs from the student's, one
    warning saying how many, and how far the teacher's log-probs move between the two renderings on the student's
    greedy responses (`max_new_tokens`) to `count` of them. Returns that measurement (None when all agree)."""
    differ = [p for p in prompts if not np.array_equal(p['prompt_tokens'], p['teacher_prompt_tokens'])]
    if not differ:
        return None
    message = (
        f"data.teacher_template='auto': the teacher's chat template renders {len(differ)} of {len(prompts)} "
        f"prompts differently from the student's"
    )
    measured = None
    if jax.process_count() == 1:  # the measurement reads the samples back to the host
        sample = differ[:count]
        tokens, mask = sampling.pad_prompts([p['prompt_tokens'] for p in sample], pad_id=pad_id)
        with jax.set_mesh(mesh):
            rollout = jax.device_get(
                sampling.generate(
                    student,
                    tokens,
                    mask,
                    key,
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    eos_ids=eos,
                    pad_id=pad_id,
                    vocab_size=vocab_size,
                )
            )
        with jax.set_mesh(teacher_mesh):
            measured = scoring.template_logprob_difference(
                teacher, rollout, [p['teacher_prompt_tokens'] for p in sample], vocab_size, pad_id
            )
        message += (
            f"; on the student's {measured['tokens']} greedy response tokens to {measured['prompts']} of them, "
            f"the teacher's log-probs after its own rendering differ from those after the student's by "
            f'{measured["mean"]:+.3f} nats/token on average ({measured["mean_abs"]:.3f} in absolute value)'
        )
    logging.warning(
        message + ". The teacher writes its prefixes and scores after the student's rendering: set "
        "data.teacher_template='teacher' for its own, or 'student' to keep the student's and silence this "
        'warning.'
    )
    return measured


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a checkpoint holds, as it holds it: the student's parameters and optimizer state, the steps done and the
    steps skipped (int32 scalars) and the key data of the run's key (`train.seed`), from which step s draws its
    numbers (`fold_in(key, s)`), so a resumed run draws the same ones."""

    params: nnx.State
    opt_state: optax.OptState
    step: np.ndarray
    skipped_steps: np.ndarray
    rng: np.ndarray

    @classmethod
    def create(cls, params, opt_state, step: int, skipped_steps: int, key: jax.Array) -> 'TrainState':
        return cls(
            params,
            opt_state,
            np.asarray(step, np.int32),
            np.asarray(skipped_steps, np.int32),
            np.asarray(jax.random.key_data(key)),
        )

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(np.asarray(self.rng))

    def as_dict(self) -> dict:
        """The checkpoint's tree: `{'params', 'opt_state', 'step', 'skipped_steps', 'rng'}`."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def restore_or_init(ckpt: checkpoint.Checkpointer, state: TrainState, param_shardings, opt_shardings):
    """`(state, data_state)` of the latest readable checkpoint (read onto the given shardings; the scalars on every
    device, so that every process reads them), or `(state, None)` as given when there is none."""
    replicated = NamedSharding(sharding.every_device_mesh(), PartitionSpec())
    shardings = TrainState(param_shardings, opt_shardings, replicated, replicated, replicated).as_dict()
    restored = ckpt.restore_latest(
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state.as_dict(), shardings)
    )
    if restored is None:
        return state, None
    _, tree, data_state = restored
    logging.info('resuming from checkpoint step %d', int(tree['step']))
    return TrainState(**tree), data_state['iterator']


def training_prompts(config, tokenizer, teacher, student, mesh, teacher_mesh, *, pad_id, eos, vocab_size) -> tuple:
    """The tokenized training prompts (`data.load_prompts`), rendered by the teacher's template too when
    `data.teacher_template` asks for it; `auto` compares the two renderings once (`warn_on_template_mismatch`).
    Returns `(prompts, report)`."""
    d = config.data
    teacher_tokenizer = None
    if d.teacher_template != 'student':  # render every prompt as the teacher would too, to use it or to compare
        teacher_tokenizer = load_tokenizer(
            config.model.teacher_tokenizer_path or config.model.teacher_path,
            chat_template=d.teacher_chat_template or None,
        )
    prompts, report = data.load_prompts(
        d.train_path,
        tokenizer,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        prompt_template=d.prompt_template,
        chat_template=d.chat_template,
        max_prompt_length=d.max_prompt_length,
        on_bad_record=d.on_bad_record,
        data_format=d.format,
        teacher_tokenizer=teacher_tokenizer,
        teacher_system_prompt=d.teacher_system_prompt,
    )
    logging.info('training data: %s', report.summary())
    if d.teacher_template == 'auto':
        warn_on_template_mismatch(
            prompts,
            teacher,
            student,
            mesh,
            teacher_mesh,
            pad_id=pad_id,
            eos=eos,
            vocab_size=vocab_size,
            key=jax.random.key(config.train.seed),
        )
        for p in prompts:
            del p['teacher_prompt_tokens']
    return prompts, report


def evaluation_records(config) -> list[dict] | None:
    """The periodic evaluation's problems (`evaluate.config_records`), or None without `eval.path`."""
    if not config.eval.path:
        return None
    return evaluate.config_records(config)


def step_batch(rollout, prompt_batch, step: int, settings: StepSettings, config, mesh, batch_shardings, pad_id):
    """The train step's batch from the step's rollouts, on the student's mesh, and the step's settings: the rollout
    rows, or packed rows (`train.packing`: every column after the first may be a response token), plus the teacher's
    own rows with `data.teacher_template=teacher`; REOPOLD's phase from the step."""
    if settings.packed:
        packed = pack_rollouts(rollout, config.train.micro_batch_size, config.train.packing_buckets)
        batch = {k: _global_array(v, mesh, batch_shardings[k].spec) for k, v in packed.items()}
        prompt_length = 1
    else:
        batch = {k: jax.device_put(getattr(rollout, k), batch_shardings[k]) for k in BATCH_KEYS}
        prompt_length = rollout.prompt_length
    refining = config.loss.method == 'reopold' and step / config.train.steps >= config.loss.reopold_exploration_fraction
    settings = dataclasses.replace(settings, prompt_length=prompt_length, reopold_refining=refining)
    if config.data.teacher_template == 'teacher':
        batch, settings = with_teacher_rows(
            batch, rollout, prompt_batch, settings, batch_shardings, config.rollout.num_rollouts, pad_id
        )
    return jax.block_until_ready(batch), settings


def train_and_evaluate(config, workdir: str, *, export_only: bool = False) -> dict:
    """Trains the student of `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

    Writes `workdir/metrics.jsonl` (one row per logged step), `workdir/tensorboard/`, `workdir/checkpoints/` and,
    at the end, `workdir/hf/` (the student as a Hugging Face checkpoint). `workdir` may be a `gs://` URL.
    Only process 0 writes logs and the export.
    With `export_only`, or when the latest checkpoint is already at `train.steps`, nothing is trained: that
    checkpoint's student (or the initial one) is exported to `workdir/hf` (without `export_only`, when
    `checkpoint.export_hf_at_end`) and the function returns `{'step': its step}`. On SIGTERM
    (`tropd_jax.preemption`) every process stops after the same step, writes its checkpoint and returns the last
    metrics with `preempted=True`, without the final evaluation or export.
    """
    config_lib.validate_config(config, num_devices=jax.device_count())
    mesh, teacher_mesh = make_meshes(config)
    total_steps = config.train.steps

    # Models and data.
    tokenizer, student, student_config, teacher, vocab_size = load_models(config, mesh, teacher_mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = sampling.eos_ids(tokenizer, student_config)
    prompts, report = training_prompts(
        config, tokenizer, teacher, student, mesh, teacher_mesh, pad_id=pad_id, eos=eos, vocab_size=vocab_size
    )

    # The compiled step. From here on the student lives as (graphdef, params): params and opt_state are the train
    # state.
    student_graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    settings = step_settings(config, vocab_size)
    keys = batch_keys(settings) + (TEACHER_TEMPLATE_KEYS if config.data.teacher_template == 'teacher' else ())
    optimizer = make_optimizer(settings.optimizer)
    step_fn, batch_shardings, param_shardings, opt_shardings = jit_train_step(
        mesh,
        params,
        jax.eval_shape(optimizer.init, params),
        teacher_state,
        keys,
        settings,
        student_graphdef,
        teacher_graphdef,
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    score_fn = (
        jit_teacher_scores(teacher_mesh, mesh, teacher_state, teacher_graphdef) if settings.separate_teacher else None
    )

    # The train state, resumed from the latest checkpoint when there is one.
    train_key, eval_key = jax.random.split(jax.random.key(config.train.seed))
    ckpt = checkpoint.Checkpointer(
        paths.join(workdir, 'checkpoints'),
        every_steps=config.checkpoint.every_steps or total_steps,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    state, data_state = restore_or_init(
        ckpt, TrainState.create(params, opt_state, 0, 0, train_key), param_shardings, opt_shardings
    )
    del params, opt_state  # the state holds them (or the restored ones instead)
    start_step, skipped, train_key = int(state.step), int(state.skipped_steps), state.key
    export = lambda step, state, row=None: save_pretrained_state(
        student_graphdef, state.params, mesh, paths.join(workdir, 'hf'), tokenizer
    )
    if export_only or start_step >= total_steps:
        ckpt.close()
        if export_only or config.checkpoint.export_hf_at_end:
            export(start_step, state)
        return {'step': start_step}
    iterator = data.prompt_iterator(
        prompts, batch_size=config.train.prompts_per_step, seed=config.data.seed, state=data_state
    )

    # Logging, checkpoints, evaluation and export: the loop's periodic actions.
    eval_records = evaluation_records(config)
    is_main = jax.process_index() == 0
    writer = metrics.MetricsWriter(
        workdir,
        tensorboard=config.log.tensorboard,
        enabled=is_main,
        wandb=metrics.wandb_settings(config, workdir) if is_main else None,
    )
    bar = metrics.ProgressBar(total_steps, start_step, enabled=is_main and config.log.progress_bar)
    if start_step == 0:  # the data report is the same on every resume; log it once
        writer.write(
            0,
            {
                'data_records': report.total,
                'data_kept': report.kept,
                'data_malformed': report.malformed,
                'data_too_long': report.too_long,
            },
        )

    def evaluate_now(step, state, row=None):
        # The same key at every evaluation: the samples before and after training share their random numbers, so
        # the difference in accuracy is the model's, not the draw's (a paired comparison).
        with jax.set_mesh(mesh):
            result = evaluate.evaluate_with_config(
                nnx.merge(student_graphdef, state.params), tokenizer, eval_records, eval_key, config, mesh=mesh
            )
        writer.write(step, result)
        bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in result.items()))
        return result

    hooks = Hooks(total_steps)
    hooks.add(lambda step, state, row: writer.write(step, row), every=config.log.every_steps, at_end=True)
    hooks.add(lambda step, state, row: bar.update(row), every=1, at_end=True)
    # Also after the step a preemption stops at: the checkpoint the resumed run starts from.
    hooks.add(
        lambda step, state, row: ckpt.save(step, state.as_dict(), {'iterator': iterator.get_state()}, force=True),
        every=config.checkpoint.every_steps or total_steps,
        at_end=True,
        on_stop='always',
    )
    if eval_records is not None:
        hooks.add(evaluate_now, every=config.eval.every_steps, at_end=config.eval.at_end, on_stop='never')
        if config.eval.at_start and start_step == 0:
            evaluate_now(0, state)
    hooks.add(export, at_end=config.checkpoint.export_hf_at_end, on_stop='never')

    row = {}
    watch, preempted = preemption.PreemptionWatch().start(), False  # SIGTERM: save the step reached, then stop
    try:
        for step in range(start_step, total_steps):
            prompt_batch = next(iterator)
            rollout_key, loss_key = jax.random.split(jax.random.fold_in(train_key, step))
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                rollout, l_max = make_rollouts(
                    teacher,
                    nnx.merge(student_graphdef, state.params),
                    prompt_batch,
                    rollout_key,
                    step,
                    config,
                    mesh,
                    pad_id=pad_id,
                    eos=eos,
                    vocab_size=vocab_size,
                    teacher_mesh=teacher_mesh,
                )
                batch, step_settings_now = step_batch(
                    rollout, prompt_batch, step, settings, config, mesh, batch_shardings, pad_id
                )
                t1 = time.perf_counter()
                # A separate teacher scores the whole batch on its devices first; its targets replace its state.
                teacher_in = teacher_state if score_fn is None else score_fn(teacher_state, batch, step_settings_now)
                params, opt_state, step_metrics = step_fn(
                    state.params, state.opt_state, teacher_in, batch, loss_key, step_settings_now
                )
                step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            t2 = time.perf_counter()
            if step_metrics['skipped']:
                skipped += 1
                logging.warning(
                    'step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped',
                    step + 1,
                    step_metrics['loss'],
                    step_metrics['grad_norm'],
                )
            state = TrainState.create(params, opt_state, step + 1, skipped, train_key)
            row = {
                **step_metrics,
                'max_prefix_length': l_max,
                'skipped_steps': skipped,
                'rollout_time': t1 - t0,
                'train_time': t2 - t1,
                'tokens_per_second': step_metrics['response_tokens'] / max(t2 - t0, 1e-9),
            }
            preempted = watch.reached(step + 1)
            row.update(hooks.run(step + 1, state, row, stopping=preempted))
            if preempted:
                logging.warning('preempted: stopping after step %d and writing its checkpoint', step + 1)
                break
    finally:
        watch.stop()
        bar.close()
        ckpt.close()  # waits for the checkpoint being written
    writer.close()
    if preempted:
        logging.warning(
            'preempted: checkpoint of step %d written to %s; run the same command to resume', step + 1, ckpt.directory
        )
        return {**row, 'preempted': True}
    return row
