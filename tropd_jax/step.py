"""The train step on the device: micro-batches, the teacher's targets, the student's gradients, AdamW.

`train_step`: over micro-batches of the rollouts (a `lax.scan`, so only one micro-batch of logits exists at a time),
score with the teacher (no gradient) and the student, take the loss and its gradient, accumulate; then clip, apply
AdamW, or skip the update when the loss or gradient is not finite.

Micro-batches are weighted (`tropd_jax.grad_accum`) so that the accumulated gradient is exactly the gradient of the
loss aggregated over the whole batch (token-mean: each micro-batch's loss times its share of the batch's response
tokens; seq-mean: its share of the batch's sequences), and the loss metrics are `(sum, count)` pairs that add up
over micro-batches. The one batch-level choice made per micro-batch instead is the top-q student-entropy
selection of `entropy_opd` / `reopold`. Trust-region draws are keyed by the step's key, the token's rollout index and
its position in the rollout, so they do not depend on where the token sits (which micro-batch, packed or not).

Packed rows (`train.packing`, `tropd_jax.rollouts.pack_rollouts`): the teacher's scoring and the student's forward,
backward and loss run on rows of several rollouts each, with segment ids and per-segment RoPE positions: the same
loss, gradients and metrics as on the `[R, P + N]` rollout rows (up to float rounding), with far less padding
computed. With `entropy_opd` / `reopold` the per-micro-batch top-q selection sees other micro-batches when packed
(the same training only when one micro-batch holds the whole batch).

The train step is one `jax.jit` with explicit input and output shardings on the ('data', 'fsdp', 'tensor') mesh:
student parameters and AdamW moments follow the logical rules of `tropd_jax.sharding` (FSDP by default), the teacher
likewise, and rollouts are split along the batch over data x fsdp.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import config as config_lib
from tropd_jax import fused_loss, grad_accum, losses, sampling, schedules, scoring, sharding


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
        optim = config.optim
        return cls(
            optim.learning_rate,
            optim.schedule,
            optim.warmup_steps,
            config.train.steps,
            optim.weight_decay,
            optim.b1,
            optim.b2,
            optim.eps,
            optim.clip_norm,
        )


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the learning-rate schedule (exposed in the state for logging)."""
    schedule = schedules.learning_rate_schedule(
        settings.learning_rate, settings.total_steps, schedule=settings.schedule, warmup_steps=settings.warmup_steps
    )
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=settings.b1, b2=settings.b2, eps=settings.eps, weight_decay=settings.weight_decay
    )
    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm) if settings.clip_norm > 0 else optax.identity(), adamw
    )


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


def _packed_inputs(micro, settings: StepSettings) -> tuple:
    """The `scoring` arguments of packed rows (positions, segment ids), or none."""
    return (micro['positions'], micro['segment_ids']) if settings.packed else ()


def teacher_outputs(teacher_state, micro, *, teacher_graphdef, settings: StepSettings):
    """The teacher's targets for one micro-batch (`[m, S]` arrays): top-k statistics for the fused loss, else its
    full response logits; no gradient."""
    if settings.teacher_prompt_length:  # the same responses after the prompts as the teacher renders them
        tokens, input_mask, p = micro['teacher_tokens'], micro['teacher_input_mask'], settings.teacher_prompt_length
    else:
        tokens, input_mask, p = micro['tokens'], micro['input_mask'], settings.prompt_length
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    if settings.fused:
        return scoring.teacher_targets(
            teacher,
            tokens,
            input_mask,
            p,
            k=losses.topk_size(settings.method, dict(settings.hyperparameters)),
            vocab_size=settings.vocab_size,
            chunk_size=settings.chunk_size,
            full_vocabulary=settings.method in losses.FULL_VOCABULARY_METHODS,
            **dict(zip(('packed_positions', 'segment_ids'), _packed_inputs(micro, settings))),
        )
    return jax.lax.stop_gradient(
        scoring.response_logits(teacher, tokens, input_mask, p, *_packed_inputs(micro, settings))
    )


def student_grads(params, micro, teacher_out, key, *, student_graphdef, settings: StepSettings):
    """The gradient of the loss of one micro-batch (`[m, S]` arrays, with `rollout_ids`) given the teacher's targets,
    and the loss metrics' `(sum, count)` pairs."""
    hyperparameters = dict(settings.hyperparameters)
    p = settings.prompt_length  # response columns start here
    tokens, input_mask = micro['tokens'], micro['input_mask']
    t = scoring.targets(tokens, input_mask, micro['response_mask'], micro['prefix_mask'], micro['logprobs'], p)
    positions = micro['positions'] if settings.packed else scoring.positions(input_mask)
    # The sampler's log-probs always reach the loss (its mismatch metrics); rho_t uses them only if importance_ratio.
    # M_t is keyed by the token's rollout and its position in it, which packing does not change.
    extra = dict(
        rollout_logprobs=t.rollout_logprobs,
        use_importance_ratio=settings.importance_ratio,
        progress=1.0 if settings.reopold_refining else 0.0,
        draw_ids=(micro['rollout_ids'][:, p:], positions[:, p:]),
        segment_ids=micro['segment_ids'][:, p:] if settings.packed else None,
    )

    def loss_fn(params):
        student = nnx.merge(student_graphdef, params)
        if settings.fused:
            hidden = scoring.response_hidden(student, tokens, input_mask, p, *_packed_inputs(micro, settings))
            loss, stats = fused_loss.fused_distillation_loss(
                settings.method,
                hidden,
                student.lm_head_weight(),
                teacher_out,
                t.tokens,
                t.response_mask,
                t.prefix_mask,
                key,
                vocab_size=settings.vocab_size,
                chunk_size=settings.chunk_size,
                **extra,
                **hyperparameters,
            )
        else:
            logits = scoring.response_logits(student, tokens, input_mask, p, *_packed_inputs(micro, settings))
            loss, stats = losses.distillation_loss(
                settings.method,
                logits,
                teacher_out,
                t.tokens,
                t.response_mask,
                t.prefix_mask,
                key,
                vocab_size=settings.vocab_size,
                **extra,
                **hyperparameters,
            )
        return loss, stats

    return jax.grad(loss_fn, has_aux=True)(params)


def teacher_scores(teacher_state, batch, teacher_graphdef, settings: StepSettings):
    """A separate teacher's targets for a whole batch (`[B, P + N]` `tokens` and `input_mask`, or `teacher_tokens` and
    `teacher_input_mask`; packed rows add `positions` and `segment_ids`), one micro-batch at a time as the train step
    takes them: every leaf of `teacher_outputs` with a leading `[n]` micro-batch axis."""
    micro = grad_accum.micro_batches(dict(batch), settings.micro_batch_size)

    def score(mb):
        mb = {k: sharding.constrain_rows(v) for k, v in mb.items()}
        return teacher_outputs(teacher_state, mb, teacher_graphdef=teacher_graphdef, settings=settings)

    return jax.lax.map(score, micro)


def _micro_batch_grads(params, teacher, micro, key, *, student_graphdef, teacher_graphdef, settings: StepSettings):
    """`student_grads` after the teacher's pass over the same micro-batch (`teacher` is its state), or with the
    targets a separate teacher scored (`teacher` is this micro-batch's slice of `teacher_scores`)."""
    if settings.separate_teacher:
        teacher_out = teacher
    else:
        teacher_out = teacher_outputs(teacher, micro, teacher_graphdef=teacher_graphdef, settings=settings)
    return student_grads(params, micro, teacher_out, key, student_graphdef=student_graphdef, settings=settings)


def accumulate_gradients(
    params, teacher_state, batch, key, *, student_graphdef, teacher_graphdef, settings: StepSettings
):
    """The gradient of the batch loss and the loss metrics, one micro-batch at a time (`grad_accum.accumulate`).

    Arguments as `train_step`. Returns `(grads, metrics)`: float32 gradients like `params`, and the float32 scalar
    metrics of `losses.distillation_loss` over the whole batch (`losses.metric_values` of the summed pairs).
    """
    batch = {k: v for k, v in batch.items() if k != 'finish_reason'}
    batch_size, columns = batch['tokens'].shape
    if (
        not settings.packed
    ):  # every row is one rollout; its index keys the trust-region draws as a packed segment's does
        rows = jnp.arange(batch_size, dtype=jnp.int32)[:, None]
        batch['rollout_ids'] = jnp.broadcast_to(rows, (batch_size, columns))
    weights = grad_accum.micro_batch_weights(
        batch['response_mask'][:, settings.prompt_length :],
        settings.micro_batch_size,
        dict(settings.hyperparameters)['aggregation'],
    )

    def grad_fn(params, xs):
        micro, scored = xs
        teacher = teacher_state if scored is None else jax.tree.map(sharding.constrain_rows, scored)
        return _micro_batch_grads(
            params,
            teacher,
            jax.tree.map(sharding.constrain_rows, micro),
            key,
            student_graphdef=student_graphdef,
            teacher_graphdef=teacher_graphdef,
            settings=settings,
        )

    scored = (
        teacher_state if settings.separate_teacher else None
    )  # [n, m, ...] targets, scanned along with the micro-batches
    grads, pairs = grad_accum.accumulate(
        grad_fn, params, weights, (grad_accum.micro_batches(batch, settings.micro_batch_size), scored)
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
    if settings.packed and settings.teacher_prompt_length:
        raise ValueError("packed rows cannot carry the teacher's own template rows (data.teacher_template=teacher)")
    grads, out = accumulate_gradients(
        params,
        teacher_state,
        batch,
        key,
        student_graphdef=student_graphdef,
        teacher_graphdef=teacher_graphdef,
        settings=settings,
    )

    optimizer = make_optimizer(settings.optimizer)
    grad_norm = optax.tree.norm(grads)  # before clipping
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    update_norm = optax.tree.norm(updates)  # the step's size after clipping and AdamW (grad_norm is before)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(out['loss']) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)

    num_rollouts = batch['finish_reason'].shape[0]  # rows may hold several rollouts (packed) or none (padding rows)
    response = batch['response_mask'][:, settings.prompt_length :].astype(jnp.float32)
    prefix = batch['prefix_mask'][:, settings.prompt_length :].astype(jnp.float32) * response
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


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the update that produced `opt_state`, looked up by name (`optax.inject_hyperparams`
    keeps it in `hyperparams`, wherever `make_optimizer` puts AdamW in its chain; the schedule's own state, which
    has the same name, is not an array)."""
    return optax.tree_utils.tree_get(
        opt_state, 'learning_rate', filtering=lambda _, value: isinstance(value, jax.Array)
    )


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
