"""The distillation losses from hidden states and LM heads, chunked over tokens: never a [tokens, vocab] array.

`tropd_jax.losses` is the readable definition on full logits. Full logits of one 32k-token response over Qwen's
151,936-token vocabulary are ~20 GB in float32, and the naive loss keeps several such buffers for the backward pass,
while the estimators only need O(k) numbers per token. This module computes exactly the same `TokenStats`, chunk by
chunk, and hands them to `losses.loss_from_stats`, so every method is still written once.

  1. `teacher_pass`: teacher hidden states + LM head -> `TeacherTargets` (tau_t, top-k ids and log-probs, entropy),
     no gradient; only one chunk of teacher logits exists at a time. With `full_vocabulary=True` (the exact
     divergences of `losses.FULL_VOCABULARY_METHODS`: `jsd`, `full_fkl`, `full_rkl`) it also keeps each token's
     log-normaliser (the log-sum-exp over the whole vocabulary), its hidden states and its head.
  2. `student_stats`: student hidden states + LM head + targets -> `TokenStats`, with a custom VJP. Pass 1 (forward)
     computes each chunk's log-normaliser and saves it; pass 2 (backward) recomputes each chunk's logits, normalises
     them with the saved log-normaliser, and forms the gradient, so forward + backward memory grows with chunk x V,
     not tokens x V. The exact divergences recompute the chunk's teacher logits from its hidden states and head in
     both passes, and take their gradient in closed form (`_divergence_grad`).
  3. `fused_distillation_loss` = `student_stats` + `losses.loss_from_stats`.

At 32k tokens, hidden 1536 and vocabulary 151,936 (bf16), `tropd`'s loss + gradient need 3.4 GB of temporaries
against 91 GB for the naive loss, and the exact `jsd` 4.6 GB against 270 GB (`benchmarks/loss_memory.py`, XLA CPU),
nearly all of it independent of the length. XLA's buffer assignment for `tropd` shows three [H, V] float32 arrays
(0.93 GB each) and float32 chunks of logits (0.62 GB each at chunk_size 1024): the head gradient's float32
accumulator, its per-chunk increment (sharing its space with the chunk's logit-gradient buffers), and a float32
copy of the bf16 head that the CPU backend makes for its bf16 matmuls. Under a mesh all of them are split over the
devices.

Where the inputs come from (`tropd_jax.models.decoder`), with the shift of docs/architecture.md done by the caller:

  inputs, targets_ids = tokens[:, :-1], tokens[:, 1:]          # hidden[:, t] predicts targets_ids[:, t]
  teacher_hidden, _ = teacher(inputs, positions[:, :-1], input_mask[:, :-1], return_hidden=True)   # [B, T, H_T]
  targets = teacher_pass(teacher_hidden, teacher.lm_head_weight(), targets_ids, k=k, vocab_size=V, chunk_size=c)
  # For jsd / full_fkl / full_rkl: teacher_pass(..., full_vocabulary=True).
  def loss_fn(student):
      hidden, _ = student(inputs, positions[:, :-1], input_mask[:, :-1], return_hidden=True)       # [B, T, H_S]
      return fused_distillation_loss(method, hidden, student.lm_head_weight(), targets, targets_ids,
                                     response_mask[:, 1:], prefix_mask[:, 1:], key, vocab_size=V, chunk_size=c)

`Decoder.lm_head_weight()` is `[H, V_padded]` (the transposed embedding when tied); the two models may pad their
vocabularies differently (151,936 vs 152,064 rows): `vocab_size` is the shared real vocabulary, and logits beyond it
are masked to -inf rather than sliced, so a vocabulary-sharded head is never copied. (The exact divergences cut or
zero-pad the teacher's head to the student's width once per call, so both chunks' logits line up column by column.)

Chunks are strided along the sequence: each row's T positions are viewed as `[chunk_length, num_chunks]` (a free
reshape after padding T to chunk_length x num_chunks), and chunk j takes positions j, j + num_chunks, ... of every
row: B x chunk_length <= chunk_size tokens (at least one position per row). Rows split along data/fsdp stay split,
and so do positions split in blocks, so every device works on its own tokens in every chunk.

Under a mesh (set with `jax.set_mesh`; axes ('data', 'fsdp', 'tensor') with Auto axis types, as
`tropd_jax.sharding.make_mesh` builds them), a chunk's logits are split along the vocabulary over `fsdp` x `tensor`
and along tokens over `data` (the logical axes `loss_vocab`, `loss_tokens`). The chunk's hidden states (chunk x H,
a few MB) are all-gathered over `fsdp`, and the LM head is re-split once from [H / fsdp, V / tensor] to
[H, V / (fsdp x tensor)]: no device ever holds the whole head or its whole float32 gradient (0.9 GB each for a 1.5B
model's 151,936 x 1,536 head; FSDP would gather the head and reduce-scatter a full-size gradient every chunk). The
log-sum-exp and the gathers at token ids are partitioned by XLA (partial reductions plus an all-reduce), and the top-k
is taken per vocabulary shard in a `shard_map`, gathering only k candidates per shard (XLA's own top-k would
all-gather the whole chunk of logits, and without a mesh in context that is what happens: correct, but slower).
`chunk_size` counts tokens over the whole mesh: a device holds chunk / data x V / (fsdp x tensor) logits at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tropd_jax import losses, sharding

DEFAULT_CHUNK_SIZE = 1024
LOGITS_AXES = ('loss_tokens', 'loss_vocab')  # one chunk's logits [tokens, vocabulary]


class TeacherTargets(NamedTuple):
    """What the losses need from the teacher, O(k) numbers per token. Shapes `[B, T]` unless stated.

    teacher_logprobs: tau_t = log pi_T(y_t), float32.
    topk_ids: [B, T, k] int32, the teacher's top-k ids K_t, by decreasing probability.
    topk_logprobs: [B, T, k] float32, log p_T at `topk_ids` (full shared-vocabulary log-probs).
    teacher_entropy: float32 entropy of pi_T over the shared vocabulary.
    With `teacher_pass(..., full_vocabulary=True)` (the exact divergences of `losses.FULL_VOCABULARY_METHODS`),
    else None:
    log_normalizer: float32 log-sum-exp of the teacher's logits over the shared vocabulary.
    hidden: [B, T, H_T] the teacher's hidden states; lm_head: [H_T, V_T] its LM head (both without gradient), from
      which the student pass recomputes each chunk's teacher logits.
    """

    teacher_logprobs: jax.Array
    topk_ids: jax.Array
    topk_logprobs: jax.Array
    teacher_entropy: jax.Array
    log_normalizer: jax.Array | None = None
    hidden: jax.Array | None = None
    lm_head: jax.Array | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Chunk layout and per-chunk math.


def _chunk_layout(batch: int, length: int, chunk_size: int) -> tuple[int, int]:
    """(num_chunks, chunk_length): each chunk takes chunk_length <= max(chunk_size // B, 1) positions of every row,
    as evenly as possible (fewer than num_chunks padded positions per row)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f'chunk_size={chunk_size!r} must be a positive integer')
    num_chunks = -(-length // max(chunk_size // batch, 1))
    return num_chunks, -(-length // num_chunks)


def _to_chunks(x: jax.Array, num_chunks: int, chunk_length: int) -> jax.Array:
    """[B, T, ...] -> [B, chunk_length, num_chunks, ...]: zero-pad T, then view position t as (t // nc, t % nc)."""
    pad = chunk_length * num_chunks - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    # No sharding constraint: rows split along data/fsdp stay so, and positions split into blocks (sequence
    # sharding) land on chunk_length, so each chunk is still spread over the same devices as its tokens.
    return x.reshape(x.shape[0], chunk_length, num_chunks, *x.shape[2:])


def _from_chunks(view: jax.Array, length: int) -> jax.Array:
    """[B, chunk_length, num_chunks, ...] -> [B, T, ...], dropping the padding."""
    return view.reshape(view.shape[0], -1, *view.shape[3:])[:, :length]


def _chunk(view: jax.Array, j: jax.Array) -> jax.Array:
    """Chunk j of a view, flattened over rows: [B, chunk_length, num_chunks, ...] -> [B * chunk_length, ...]."""
    x = lax.dynamic_index_in_dim(view, j, axis=2, keepdims=False)
    return x.reshape(-1, *x.shape[2:])


def _set_chunk(view: jax.Array, j: jax.Array, value: jax.Array) -> jax.Array:
    """Writes a flattened chunk [B * chunk_length, ...] as chunk j of `view` (in place inside a loop)."""
    value = value.reshape(view.shape[:2] + value.shape[1:]).astype(view.dtype)
    return view.at[:, :, j].set(value)


def _logits(hidden: jax.Array, head: jax.Array, vocab_size: int) -> jax.Array:
    """float32 logits of one chunk, [c, H] x [H, V] -> [c, V], -inf beyond the shared vocabulary."""
    hidden = sharding.constrain(hidden, ('loss_tokens', None))
    logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
    if vocab_size < logits.shape[-1]:
        real = lax.broadcasted_iota(jnp.int32, logits.shape, 1) < vocab_size
        logits = jnp.where(real, logits, -jnp.inf)
    return sharding.constrain(logits, LOGITS_AXES)


def _split_head(head: jax.Array) -> jax.Array:
    """[H, V] re-split along the vocabulary only (`loss_vocab`), as the chunks' logits are."""
    return sharding.constrain(head, (None, 'loss_vocab'))


def _log_softmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probs [c, V], log-sum-exp [c]); the same steps as `losses.log_softmax`, so values match it."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    sum_exp = jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)
    log_sum = jnp.log(jnp.maximum(sum_exp, jnp.finfo(jnp.float32).tiny))
    return logits - m - log_sum, (m + log_sum)[:, 0]


def _entropy(logprobs: jax.Array) -> jax.Array:
    p = jnp.exp(logprobs)
    return -jnp.sum(jnp.where(p > 0, p * logprobs, 0.0), axis=-1)


def _gather(logprobs: jax.Array, ids: jax.Array) -> jax.Array:
    """logprobs [c, V] at ids [c] or [c, k]."""
    if ids.ndim == 1:
        return jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(logprobs, ids, axis=-1)


def _top_k(logprobs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k over the vocabulary of one chunk, [c, V] -> ([c, k], [c, k] int32), sorted descending.

    Under a mesh each device takes the top-k of its own vocabulary shard, then the k x shards candidates are
    all-gathered along the vocabulary axes and reduced to the global top-k (exact: every global top-k entry is in its
    shard's top-k). Ties go to the lower id, as in `lax.top_k`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        values, ids = lax.top_k(logprobs, k)
        return values, ids.astype(jnp.int32)
    spec = sharding.logical_to_spec(LOGITS_AXES, logprobs.shape, mesh)
    token_axes, vocab_axes = spec[0], spec[1]

    def local_top_k(x):
        values, ids = lax.top_k(x, min(k, x.shape[-1]))
        ids = ids.astype(jnp.int32)
        if vocab_axes is None:
            return values, ids
        ids = ids + lax.axis_index(vocab_axes).astype(jnp.int32) * x.shape[-1]
        values = lax.all_gather(values, vocab_axes, axis=1, tiled=True)
        ids = lax.all_gather(ids, vocab_axes, axis=1, tiled=True)
        values, best = lax.top_k(values, k)
        return values, jnp.take_along_axis(ids, best, axis=-1)

    # After the all-gather every vocabulary shard holds the same result; the replication check cannot see that.
    out = jax.sharding.PartitionSpec(token_axes, None)
    return jax.shard_map(local_top_k, mesh=mesh, in_specs=spec, out_specs=(out, out), check_vma=False)(logprobs)


def _check_inputs(hidden, head, tokens, vocab_size, who):
    if hidden.ndim != 3:
        raise ValueError(f'{who}_hidden must be [B, T, H], got shape {hidden.shape}')
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f'tokens must be [B, T] = {hidden.shape[:2]}, got shape {tokens.shape}')
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
        raise ValueError(f'{who}_lm_head must be [H, V] with H = {hidden.shape[-1]}, got shape {head.shape}')
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= head.shape[1]:
        raise ValueError(f'vocab_size={vocab_size!r} must be an integer in [1, {who} LM head rows {head.shape[1]}]')


# ---------------------------------------------------------------------------------------------------------------------
# Teacher.


def teacher_pass(
    teacher_hidden: jax.Array | Callable[[], jax.Array],
    teacher_lm_head: jax.Array,
    tokens: jax.Array,
    *,
    k: int,
    vocab_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    full_vocabulary: bool = False,
) -> TeacherTargets:
    """The teacher's per-token targets, one chunk of logits at a time, without gradient.

    Args:
      teacher_hidden: [B, T, H_T] final hidden states (`Decoder(..., return_hidden=True)`), or a function of no
        arguments returning them (the teacher forward then runs inside this call, under stop-gradient).
      teacher_lm_head: [H_T, V_T] (`Decoder.lm_head_weight()`); V_T may include padding rows.
      tokens: [B, T] int, the realised tokens (hidden[:, t] predicts tokens[:, t]).
      k: top-k size to keep (`losses.topk_size(method, hyperparameters)`).
      vocab_size: the shared real vocabulary; logits beyond it are excluded.
      chunk_size: tokens per chunk (over the whole mesh); memory holds chunk x V_T logits.
      full_vocabulary: also keep the log-normaliser, the hidden states and the LM head (`TeacherTargets`), for the
        exact divergences of `losses.FULL_VOCABULARY_METHODS`.
    Returns:
      `TeacherTargets` with float32 [B, T] / [B, T, k] arrays and int32 ids.
    """
    hidden = teacher_hidden() if callable(teacher_hidden) else teacher_hidden
    _check_inputs(hidden, teacher_lm_head, tokens, vocab_size, 'teacher')
    if not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f'k={k!r} must be an integer in [1, vocab_size {vocab_size}]')
    batch, length = tokens.shape
    hidden = lax.stop_gradient(hidden)
    head = _split_head(lax.stop_gradient(teacher_lm_head).astype(hidden.dtype))  # cast as the decoder does
    num_chunks, chunk_length = _chunk_layout(batch, length, chunk_size)
    hidden_view = _to_chunks(hidden, num_chunks, chunk_length)
    token_view = _to_chunks(tokens.astype(jnp.int32), num_chunks, chunk_length)

    def body(j, out):
        logprobs, log_sum_exp = _log_softmax(_logits(_chunk(hidden_view, j), head, vocab_size))
        topk_logprobs, topk_ids = _top_k(logprobs, k)
        values = (_gather(logprobs, _chunk(token_view, j)), topk_ids, topk_logprobs, _entropy(logprobs))
        if full_vocabulary:
            values += (log_sum_exp,)
        return tuple(_set_chunk(buf, j, v) for buf, v in zip(out, values))

    shape = (batch, chunk_length, num_chunks)
    init = (
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (k,), jnp.int32),
        jnp.zeros(shape + (k,), jnp.float32),
        jnp.zeros(shape, jnp.float32),
    ) + ((jnp.zeros(shape, jnp.float32),) if full_vocabulary else ())
    out = lax.fori_loop(0, num_chunks, body, init)
    targets = TeacherTargets(*(_from_chunks(x, length) for x in out))
    return targets._replace(hidden=hidden, lm_head=head) if full_vocabulary else targets


# ---------------------------------------------------------------------------------------------------------------------
# Student.


def _divergence(divergence: tuple[str, float], logp: jax.Array, logq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One chunk's full-vocabulary divergence between the student's log-probs `logp` and the teacher's `logq`, both
    [c, V] (-inf beyond the shared vocabulary): (value [c], aux [c]), aux being what its gradient reads
    (`_divergence_grad`). divergence = (method, jsd_beta), the method one of `losses.FULL_VOCABULARY_METHODS`."""
    method, beta = divergence
    lp, lq = losses._finite_logprobs(logp), losses._finite_logprobs(logq)
    p, q = jnp.exp(lp), jnp.exp(lq)
    kl = lambda w, a, b: jnp.sum(jnp.where(w > 0, w * (a - b), 0.0), axis=-1)  # sum w (a - b), 0 log 0 = 0
    if method == 'full_fkl':
        value = kl(q, lq, lp)
        return value, value
    if method == 'full_rkl':
        value = kl(p, lp, lq)
        return value, value
    lm = jnp.logaddexp(jnp.log(beta) + lq, jnp.log1p(-beta) + lp)
    student_term = kl(p, lp, lm)
    return beta * kl(q, lq, lm) + (1.0 - beta) * student_term, student_term


def _divergence_grad(divergence: tuple[str, float], logp: jax.Array, logq: jax.Array, aux: jax.Array) -> jax.Array:
    """d divergence / d student logits, [c, V]. With g_j = dD/dp_j, the softmax gives p_j (g_j - sum_i p_i g_i):
    forward KL p - q; reverse KL p (log p - log q - KL(p || q)); generalised JSD (g = (1 - beta) log(p / m))
    (1 - beta) p (log p - log m - KL(p || m)). `aux` [c] is the KL the forward pass saved."""
    method, beta = divergence
    lp, lq = losses._finite_logprobs(logp), losses._finite_logprobs(logq)
    p = jnp.exp(lp)
    if method == 'full_fkl':
        return p - jnp.exp(lq)
    if method == 'full_rkl':
        return p * (lp - lq - aux[:, None])
    lm = jnp.logaddexp(jnp.log(beta) + lq, jnp.log1p(-beta) + lp)
    return (1.0 - beta) * p * (lp - lm - aux[:, None])


def _teacher_logprobs(teacher, j, vocab_size):
    """Chunk j of the teacher's log-probs [c, V], recomputed from its hidden states, head and log-normaliser."""
    hidden_view, head, log_normalizer_view = teacher
    return _logits(_chunk(hidden_view, j), head, vocab_size) - _chunk(log_normalizer_view, j)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _student_chunks(vocab_size, divergence, hidden_view, head, token_view, ids_view, teacher):
    """Chunk views [B, c, nc, H], [B, c, nc], [B, c, nc, k] -> (s [B, c, nc], top-k log-probs [B, c, nc, k],
    entropy [B, c, nc]), all float32, and with `divergence` = (method, jsd_beta) the per-token full-vocabulary
    divergence [B, c, nc] against `teacher` = (hidden view [B, c, nc, H_T], head [H_T, V], log-normaliser view
    [B, c, nc]) (None without)."""
    return _student_chunks_fwd(vocab_size, divergence, hidden_view, head, token_view, ids_view, teacher)[0]


def _student_chunks_fwd(vocab_size, divergence, hidden_view, head, token_view, ids_view, teacher):
    # Pass 1: each chunk's log-normaliser (and the values); the backward pass reuses it rather than recomputing it.

    def body(j, out):
        logprobs, log_sum_exp = _log_softmax(_logits(_chunk(hidden_view, j), head, vocab_size))
        values = (
            _gather(logprobs, _chunk(token_view, j)),
            _gather(logprobs, _chunk(ids_view, j)),
            _entropy(logprobs),
            log_sum_exp,
        )
        if divergence is not None:
            values += _divergence(divergence, logprobs, _teacher_logprobs(teacher, j, vocab_size))
        return tuple(_set_chunk(buf, j, v) for buf, v in zip(out, values))

    shape = token_view.shape
    shapes = (shape, ids_view.shape, shape, shape) + ((shape, shape) if divergence is not None else ())
    out = lax.fori_loop(0, shape[2], body, tuple(jnp.zeros(s, jnp.float32) for s in shapes))
    logprobs, topk_logprobs, entropy, log_sum_exp = out[:4]
    primal = (logprobs, topk_logprobs, entropy) + out[4:5]
    aux = out[5] if divergence is not None else None
    return primal, (hidden_view, head, token_view, ids_view, teacher, log_sum_exp, aux)


def _student_chunks_bwd(vocab_size, divergence, residuals, cotangents):
    """Pass 2: recomputes each chunk's logits and softmax p from the saved log-normaliser; d logp_i / d z = onehot_i -
    p, so dz = scatter(cotangents at their ids) - p * (sum of the chunk's cotangents), plus the divergence's
    cotangent times `_divergence_grad`. The entropy has no gradient, nor has the teacher. The LM-head gradient is
    accumulated in float32 over chunks."""
    hidden_view, head, token_view, ids_view, teacher, log_sum_exp, aux = residuals
    ct_logprobs, ct_topk = cotangents[:2]

    def body(j, carry):
        d_hidden, d_head = carry
        hidden = _chunk(hidden_view, j)
        tokens, ids = _chunk(token_view, j), _chunk(ids_view, j)
        ct_s, ct_k = _chunk(ct_logprobs, j), _chunk(ct_topk, j)
        logprobs = _logits(hidden, head, vocab_size) - _chunk(log_sum_exp, j)[:, None]
        p = jnp.exp(logprobs)
        rows = jnp.arange(tokens.shape[0])
        d_logits = -p * (ct_s + jnp.sum(ct_k, axis=-1))[:, None]
        d_logits = d_logits.at[rows, tokens].add(ct_s).at[rows[:, None], ids].add(ct_k)
        if divergence is not None:
            logq = _teacher_logprobs(teacher, j, vocab_size)
            grad = _divergence_grad(divergence, logprobs, logq, _chunk(aux, j))
            d_logits = d_logits + _chunk(cotangents[3], j)[:, None] * grad
        d_logits = sharding.constrain(d_logits.astype(head.dtype), LOGITS_AXES)
        d_chunk = jnp.dot(d_logits, head.T, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.dot(hidden.T, d_logits, preferred_element_type=jnp.float32)
        return _set_chunk(d_hidden, j, d_chunk), sharding.constrain(d_head, (None, 'loss_vocab'))

    init = (jnp.zeros_like(hidden_view), jnp.zeros(head.shape, jnp.float32))
    d_hidden, d_head = lax.fori_loop(0, hidden_view.shape[2], body, init)
    no_teacher_grad = None if teacher is None else jax.tree.map(jnp.zeros_like, teacher)
    return d_hidden, d_head.astype(head.dtype), None, None, no_teacher_grad


_student_chunks.defvjp(_student_chunks_fwd, _student_chunks_bwd)


def student_stats(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    tokens: jax.Array,
    targets: TeacherTargets,
    *,
    vocab_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    divergence: str | None = None,
    jsd_beta: float = losses.DEFAULT_HYPERPARAMETERS['jsd_beta'],
) -> losses.TokenStats:
    """`losses.TokenStats` from student hidden states and LM head plus the teacher's targets, chunked.

    Equal to `losses.token_statistics(hidden @ head, teacher_logits, tokens, k, divergence, jsd_beta)` on the shared
    vocabulary, without ever holding more than one chunk of logits, in the forward or the backward pass (the
    backward recomputes them). With `divergence` (one of `losses.FULL_VOCABULARY_METHODS`) each chunk's teacher
    logits are recomputed too, from `targets.hidden` and `targets.lm_head` (`teacher_pass(..., full_vocabulary=True)`),
    and normalised by the teacher pass's log-normaliser: the divergence is exact over the whole vocabulary.

    Args:
      student_hidden: [B, T, H] final hidden states (`Decoder(..., return_hidden=True)`); gets a gradient.
      student_lm_head: [H, V_S] (`Decoder.lm_head_weight()`), cast to the hidden dtype as the decoder does; gets a
        gradient (accumulated over chunks in float32).
      tokens: [B, T] int, the realised tokens.
      targets: `TeacherTargets` of `teacher_pass` on the same tokens; k = `targets.topk_ids.shape[-1]`.
      vocab_size: the shared real vocabulary.
      chunk_size: tokens per chunk (over the whole mesh).
      divergence: a `losses.FULL_VOCABULARY_METHODS` method whose divergence to compute, or None.
      jsd_beta: the generalised JSD's interpolation (`jsd`).
    Returns:
      `TokenStats`; `student_logprobs`, `student_topk_logprobs` and `full_divergence` (None without `divergence`)
      carry gradient, `student_entropy` does not.
    """
    _check_inputs(student_hidden, student_lm_head, tokens, vocab_size, 'student')
    batch, length = tokens.shape
    k = targets.topk_ids.shape[-1]
    for name, x, shape in (
        ('teacher_logprobs', targets.teacher_logprobs, (batch, length)),
        ('topk_ids', targets.topk_ids, (batch, length, k)),
        ('topk_logprobs', targets.topk_logprobs, (batch, length, k)),
        ('teacher_entropy', targets.teacher_entropy, (batch, length)),
    ):
        if x.shape != shape:
            raise ValueError(f'targets.{name} must be {shape} to match tokens, got shape {x.shape}')
    num_chunks, chunk_length = _chunk_layout(batch, length, chunk_size)
    views = [
        _to_chunks(x, num_chunks, chunk_length)
        for x in (student_hidden, tokens.astype(jnp.int32), lax.stop_gradient(targets.topk_ids).astype(jnp.int32))
    ]
    head = student_lm_head.astype(student_hidden.dtype)
    teacher = None
    if divergence is not None:
        if divergence not in losses.FULL_VOCABULARY_METHODS:
            raise ValueError(f'divergence={divergence!r} must be one of {losses.FULL_VOCABULARY_METHODS} or None')
        if targets.hidden is None or targets.lm_head is None or targets.log_normalizer is None:
            raise ValueError(
                f'divergence {divergence!r} needs the teacher hidden states, LM head and log-normaliser in targets: '
                'use teacher_pass(..., full_vocabulary=True)'
            )
        _check_inputs(targets.hidden, targets.lm_head, tokens, vocab_size, 'teacher')
        # The teacher's head cut or zero-padded to the student's width (both >= vocab_size; columns beyond it are
        # masked), so the chunks' logits line up column by column; the student's head keeps its layout.
        teacher_head = lax.stop_gradient(targets.lm_head).astype(targets.hidden.dtype)[:, : head.shape[1]]
        teacher_head = _split_head(jnp.pad(teacher_head, ((0, 0), (0, head.shape[1] - teacher_head.shape[1]))))
        teacher = (
            _to_chunks(lax.stop_gradient(targets.hidden), num_chunks, chunk_length),
            teacher_head,
            _to_chunks(lax.stop_gradient(targets.log_normalizer).astype(jnp.float32), num_chunks, chunk_length),
        )
        divergence = (divergence, float(jsd_beta))
    out = _student_chunks(vocab_size, divergence, views[0], _split_head(head), views[1], views[2], teacher)
    logprobs, topk_logprobs, entropy = out[:3]
    return losses.TokenStats(
        student_logprobs=_from_chunks(logprobs, length),
        teacher_logprobs=lax.stop_gradient(targets.teacher_logprobs).astype(jnp.float32),
        student_topk_logprobs=_from_chunks(topk_logprobs, length),
        teacher_topk_logprobs=lax.stop_gradient(targets.topk_logprobs).astype(jnp.float32),
        student_entropy=lax.stop_gradient(_from_chunks(entropy, length)),
        teacher_entropy=lax.stop_gradient(targets.teacher_entropy).astype(jnp.float32),
        full_divergence=_from_chunks(out[3], length) if teacher is not None else None,
    )


def fused_distillation_loss(
    method: str,
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    targets: TeacherTargets,
    tokens: jax.Array,
    response_mask: jax.Array,
    prefix_mask: jax.Array,
    key: jax.Array | None,
    *,
    vocab_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **options,
) -> tuple[jax.Array, losses.MetricPairs]:
    """`losses.distillation_loss` of `method` from student hidden states, its LM head and the teacher's targets.

    Args:
      method: one of `losses.METHODS`.
      student_hidden: [B, T, H] final student hidden states; student_lm_head: [H, V_S]. Both get gradients.
      targets: `teacher_pass(...)` output with k >= `losses.topk_size(method, hyperparameters)`.
      tokens, response_mask, prefix_mask, key, **options (`rollout_logprobs`, `use_importance_ratio`, `progress`,
        `draw_ids`, `segment_ids` and the hyperparameters): as `losses.distillation_loss`.
      vocab_size: the shared real vocabulary.
      chunk_size: tokens per chunk (over the whole mesh).
    Returns:
      (scalar float32 loss, {name: (sum, count)} float32 scalar metrics), equal to the reference on full logits. The
      methods of `losses.FULL_VOCABULARY_METHODS` need `teacher_pass(..., full_vocabulary=True)` targets.
    """
    needed = losses.topk_size(method, losses.hyperparameters_of(options))
    have = targets.topk_ids.shape[-1]
    if have < needed:
        raise ValueError(f'method {method!r} needs {needed} teacher top-k entries, targets hold k={have}')
    # Only the k entries the method reads are gathered from the student.
    targets = targets._replace(
        topk_ids=targets.topk_ids[..., :needed], topk_logprobs=targets.topk_logprobs[..., :needed]
    )
    hp = losses.resolve_hyperparameters(method, losses.hyperparameters_of(options))
    stats = student_stats(
        student_hidden,
        student_lm_head,
        tokens,
        targets,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        divergence=method if method in losses.FULL_VOCABULARY_METHODS else None,
        jsd_beta=hp['jsd_beta'],
    )
    return losses.loss_from_stats(method, stats, response_mask, prefix_mask, key, **options)
