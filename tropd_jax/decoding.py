"""The decode shared by both of `generate`'s paths: the sampling distribution, the KV cache's segments, the static
decode loop (`decode`) and the `Rollout` it returns. Continuous batching is `tropd_jax.continuous`.

Speed (docs/benchmarks.md): attention over the whole preallocated cache dominates a naive decode step, so the
decode runs in segments: segment j attends only to the first P + end_j slots (the filled part), and the cache grows
between segments. The cache holds one buffer per layer, so no layer is copied out of a stacked buffer per step.
Sampling is inverse-CDF with one uniform per row and step, all drawn before the loop (no PRNG inside it), and
reductions avoid `argmax` / `cumsum`, which XLA CPU runs an order of magnitude slower than plain sums / matmuls.

Log-probabilities: `logprobs` are under the distribution actually sampled from (temperature, top-k and top-p
applied), so a forced token outside the top-k / top-p cut gets -inf; `model_logprobs` are under the plain model
softmax at temperature 1. With temperature 1 and no cut (the training setting) the two are equal. Greedy decoding
(temperature 0) samples from a point mass, so its `logprobs` are reported as the temperature-1 ones.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import sharding
from tropd_jax.models.decoder import KVCache, forward, init_cache

FINISH_EOS = 0  # the row emitted one of the EOS ids (counted in its length)
FINISH_LENGTH = 1  # the row reached its token budget


@flax.struct.dataclass
class Rollout:
    """A batch of sampled sequences; every array is `[B, P + N]` unless stated.

    tokens: int32 prompt (left-padded) then response (right-padded with `pad_id`).
    input_mask: int32, 1 on real prompt and response tokens.
    response_mask: int32, 1 on response tokens (teacher prefix and continuation, EOS included).
    prefix_mask: int32, 1 on forced (teacher-written) response tokens; a subset of `response_mask`.
    logprobs: float32 log-prob of each response token under the distribution sampled from (0 elsewhere).
    model_logprobs: float32 log-prob of each response token under the temperature-1 model softmax (0 elsewhere).
    lengths: [B] int32 response lengths (prefix included).
    finish_reason: [B] int32, FINISH_EOS or FINISH_LENGTH.
    prompt_length: P (static).
    """

    tokens: jax.Array
    input_mask: jax.Array
    response_mask: jax.Array
    prefix_mask: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    prompt_length: int = flax.struct.field(pytree_node=False)

    @property
    def responses(self) -> jax.Array:
        """[B, N] the response columns of `tokens`."""
        return self.tokens[:, self.prompt_length :]


# ---------------------------------------------------------------------------------------------------------------------
# The sampling distribution.


def sampling_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """The logits of the distribution sampled from: [B, V] -> [B, V] float32, -inf outside the cut.

    As `transformers`: divide by the temperature, keep the top_k largest (0 = all), then keep the smallest set of
    most likely tokens whose probability reaches top_p (tokens tied with the last kept one are kept too).
    """
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        top = jax.lax.top_k(logits, top_k)[0]  # [B, k], sorted descending
        logits = jnp.where(logits >= top[:, -1:], logits, -jnp.inf)
    if top_p < 1.0:
        top = jax.lax.top_k(logits, top_k if 0 < top_k < vocab else vocab)[0]
        probs = jax.nn.softmax(top, axis=-1)
        mass_before = cumulative_sum(probs) - probs
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since top_p > 0
        cutoff = jnp.take_along_axis(top, num_kept - 1, axis=-1)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits


def cumulative_sum(x: jax.Array) -> jax.Array:
    """Cumulative sum along the last axis of [B, V] float32, as two triangular matmuls over a [B, V / b, b] blocking:
    V * b + (V / b)^2 multiply-adds per row, fewest near b = (2V)^(1/3) (b is that rounded up to a power of two, at
    least 32: 128 for a 151,936-token vocabulary, where b = sqrt(V) = 416 did 3x the work and took 2.3x as long on
    CPU). XLA CPU lowers `jnp.cumsum` to a reduce-window that costs O(V^2) and is an order of magnitude slower on
    small vocabularies."""
    rows, vocab = x.shape
    block = max(32, 1 << math.ceil(math.log2((2 * vocab) ** (1 / 3))))
    blocks = math.ceil(vocab / block)
    x = jnp.pad(x, ((0, 0), (0, blocks * block - vocab))).reshape(rows, blocks, block)
    upper = lambda n, k: jnp.triu(jnp.ones((n, n), x.dtype), k)
    within = jnp.einsum('rnk,kj->rnj', x, upper(block, 0), precision=jax.lax.Precision.HIGHEST)
    before = jnp.einsum('rn,nm->rm', within[:, :, -1], upper(blocks, 1), precision=jax.lax.Precision.HIGHEST)
    return (within + before[:, :, None]).reshape(rows, blocks * block)[:, :vocab]


def sample_and_total(log_weights: jax.Array, uniform: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse-CDF sampling: one token per row from log-weights [B, V] (normalised or not: at most ~0) given
    uniforms [B] in [0, 1), and each row's total weight sum(exp(log_weights)) [B].

    Exact up to float32 rounding of the cumulative sum (about 1e-7 of probability mass), like Gumbel-max with float32
    noise; it needs B random numbers instead of B * V.
    """
    cdf = cumulative_sum(jnp.exp(log_weights.astype(jnp.float32)))
    total = cdf[:, -1:]
    index = jnp.sum(cdf <= uniform[:, None] * total, axis=-1)
    # Rounding can put the target on the total mass; the first index where the cdf reaches the total is then the
    # right answer (a token of non-zero probability). Counting, unlike argmax, is a plain vectorised reduction.
    last = jnp.sum(cdf < total, axis=-1)
    return jnp.minimum(index, last).astype(jnp.int32), total[:, 0]


def greedy_token(logits: jax.Array) -> jax.Array:
    """argmax over [B, V] (the first of tied maxima) as two plain reductions, which XLA CPU runs much faster than
    the index-carrying reduction of `jnp.argmax`."""
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(logits.shape[-1]), logits.shape[-1]), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------------
# generate.


def _segment_ends(max_new_tokens: int, segment_length: int) -> list[int]:
    """The decode steps where segments end: [s, 2s, ..., N]."""
    return list(range(segment_length, max_new_tokens, segment_length)) + [max_new_tokens]


def _grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with `length` slots (new slots empty and invalid)."""
    extra = length - cache.valid.shape[1]

    def grow(buffers, axes):
        slots = axes.index('length')
        return tuple(jnp.pad(x, [(0, extra if a == slots else 0) for a in range(x.ndim)]) for x in buffers)

    axes = sharding.KV_CACHE_AXES
    return _constrain_cache(
        KVCache(
            k=grow(cache.k, axes['k']),
            v=grow(cache.v, axes['v']),
            valid=jnp.pad(cache.valid, ((0, 0), (0, extra))),
            index=cache.index,
        )
    )


def _constrain_cache(cache: KVCache) -> KVCache:
    constrain = lambda buffers, axes: tuple(sharding.constrain(x, axes) for x in buffers)
    axes = sharding.KV_CACHE_AXES
    return KVCache(
        k=constrain(cache.k, axes['k']),
        v=constrain(cache.v, axes['v']),
        valid=sharding.constrain(cache.valid, ('batch', 'length')),
        index=cache.index,
    )


def _choose_tokens(logits, uniform, forced_token, forced, temperature, *, greedy, top_k, top_p, vocab_size):
    """One response token per row: logits [B, V] (its distribution), uniform [B], forced_token [B], forced [B] bool
    (write forced_token instead of a sample). Returns (token [B] int32, logprob [B], model_logprob [B]) float32: the
    token's log-probs under the sampled distribution and under the temperature-1 model softmax."""
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        # Padding rows of the LM head beyond the real vocabulary are never sampled and carry no probability.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    # Only the chosen token's log-probs are kept, so neither distribution is normalised over the vocabulary: a
    # log-prob is its logit minus a logsumexp (fewer ops per step than two full log-softmaxes).
    model_lse = jax.nn.logsumexp(logits, axis=-1)
    if greedy:
        sampled, scaled, lse = greedy_token(logits), logits, model_lse
    else:
        scaled = sampling_logits(logits, temperature, top_k, top_p)
        shift = jnp.max(scaled, axis=-1, keepdims=True)
        sampled, total = sample_and_total(scaled - shift, uniform)
        lse = shift[:, 0] + jnp.log(total)
    token = jnp.where(forced, forced_token, sampled)
    token_logit = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    token_scaled = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    return token, token_scaled - lse, token_logit - model_lse


def positions(mask: jax.Array) -> jax.Array:
    """RoPE positions of left-padded rows: `max(cumsum(mask) - 1, 0)`, [B, S] int32 (padding takes position 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def _head(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    """float32 logits [B, V] of hidden [B, H] (compute-dtype inputs, float32 accumulation, as the learner's loss
    computes them): the sampler's log-probs enter the importance ratio, so they must not carry bf16 rounding."""
    return jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32)


class DecodeInputs(NamedTuple):
    """A decode's array inputs (`generate`'s, after its checks): split along the rows over the batch shards, but
    `temperature` and `eos_ids`."""

    prompt_tokens: jax.Array  # [R, P] left-padded
    prompt_mask: jax.Array  # [R, P]
    uniforms: jax.Array  # [R, N] the sampling randomness, drawn before the loop
    forced_tokens: jax.Array  # [R, N] written instead of samples at response positions t < forced_lengths
    forced_lengths: jax.Array  # [R]
    max_lengths: jax.Array  # [R] response token budgets
    temperature: jax.Array  # [] float32
    eos_ids: jax.Array  # [E] int32


class Records(NamedTuple):
    """What a decode records per rollout: its response tokens and their log-probs under the distribution sampled
    from and under the model ([R, N]), its response length and finish reason ([R])."""

    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array


class Prepared(NamedTuple):
    """The setup both decode paths share: the prompts' mask, RoPE positions and real-token counts (the position of
    each row's first response token), the budgets capped at N, the token choice with the sampling settings bound
    (`choose(logits [K, V], uniform [K], forced_token [K], forced [K]) -> (token, logprob, model_logprob)`), and
    empty records."""

    prompt_mask: jax.Array  # [R, P] int32
    prompt_positions: jax.Array  # [R, P]
    prompt_count: jax.Array  # [R]
    max_lengths: jax.Array  # [R]
    choose: Callable
    records: Records


def prepare(inputs: DecodeInputs, *, max_new_tokens, greedy, top_k, top_p, pad_id, vocab_size) -> Prepared:
    """`Prepared` of a decode's inputs."""
    prompt_mask = inputs.prompt_mask.astype(jnp.int32)
    rows = prompt_mask.shape[0]
    choose = functools.partial(
        _choose_tokens, temperature=inputs.temperature, greedy=greedy, top_k=top_k, top_p=top_p, vocab_size=vocab_size
    )
    records = Records(
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        model_logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        finish=jnp.full((rows,), FINISH_LENGTH, jnp.int32),
    )
    return Prepared(
        prompt_mask,
        positions(prompt_mask),
        jnp.sum(prompt_mask, axis=1),
        jnp.minimum(inputs.max_lengths, max_new_tokens),
        choose,
        Records(*map(sharding.constrain_rows, records)),
    )


class StaticCarry(NamedTuple):
    """The static decode's loop state: the next response step t, each row's last token and whether it was still
    running, the cache, which rows are done, and the records."""

    t: jax.Array
    token: jax.Array  # [B]
    active: jax.Array  # [B]
    cache: KVCache
    done: jax.Array  # [B]
    records: Records


def decode(
    graphdef,
    state,
    inputs: DecodeInputs,
    *,
    max_new_tokens,
    greedy,
    top_k,
    top_p,
    pad_id,
    segment_length,
    vocab_size,
    sync_axes=(),
):
    """Prefill and decode loop for the rows it is given (all rows, or one shard's under `shard_map`).

    `sync_axes`: manual mesh axes whose shards must run the same number of steps (their loop condition is reduced
    over them), needed when the automatic axes put collectives inside the loop.
    """
    batch, prompt_length = inputs.prompt_tokens.shape
    config = nnx.merge(graphdef, state).config
    prepared = prepare(
        inputs,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
        pad_id=pad_id,
        vocab_size=vocab_size,
    )
    max_lengths = prepared.max_lengths

    def emit(t, logits, done, records: Records):
        """Chooses response token t of every row from `logits` [B, V] (its distribution) and records it."""
        token, token_logprob, token_model_logprob = prepared.choose(
            logits, inputs.uniforms[:, t], inputs.forced_tokens[:, t], t < inputs.forced_lengths
        )
        active = ~done
        hit_eos = active & jnp.isin(token, inputs.eos_ids)
        hit_length = active & ~hit_eos & (t + 1 >= max_lengths)
        records = Records(
            tokens=records.tokens.at[:, t].set(jnp.where(active, token, pad_id)),
            logprobs=records.logprobs.at[:, t].set(jnp.where(active, token_logprob, 0.0)),
            model_logprobs=records.model_logprobs.at[:, t].set(jnp.where(active, token_model_logprob, 0.0)),
            lengths=records.lengths + active,
            finish=jnp.where(hit_eos, FINISH_EOS, jnp.where(hit_length, FINISH_LENGTH, records.finish)),
        )
        return token, active, done | hit_eos | hit_length, records

    # Per-layer cache buffers: attention reads a layer's buffer directly, where a stacked [L, ...] buffer would copy
    # the layer out at every step. The first segment's window holds the prompt and its own tokens.
    ends = _segment_ends(max_new_tokens, segment_length)
    cache = _constrain_cache(init_cache(config, batch, prompt_length + ends[0]))
    # Prefill: the prompt fills slots [0, P). Only the last column's logits are needed (left padding puts every
    # row's last prompt token there), so the LM head runs on one position instead of P. The LM head is formed once,
    # outside the loop: a tied head is the transposed embedding, which the loop would otherwise re-layout per step.
    hidden, cache = forward(
        graphdef, state, inputs.prompt_tokens, prepared.prompt_positions, prepared.prompt_mask, cache, True
    )
    lm_head = nnx.merge(graphdef, state).lm_head_weight().astype(hidden.dtype)
    done = sharding.constrain_rows(max_lengths <= 0)  # a row with no budget is done before it starts
    token, active, done, records = emit(0, _head(hidden[:, -1], lm_head), done, prepared.records)

    def step(carry: StaticCarry) -> StaticCarry:
        """Feeds response token t - 1 (at slot P + t - 1) and emits token t."""
        t = carry.t
        hidden, cache = forward(
            graphdef,
            state,
            carry.token[:, None],
            (prepared.prompt_count + t - 1)[:, None],
            carry.active[:, None],
            carry.cache,
            True,
        )
        token, active, done, records = emit(t, _head(hidden[:, 0], lm_head), carry.done, carry.records)
        return StaticCarry(t + 1, token, active, cache, done, records)

    def all_done(done):
        done = jnp.all(done)
        return jax.lax.pmin(done.astype(jnp.int32), sync_axes).astype(bool) if sync_axes else done

    carry = StaticCarry(jnp.int32(1), token, active, cache, done, records)
    for j, end in enumerate(ends):
        if j > 0:
            carry = carry._replace(cache=_grow_cache(carry.cache, prompt_length + end))
        # Segment j runs steps t < end; its last feed writes slot P + end - 2, inside its P + end slots.
        carry = jax.lax.while_loop(lambda c, end=end: (c.t < end) & ~all_done(c.done), step, carry)
    return assemble(inputs, carry.records)


def assemble(inputs: DecodeInputs, records: Records) -> Rollout:
    """The `Rollout` of the prompts [B, P] and the per-row response records [B, N], split along its rows."""
    prompt_tokens, prompt_mask, forced_lengths = inputs.prompt_tokens, inputs.prompt_mask, inputs.forced_lengths
    out_tokens, out_logprobs, out_model_logprobs, lengths, finish = records
    batch, prompt_length = prompt_tokens.shape
    columns = jnp.arange(out_tokens.shape[1])
    response_mask = (columns[None] < lengths[:, None]).astype(jnp.int32)
    prefix_mask = (columns[None] < jnp.minimum(forced_lengths, lengths)[:, None]).astype(jnp.int32)
    prompt_zeros = jnp.zeros((batch, prompt_length), jnp.int32)
    join = lambda prompt_part, response_part: jnp.concatenate([prompt_part, response_part], axis=1)
    rollout = Rollout(
        tokens=join(prompt_tokens.astype(jnp.int32), out_tokens),
        input_mask=join(prompt_mask.astype(jnp.int32), response_mask),
        response_mask=join(prompt_zeros, response_mask),
        prefix_mask=join(prompt_zeros, prefix_mask),
        logprobs=join(prompt_zeros.astype(jnp.float32), out_logprobs),
        model_logprobs=join(prompt_zeros.astype(jnp.float32), out_model_logprobs),
        lengths=lengths,
        finish_reason=finish,
        prompt_length=prompt_length,
    )
    return jax.tree.map(sharding.constrain_rows, rollout)
