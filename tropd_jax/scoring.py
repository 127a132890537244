"""Scoring: teacher and student forward passes over rollouts, cropped to the response.

A rollout is `tokens[B, P + N]`: a left-padded prompt of P columns, then N response columns (docs/architecture.md).
The model runs on `tokens[:, :-1]` (the shift: position t predicts token t + 1), and only the outputs at columns
P - 1 ... P + N - 2, the ones that predict response tokens, go through the LM head: the prompt columns never carry a
loss, so their logits are never computed. Every array handed to the losses is therefore `[B, N]` (or `[B, N, V]`),
aligned with `tokens[:, P:]`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import decoding, fused_loss, sampling


class Targets(NamedTuple):
    """The response part of a rollout, aligned with the scores. All `[B, N]`.

    tokens: int32 response tokens (what `logits[:, t]` is scored against).
    response_mask, prefix_mask: float32 masks of response tokens and teacher-written prefix tokens.
    rollout_logprobs: float32 log-probs of the sampling policy (0 on padding).
    """

    tokens: jax.Array
    response_mask: jax.Array
    prefix_mask: jax.Array
    rollout_logprobs: jax.Array


def positions(input_mask: jax.Array) -> jax.Array:
    """RoPE positions of left-padded rows, [B, S] int32: the sampler's (`decoding.positions`)."""
    return decoding.positions(input_mask)


def targets(tokens, input_mask, response_mask, prefix_mask, logprobs, prompt_length: int) -> Targets:
    """The response columns `[:, P:]` of a rollout's arrays (`[B, P + N]` each)."""
    del input_mask  # the response mask already excludes padding
    crop = lambda x: x[:, prompt_length:]
    return Targets(
        tokens=crop(tokens).astype(jnp.int32),
        response_mask=crop(response_mask).astype(jnp.float32),
        prefix_mask=crop(prefix_mask).astype(jnp.float32),
        rollout_logprobs=crop(logprobs).astype(jnp.float32),
    )


def response_hidden(
    model: nnx.Module,
    tokens: jax.Array,
    input_mask: jax.Array,
    prompt_length: int,
    packed_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Final hidden states that predict the response tokens: `[B, N, H]` (compute dtype).

    tokens, input_mask: `[B, P + N]`. Row b's output at column P - 1 + t predicts `tokens[b, P + t]`.
    Packed rows (`tropd_jax.packing`): `packed_positions` and `segment_ids` `[B, S]` as `packing.pack` makes them,
    and prompt_length 1 (every column after the first may be a response token).
    """
    if prompt_length < 1:
        raise ValueError(f'prompt_length={prompt_length} must be >= 1 (the first response token needs a context)')
    inputs, mask = tokens[:, :-1], input_mask[:, :-1]
    if segment_ids is None:
        hidden, _ = model(inputs, positions(mask), mask, return_hidden=True)
    else:
        hidden, _ = model(inputs, packed_positions[:, :-1], mask, return_hidden=True, segment_ids=segment_ids[:, :-1])
    return hidden[:, prompt_length - 1 :]


def response_logits(
    model: nnx.Module,
    tokens: jax.Array,
    input_mask: jax.Array,
    prompt_length: int,
    packed_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits of every response token's distribution: `[B, N, V]` (compute dtype); `logits[:, t]` scores
    `tokens[:, P + t]`. Packed rows: as `response_hidden`."""
    hidden = response_hidden(model, tokens, input_mask, prompt_length, packed_positions, segment_ids)
    return hidden @ model.lm_head_weight().astype(hidden.dtype)


def teacher_targets(
    teacher: nnx.Module,
    tokens: jax.Array,
    input_mask: jax.Array,
    prompt_length: int,
    *,
    k: int,
    vocab_size: int,
    chunk_size: int,
    packed_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    full_vocabulary: bool = False,
) -> fused_loss.TeacherTargets:
    """The teacher's O(k)-per-token targets for the fused loss (one chunk of teacher logits at a time), plus with
    `full_vocabulary` its hidden states and LM head (`fused_loss.teacher_pass`). Packed rows: as `response_hidden`."""
    hidden = lambda: response_hidden(teacher, tokens, input_mask, prompt_length, packed_positions, segment_ids)
    response_tokens = tokens[:, prompt_length:].astype(jnp.int32)
    return fused_loss.teacher_pass(
        hidden,
        teacher.lm_head_weight(),
        response_tokens,
        k=k,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        full_vocabulary=full_vocabulary,
    )


def teacher_rows(tokens, input_mask, prompt_length: int, teacher_prompts, num_rollouts: int, pad_id: int = 0):
    """The rollout's responses after the prompts as the teacher renders them: `(tokens, input_mask)`, each
    `[B, P_T + N]` (P_T: the teacher prompts' bucket length), the response columns `[:, P_T:]` equal to the
    rollout's `[:, P:]`, so the teacher's scores line up with the student's.

    tokens, input_mask: `[B, P + N]` rollout arrays; teacher_prompts: one token array per prompt, whose rows are
    prompt i's `num_rollouts` consecutive rows.
    """
    prompt_tokens, prompt_mask = sampling.pad_prompts(list(teacher_prompts), pad_id=pad_id)
    prompt_tokens = jnp.repeat(jnp.asarray(prompt_tokens), num_rollouts, axis=0)
    prompt_mask = jnp.repeat(jnp.asarray(prompt_mask), num_rollouts, axis=0)
    return (
        jnp.concatenate([prompt_tokens, jnp.asarray(tokens)[:, prompt_length:]], axis=1),
        jnp.concatenate([prompt_mask, jnp.asarray(input_mask)[:, prompt_length:]], axis=1),
    )


def response_logprobs(model: nnx.Module, tokens, input_mask, prompt_length: int, vocab_size: int) -> jax.Array:
    """`[B, N]` float32 log-probs of the response tokens `tokens[:, P:]` (over the shared vocabulary)."""
    logits = response_logits(model, tokens, input_mask, prompt_length)[..., :vocab_size].astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, prompt_length:, None].astype(jnp.int32), axis=-1)[..., 0]


def template_logprob_difference(
    teacher: nnx.Module, rollout, teacher_prompts, vocab_size: int, pad_id: int = 0
) -> dict:
    """How much the teacher's log-probs of the same response tokens move when it reads the prompts as it renders
    them instead of as the student does.

    rollout: a `sampling.Rollout` of one row per prompt (the student's prompts); teacher_prompts: those prompts as
    the teacher renders them. Returns float `mean` (teacher's rendering minus the student's, nats per response token),
    `mean_abs`, `tokens` (how many response tokens) and `prompts`.
    """
    mask = rollout.response_mask[:, rollout.prompt_length :].astype(jnp.float32)
    as_student = response_logprobs(teacher, rollout.tokens, rollout.input_mask, rollout.prompt_length, vocab_size)
    t_tokens, t_mask = teacher_rows(
        rollout.tokens, rollout.input_mask, rollout.prompt_length, teacher_prompts, 1, pad_id
    )
    as_teacher = response_logprobs(teacher, t_tokens, t_mask, t_tokens.shape[1] - mask.shape[1], vocab_size)
    diff = (as_teacher - as_student) * mask
    count = jnp.maximum(mask.sum(), 1.0)
    return {
        'mean': float(diff.sum() / count),
        'mean_abs': float(jnp.abs(diff).sum() / count),
        'tokens': int(mask.sum()),
        'prompts': int(mask.shape[0]),
    }
