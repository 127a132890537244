"""Rollouts: jitted sampling with a KV cache, and responses whose first tokens are written by the teacher.

`generate(model, prompt_tokens, prompt_mask, key, ...)` samples responses from one model in one compiled program:
a prefill of the left-padded prompts, then a `lax.while_loop` decode that stops as soon as every row has finished.
Per row, the first `forced_lengths[b]` response tokens can be forced (prefix injection) instead of sampled.
`rollout(teacher, student, ...)` uses it twice: the teacher writes the prefixes, the student continues them.

Layout (docs/architecture.md, "Sequences"): prompts are left-padded to a bucket length P, the response starts at
column P and is right-padded to N = max_new_tokens. Every array of a `Rollout` is `[B, P + N]` unless stated.

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
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import sharding
from tropd_jax.models.decoder import KVCache, forward, init_cache
from tropd_jax.placement import Placement

# Prompt lengths are padded up to one of these, so a stream of prompts compiles a handful of programs.
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

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
# Prompt bucketing.


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The smallest bucket >= n."""
    for bucket in sorted(buckets):
        if bucket >= n:
            return bucket
    raise ValueError(f'Length {n} exceeds the largest bucket {max(buckets)}; add a larger bucket.')


def eos_ids(tokenizer, model_config) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the checkpoint's (a checkpoint may list several)."""
    ids = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))


def pad_prompts(
    prompts: Sequence[Sequence[int]], buckets: Sequence[int] = PROMPT_BUCKETS, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into the smallest bucket that fits the longest: (tokens [B, P] int32, mask [B, P]
    int32)."""
    if not prompts:
        raise ValueError('pad_prompts got no prompts.')
    length = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return tokens, mask


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


def _decode(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    uniforms,
    forced_tokens,
    forced_lengths,
    max_lengths,
    temperature,
    eos_ids,
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
    batch, prompt_length = prompt_tokens.shape
    config = nnx.merge(graphdef, state).config

    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_positions = positions(prompt_mask)
    prompt_count = jnp.sum(prompt_mask, axis=1)  # position of the first response token
    max_lengths = jnp.minimum(max_lengths, max_new_tokens)

    choose = functools.partial(
        _choose_tokens, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p, vocab_size=vocab_size
    )

    def emit(t, logits, state):
        """Chooses response token t of every row from `logits` [B, V] (its distribution) and records it."""
        out_tokens, out_logprobs, out_model_logprobs, done, lengths, finish = state
        token, token_logprob, token_model_logprob = choose(
            logits, uniforms[:, t], forced_tokens[:, t], t < forced_lengths
        )
        active = ~done
        out_tokens = out_tokens.at[:, t].set(jnp.where(active, token, pad_id))
        out_logprobs = out_logprobs.at[:, t].set(jnp.where(active, token_logprob, 0.0))
        out_model_logprobs = out_model_logprobs.at[:, t].set(jnp.where(active, token_model_logprob, 0.0))
        lengths = lengths + active
        hit_eos = active & jnp.isin(token, eos_ids)
        hit_length = active & ~hit_eos & (t + 1 >= max_lengths)
        finish = jnp.where(hit_eos, FINISH_EOS, jnp.where(hit_length, FINISH_LENGTH, finish))
        done = done | hit_eos | hit_length
        return token, active, (out_tokens, out_logprobs, out_model_logprobs, done, lengths, finish)

    # Per-layer cache buffers: attention reads a layer's buffer directly, where a stacked [L, ...] buffer would copy
    # the layer out at every step. The first segment's window holds the prompt and its own tokens.
    ends = _segment_ends(max_new_tokens, segment_length)
    cache = _constrain_cache(init_cache(config, batch, prompt_length + ends[0]))
    # Prefill: the prompt fills slots [0, P). Only the last column's logits are needed (left padding puts every
    # row's last prompt token there), so the LM head runs on one position instead of P. The LM head is formed once,
    # outside the loop: a tied head is the transposed embedding, which the loop would otherwise re-layout per step.
    hidden, cache = forward(graphdef, state, prompt_tokens, prompt_positions, prompt_mask, cache, True)
    lm_head = nnx.merge(graphdef, state).lm_head_weight().astype(hidden.dtype)
    logits = _head(hidden[:, -1], lm_head)

    records = (
        sharding.constrain_rows(jnp.full((batch, max_new_tokens), pad_id, jnp.int32)),
        sharding.constrain_rows(jnp.zeros((batch, max_new_tokens), jnp.float32)),
        sharding.constrain_rows(jnp.zeros((batch, max_new_tokens), jnp.float32)),
        sharding.constrain_rows(max_lengths <= 0),  # a row with no budget is done before it starts
        sharding.constrain_rows(jnp.zeros((batch,), jnp.int32)),
        sharding.constrain_rows(jnp.full((batch,), FINISH_LENGTH, jnp.int32)),
    )
    token, active, records = emit(0, logits, records)

    def step(carry):
        """Feeds response token t - 1 (at slot P + t - 1) and emits token t."""
        t, token, active, cache, records = carry
        hidden, cache = forward(
            graphdef, state, token[:, None], (prompt_count + t - 1)[:, None], active[:, None], cache, True
        )
        token, active, records = emit(t, _head(hidden[:, 0], lm_head), records)
        return t + 1, token, active, cache, records

    def all_done(done):
        done = jnp.all(done)
        return jax.lax.pmin(done.astype(jnp.int32), sync_axes).astype(bool) if sync_axes else done

    t = jnp.int32(1)
    for j, end in enumerate(ends):
        if j > 0:
            cache = _grow_cache(cache, prompt_length + end)
        # Segment j runs steps t < end; its last feed writes slot P + end - 2, inside its P + end slots.
        t, token, active, cache, records = jax.lax.while_loop(
            lambda c, end=end: (c[0] < end) & ~all_done(c[4][3]), step, (t, token, active, cache, records)
        )

    out_tokens, out_logprobs, out_model_logprobs, _, lengths, finish = records
    return jax.tree.map(
        sharding.constrain_rows,
        _assemble(
            prompt_tokens, prompt_mask, out_tokens, out_logprobs, out_model_logprobs, lengths, finish, forced_lengths
        ),
    )


def _assemble(
    prompt_tokens, prompt_mask, out_tokens, out_logprobs, out_model_logprobs, lengths, finish, forced_lengths
) -> Rollout:
    """The `Rollout` of prompts [B, P] and per-row response records [B, N] (lengths, finish, forced_lengths: [B])."""
    batch, prompt_length = prompt_tokens.shape
    columns = jnp.arange(out_tokens.shape[1])
    response_mask = (columns[None] < lengths[:, None]).astype(jnp.int32)
    prefix_mask = (columns[None] < jnp.minimum(forced_lengths, lengths)[:, None]).astype(jnp.int32)
    prompt_zeros = jnp.zeros((batch, prompt_length), jnp.int32)
    join = lambda prompt_part, response_part: jnp.concatenate([prompt_part, response_part], axis=1)
    return Rollout(
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


def _decode_continuous(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    uniforms,
    forced_tokens,
    forced_lengths,
    max_lengths,
    temperature,
    eos_ids,
    *,
    decode_slots,
    max_new_tokens,
    greedy,
    top_k,
    top_p,
    pad_id,
    vocab_size,
    refill_group_size=0,
    segment_length=None,
    sync_axes=(),
):
    """`_decode` with continuous batching: R rollouts through `decode_slots` = S < R decode slots.

    The first S rollouts are prefilled together; every step feeds each busy slot's last token and emits its next one.
    A slot whose rollout stops (EOS or budget) takes the next pending rollout: once `refill_group_size` slots are
    empty (default S / 8; fewer at the end), the next pending prompts are prefilled together, written over those
    slots' regions of the cache, and their first tokens emitted in the same step (a prefill per rollout would cost
    more than a decode step of all S slots on CPU). Each slot is at its own response step, but every step writes all
    slots' new keys and values at one shared column of the response region, going round its N columns as a ring (a
    rollout writes at most N - 1 of them, so it never overwrites its own); a refilled slot's old response columns are
    marked invalid, and each step attends to the valid slots of the whole P + N window (no growing segments:
    `segment_length` is unused). The shared column keeps the cache update in place on TPU, where a scatter to a
    column per row copied the whole cache in and out at every step. Rollout r draws `uniforms[r, t]` for its token
    t, as `_decode` does, so its tokens do not depend on which slot it ran in or when. Rollouts with no budget are
    never prefilled.
    """
    del segment_length
    rows, prompt_length = prompt_tokens.shape
    slots = min(decode_slots, rows)
    model = nnx.merge(graphdef, state)
    config = model.config

    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_positions = positions(prompt_mask)
    prompt_count = jnp.sum(prompt_mask, axis=1)
    max_lengths = jnp.minimum(max_lengths, max_new_tokens)
    # Rollouts with a budget first (in order), those without last: `runnable` of them are ever decoded.
    order = jnp.argsort(max_lengths <= 0, stable=True).astype(jnp.int32)
    runnable = jnp.sum(max_lengths > 0)
    choose = functools.partial(
        _choose_tokens, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p, vocab_size=vocab_size
    )
    lm_head = model.lm_head_weight().astype(jnp.dtype(config.dtype))
    empty = jnp.int32(rows)  # the rollout id of an empty slot (out of range: its writes are dropped)
    group = min(refill_group_size or max(1, slots // 8), slots)

    def emit(slot_row, t, logits, records):
        """Token t [K] of the rollouts slot_row [K] (`empty` for none) from logits [K, V]; records it. Returns the
        tokens, slot_row with the slots whose rollout stopped emptied, and the records."""
        out_tokens, out_logprobs, out_model_logprobs, lengths, finish = records
        row = jnp.minimum(slot_row, rows - 1)
        token, logprob, model_logprob = choose(logits, uniforms[row, t], forced_tokens[row, t], t < forced_lengths[row])
        active = (slot_row < rows) & (t < max_lengths[row])
        target = jnp.where(active, slot_row, empty)
        out_tokens = out_tokens.at[target, t].set(token, mode='drop')
        out_logprobs = out_logprobs.at[target, t].set(logprob, mode='drop')
        out_model_logprobs = out_model_logprobs.at[target, t].set(model_logprob, mode='drop')
        lengths = lengths.at[target].add(1, mode='drop')
        hit_eos = active & jnp.isin(token, eos_ids)
        finish = finish.at[jnp.where(hit_eos, slot_row, empty)].set(FINISH_EOS, mode='drop')
        stopped = ~active | hit_eos | (t + 1 >= max_lengths[row])
        slot_row = jnp.where(stopped, empty, slot_row)
        return token, slot_row, (out_tokens, out_logprobs, out_model_logprobs, lengths, finish)

    records = (
        sharding.constrain_rows(jnp.full((rows, max_new_tokens), pad_id, jnp.int32)),
        sharding.constrain_rows(jnp.zeros((rows, max_new_tokens), jnp.float32)),
        sharding.constrain_rows(jnp.zeros((rows, max_new_tokens), jnp.float32)),
        sharding.constrain_rows(jnp.zeros((rows,), jnp.int32)),
        sharding.constrain_rows(jnp.full((rows,), FINISH_LENGTH, jnp.int32)),
    )
    # The first S rollouts: one batched prefill into slots [0, P) of every slot, then their first tokens.
    first = order[:slots]
    cache = _constrain_cache(init_cache(config, slots, prompt_length + max_new_tokens))
    hidden, cache = forward(
        graphdef, state, prompt_tokens[first], prompt_positions[first], prompt_mask[first], cache, True
    )
    slot_row = jnp.where(jnp.arange(slots) < runnable, first, empty)
    token, slot_row, records = emit(slot_row, jnp.zeros((slots,), jnp.int32), _head(hidden[:, -1], lm_head), records)
    slot_t = jnp.ones((slots,), jnp.int32)  # the next token each slot emits

    def can_refill(carry):
        """Whether a group can be refilled: `refill_group` empty slots (fewer once fewer rollouts are pending)."""
        left = runnable - carry[4]
        return (left > 0) & (jnp.sum(carry[0] >= rows) >= jnp.minimum(group, left))

    def refill_group(carry):
        """Puts the next pending rollouts (up to `group`) into empty slots: one prefill of their prompts, their cache
        regions written, their first tokens emitted."""
        slot_row, slot_t, token, cache, pending, records = carry
        free = slot_row >= rows
        count = jnp.minimum(jnp.minimum(group, jnp.sum(free)), runnable - pending)
        taken = jnp.arange(group) < count
        target = jnp.where(taken, jnp.argsort(~free, stable=True)[:group], slots)  # free slots first; `slots` = none
        row = order[jnp.minimum(pending + jnp.arange(group), rows - 1)]
        fresh = init_cache(config, group, prompt_length)
        hidden, fresh = forward(
            graphdef, state, prompt_tokens[row], prompt_positions[row], prompt_mask[row], fresh, True
        )
        # Slots [0, P) of a region take the new prompt; its response slots are marked invalid (the ring's later writes
        # mark their own).
        put_k = lambda big, new: big.at[target, :, :, :prompt_length].set(new.astype(big.dtype), mode='drop')
        put_v = lambda big, new: big.at[target, :, :prompt_length].set(new.astype(big.dtype), mode='drop')
        cache = cache.replace(
            k=tuple(map(put_k, cache.k, fresh.k)),
            v=tuple(map(put_v, cache.v, fresh.v)),
            valid=cache.valid.at[target].set(
                jnp.pad(prompt_mask[row].astype(bool), ((0, 0), (0, max_new_tokens))), mode='drop'
            ),
        )
        new_token, new_row, records = emit(
            jnp.where(taken, row, empty), jnp.zeros((group,), jnp.int32), _head(hidden[:, -1], lm_head), records
        )
        return (
            slot_row.at[target].set(new_row, mode='drop'),
            slot_t.at[target].set(1, mode='drop'),
            token.at[target].set(new_token, mode='drop'),
            cache,
            pending + count,
            records,
        )

    def refill(carry):
        if not sync_axes:
            return jax.lax.while_loop(can_refill, refill_group, carry)

        # Shards that must step together (collectives of the automatic axes inside the loop) also refill together: a
        # shard with nothing to refill runs the body and keeps its old carry.
        def synced_refill(carry):
            refilled = refill_group(carry)
            return jax.tree.map(lambda new, old: jnp.where(can_refill(carry), new, old), refilled, carry)

        any_refill = lambda c: jax.lax.pmax(can_refill(c).astype(jnp.int32), sync_axes).astype(bool)
        return jax.lax.while_loop(any_refill, synced_refill, carry)

    def step(carry):
        """Feeds each busy slot's last token (at its slot P + t - 1) and emits its token t; then refills."""
        slot_row, slot_t, token, cache, pending, records = carry
        busy = slot_row < rows
        row = jnp.minimum(slot_row, rows - 1)
        hidden, cache = forward(
            graphdef, state, token[:, None], (prompt_count[row] + slot_t - 1)[:, None], busy[:, None], cache, True
        )
        token, slot_row, records = emit(slot_row, slot_t, _head(hidden[:, 0], lm_head), records)
        slot_t = jnp.where(slot_row < rows, slot_t + 1, 1)  # an emptied slot's (masked) step stays within [0, N)
        cache = cache.replace(index=prompt_length + (cache.index - prompt_length) % max_new_tokens)  # the ring
        return refill((slot_row, slot_t, token, cache, pending, records))

    def busy(carry):
        done = jnp.all(carry[0] >= rows).astype(jnp.int32)
        return ~(jax.lax.pmin(done, sync_axes) if sync_axes else done).astype(bool)

    carry = refill((slot_row, slot_t, token, cache, jnp.minimum(runnable, slots), records))
    records = jax.lax.while_loop(busy, step, carry)[-1]
    out_tokens, out_logprobs, out_model_logprobs, lengths, finish = records
    return jax.tree.map(
        sharding.constrain_rows,
        _assemble(
            prompt_tokens, prompt_mask, out_tokens, out_logprobs, out_model_logprobs, lengths, finish, forced_lengths
        ),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        'graphdef',
        'max_new_tokens',
        'greedy',
        'top_k',
        'top_p',
        'pad_id',
        'segment_length',
        'vocab_size',
        'decode_slots',
    ),
)
def _generate(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    key,
    forced_tokens,
    forced_lengths,
    max_lengths,
    temperature,
    eos_ids,
    decode_slots=0,
    **settings,
):
    """The compiled program behind `generate`: one per shapes, model and static settings (the temperature and the
    EOS ids are inputs, so changing them does not recompile).

    Under a mesh, the decode runs in `shard_map` over the batch axes (`data`, and `fsdp` when the batch divides):
    each shard prefills, decodes and stops on its own, with no collective per step across shards (with `tensor` > 1
    the shards agree on when to stop: one scalar all-reduce per step). FSDP-sharded weights are gathered
    along `fsdp` once per call on entry (inference holds the weights split only along `tensor`, as rollout engines
    do); the `tensor` axis stays automatic. The sampling randomness is drawn for the whole batch first, so the tokens
    do not depend on the mesh.

    `decode_slots` > 0 and below the batch: continuous batching (`_decode_continuous`), each shard with its share of
    the slots (rounded up) over its own rows.
    """
    batch = prompt_tokens.shape[0]
    uniforms = sharding.constrain(jax.random.uniform(key, (batch, settings['max_new_tokens'])), ('batch', None))
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    axes, automatic = _decode_axes(batch, sizes)
    shards = math.prod(sizes[a] for a in axes)
    if 0 < decode_slots < batch:
        decode = functools.partial(_decode_continuous, graphdef, decode_slots=-(-decode_slots // shards), **settings)
    else:
        decode = functools.partial(_decode, graphdef, **settings)
    if axes:
        if automatic:
            # XLA CPU joins a collective-permute of the automatic (tensor) axis across every device, so shards that
            # stopped early would leave the others waiting: the shards then stop together.
            decode = functools.partial(decode, sync_axes=axes)
        rows, same = PartitionSpec(axes), PartitionSpec()
        decode = jax.shard_map(
            decode,
            in_specs=(same, rows, rows, rows, rows, rows, rows, same, same),
            out_specs=rows,
            axis_names=set(axes),
            check_vma=False,
        )
    return decode(
        state, prompt_tokens, prompt_mask, uniforms, forced_tokens, forced_lengths, max_lengths, temperature, eos_ids
    )


def _decode_axes(batch: int, sizes: dict) -> tuple[tuple[str, ...], list[str]]:
    """(manual, automatic) mesh axes of the decode of `batch` rows on a mesh of these axis sizes. Manual: data, plus
    fsdp when the batch divides over both (XLA's partitioner also needs the automatic remainder to be a single axis:
    a partial-manual region over `data` with `fsdp` and `tensor` left automatic fails to compile)."""
    axes = tuple(a for a in ('data', 'fsdp') if sizes.get(a, 1) > 1)
    while axes and batch % math.prod(sizes[a] for a in axes):
        axes = axes[:-1]
    automatic = [a for a, n in sizes.items() if n > 1 and a not in axes]
    if len(automatic) > 1:
        axes = ()  # all automatic
    return axes, automatic


def decode_cache_bytes(config, mesh, *, rows: int, prompt_length: int, max_new_tokens: int, decode_slots: int = 0):
    """Bytes of KV cache (`k` and `v`) one device holds at the end of `generate`'s decode of `rows` rows on `mesh`,
    from the cache the decode allocates (`init_cache`, P + N slots): its batch shard's rows (its share of the
    `decode_slots` with continuous batching), the KV heads split along `tensor` when they divide."""
    sizes = dict(mesh.shape)
    axes, _ = _decode_axes(rows, sizes)
    shards = math.prod(sizes[a] for a in axes)
    continuous = 0 < decode_slots < rows
    per_shard = -(-decode_slots // shards) if continuous else rows // shards
    cache = jax.eval_shape(lambda: init_cache(config, per_shard, prompt_length + max_new_tokens))
    tensor = sizes.get('tensor', 1)
    split = tensor if config.num_kv_heads % tensor == 0 else 1
    return sum(x.size * x.dtype.itemsize for x in (*cache.k, *cache.v)) // split


def lower_generate(
    graphdef,
    state,
    mesh,
    *,
    rows: int,
    prompt_length: int,
    max_new_tokens: int,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
):
    """`generate`'s program for `rows` prompts of `prompt_length` tokens on `mesh` (sampled, not greedy), lowered
    from abstract inputs replicated there as `rollout` places them; `state` may be abstract
    (`jax.ShapeDtypeStruct`s with shardings). Returns the `jax.stages.Lowered` (`tropd_jax.aot` compiles it)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    segment_length = min(segment_length or default_segment_length(max_new_tokens), max_new_tokens)
    with jax.set_mesh(mesh):
        return _generate.lower(
            graphdef,
            state,
            spec((rows, prompt_length), jnp.int32),  # prompt tokens
            spec((rows, prompt_length), jnp.int32),  # prompt mask
            key,
            spec((rows, max_new_tokens), jnp.int32),  # forced tokens
            spec((rows,), jnp.int32),  # forced lengths
            spec((rows,), jnp.int32),  # max lengths
            spec((), jnp.float32),  # temperature
            spec((1,), jnp.int32),  # EOS ids
            max_new_tokens=max_new_tokens,
            greedy=False,
            top_k=int(top_k),
            top_p=float(top_p),
            pad_id=int(pad_id),
            segment_length=int(segment_length),
            vocab_size=None if vocab_size is None else int(vocab_size),
            decode_slots=int(decode_slots) if decode_slots < rows else 0,
        )


def default_segment_length(max_new_tokens: int) -> int:
    """About eight decode segments, each a multiple of 16 steps (generations of up to 16 tokens use one).

    More segments attend to less empty cache (segment j's window is P + its end), but each traces the decoder step
    once more, so compile time grows with their number; eight keep the mean window within N / 16 of the filled
    length.
    """
    return 16 * max(1, math.ceil(max_new_tokens / 8 / 16))


def generate(
    model: nnx.Module,
    prompt_tokens,
    prompt_mask,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    forced_tokens=None,
    forced_lengths=None,
    max_lengths=None,
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
) -> Rollout:
    """Samples up to `max_new_tokens` response tokens per row in one compiled program.

    Args:
      model: a `Decoder`, its parameters placed by `tropd_jax.sharding`. Under `jax.set_mesh(mesh)` the batch is
        split along the mesh's `batch` axes and each `data` shard decodes on its own (see `_generate`).
      prompt_tokens: [B, P] int, left-padded (see `pad_prompts`).
      prompt_mask: [B, P], 1 on real prompt tokens.
      key: PRNG key; the same key gives the same tokens, on any mesh.
      max_new_tokens: N, the response columns.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass in (0, 1].
      eos_ids: tokens that end a row (the EOS is part of the response).
      forced_tokens: [B, N_f] int, tokens written instead of samples at response positions t < forced_lengths[b];
        their log-probs are this model's log-probs of the forced token. An EOS among them ends the row.
      forced_lengths: [B] int, how many forced tokens each row takes (capped at N_f); default 0.
      max_lengths: [B] int, per-row budget of response tokens (capped at N); default N. Rows that reach it stop
        with FINISH_LENGTH, and the loop ends once every row has stopped.
      pad_id: the token written after a row has finished.
      segment_length: decode steps per attention window (see the module docstring); default
        `default_segment_length(N)`.
      vocab_size: the real vocabulary; logits of the LM head's padding rows beyond it are masked out (None = all).
      decode_slots: 0 (or >= B) decodes the B rows as one static batch until its longest row stops. S in [1, B):
        continuous batching through S decode slots (split over the batch shards): a row that stops hands its slot
        (and its KV cache region of P + N slots) to the next pending row, whose prompt is prefilled there. Each
        row's tokens and log-probs are those of the static batch with the same key; the cache holds S rows instead
        of B, and rows that stop early no longer hold their compute until the longest one stops.

    Returns:
      A `Rollout` with P + N columns.
    """
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f'prompt_tokens must be [B, P] and prompt_mask the same shape; got {prompt_tokens.shape} and '
            f'{prompt_mask.shape}.'
        )
    batch = prompt_tokens.shape[0]
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f'temperature must be finite and >= 0, got {temperature}.')
    if top_k < 0:
        raise ValueError(f'top_k must be >= 0 (0 = no top-k cut), got {top_k}.')
    if not 0 < top_p <= 1:
        raise ValueError(f'top_p must be in (0, 1], got {top_p}.')
    segment_length = segment_length or default_segment_length(max_new_tokens)
    if segment_length < 1:
        raise ValueError(f'segment_length must be >= 1, got {segment_length}.')
    if decode_slots < 0:
        raise ValueError(f'decode_slots must be >= 0 (0 = one static batch), got {decode_slots}.')
    segment_length = min(segment_length, max_new_tokens)
    if forced_tokens is None:
        if forced_lengths is not None:
            raise ValueError('forced_lengths was given without forced_tokens.')
        forced_tokens = jnp.zeros((batch, 0), jnp.int32)
    forced_tokens = jnp.asarray(forced_tokens, jnp.int32)
    if forced_tokens.ndim != 2 or forced_tokens.shape[0] != batch:
        raise ValueError(f'forced_tokens must be [B={batch}, N_f], got shape {forced_tokens.shape}.')
    num_forced = forced_tokens.shape[1]
    forced_lengths = (
        jnp.zeros((batch,), jnp.int32)
        if forced_lengths is None
        else jnp.minimum(jnp.asarray(forced_lengths, jnp.int32), num_forced)
    )
    # Always [B, N], so that generating with and without a prefix is the same program.
    forced_tokens = jnp.pad(forced_tokens[:, :max_new_tokens], ((0, 0), (0, max(0, max_new_tokens - num_forced))))
    if max_lengths is None:
        max_lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    for name, value in (('forced_lengths', forced_lengths), ('max_lengths', max_lengths)):
        if value.shape != (batch,):
            raise ValueError(f'{name} must be [B={batch}], got shape {value.shape}.')
    # -1 never matches a token, so "no EOS" is the same program as one EOS id.
    eos_ids = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)

    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_tokens,
        prompt_mask,
        key,
        forced_tokens,
        forced_lengths,
        max_lengths,
        jnp.float32(temperature if temperature > 0 else 1.0),
        eos_ids,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        top_k=int(top_k),
        top_p=float(top_p),
        pad_id=int(pad_id),
        segment_length=int(segment_length),
        vocab_size=None if vocab_size is None else int(vocab_size),
        decode_slots=int(decode_slots) if decode_slots < batch else 0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# rollout: teacher prefix, student continuation.


def rollout(
    teacher: nnx.Module,
    student: nnx.Module,
    prompt_tokens,
    prompt_mask,
    prefix_lengths,
    key: jax.Array,
    *,
    max_new_tokens: int,
    num_rollouts: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
    teacher_prompt_tokens=None,
    teacher_prompt_mask=None,
    placement: Placement | None = None,
) -> Rollout:
    """Responses whose first `prefix_lengths[b]` tokens are sampled from the teacher and the rest from the student.

    The teacher runs only until every row has its prefix (and not at all when every prefix length is 0: plain
    on-policy sampling); a teacher EOS inside the prefix ends the response there. The student then re-reads the
    prefix as forced tokens and continues. `prefix_mask` marks the teacher-written tokens; `logprobs` and
    `model_logprobs` are the student's for every response token, prefix included (the student is the sampling
    policy that scoring compares against).

    Args:
      teacher, student: `Decoder`s sharing the tokenizer.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts.
      prefix_lengths: [B] or [B * num_rollouts] int, teacher tokens per response (0 = fully on-policy).
      key: PRNG key.
      max_new_tokens: N, response columns.
      num_rollouts: responses per prompt; the rows of prompt i are rows i * num_rollouts ... (i + 1) * num_rollouts - 1.
      temperature, top_k, top_p, eos_ids, pad_id, segment_length, vocab_size, decode_slots: as `generate`, for both
        models (with continuous batching the teacher decodes only the rows that take a prefix).
      teacher_prompt_tokens, teacher_prompt_mask: [B, P_T] the same prompts as the teacher renders them (its own chat
        template and system prompt), left-padded; the teacher writes its prefixes after these and the student
        continues after its own `prompt_tokens` + the prefix. Default: the teacher reads `prompt_tokens` too.
      placement: where each model runs (`tropd_jax.placement.Placement`): the teacher writes its prefixes on its mesh,
        and only the prefix tokens and lengths move to the student's. The prompts and prefix lengths are then host
        arrays every process holds, and `key` one every process drew alike. Default: both on the current mesh.

    Returns:
      A `Rollout` of B * num_rollouts rows.
    """
    if num_rollouts < 1:
        raise ValueError(f'num_rollouts must be >= 1, got {num_rollouts}.')
    if (teacher_prompt_tokens is None) != (teacher_prompt_mask is None):
        raise ValueError('teacher_prompt_tokens and teacher_prompt_mask go together.')
    if teacher_prompt_tokens is None:
        teacher_prompt_tokens, teacher_prompt_mask = prompt_tokens, prompt_mask
    if np.shape(teacher_prompt_tokens)[0] != np.shape(prompt_tokens)[0]:
        raise ValueError(
            f'teacher_prompt_tokens must have a row per prompt ({np.shape(prompt_tokens)[0]}), got shape '
            f'{np.shape(teacher_prompt_tokens)}.'
        )
    placement = placement or Placement()
    repeat = lambda x: np.repeat(np.asarray(x), num_rollouts, axis=0)  # host side: every process holds the prompts
    prefix_lengths = np.asarray(prefix_lengths, np.int32)
    rows = np.shape(prompt_tokens)[0] * num_rollouts
    if prefix_lengths.shape == (rows // num_rollouts,) and num_rollouts > 1:
        prefix_lengths = np.repeat(prefix_lengths, num_rollouts)
    if prefix_lengths.shape != (rows,):
        raise ValueError(f'prefix_lengths must be [B] or [B * num_rollouts] = [{rows}], got {prefix_lengths.shape}.')
    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_ids=eos_ids,
        pad_id=pad_id,
        segment_length=segment_length,
        vocab_size=vocab_size,
        decode_slots=decode_slots,
    )
    with placement.draws():
        teacher_key, student_key = jax.random.split(key)
    on_student, on_teacher = placement.student_mesh, placement.teacher_mesh
    student_inputs = (
        placement.put(repeat(prompt_tokens), on_student),
        placement.put(repeat(prompt_mask), on_student),
        placement.key_on(student_key, on_student),
    )
    if int(np.max(prefix_lengths)) <= 0:
        with placement.on(on_student):
            return generate(student, *student_inputs, **settings)
    # `responses` are the N columns after each model's own prompt bucket, so the teacher's prompt length P_T may
    # differ from the student's P: its prefix tokens move to the student's rows unchanged.
    with placement.on(on_teacher):
        prefix = generate(
            teacher,
            placement.put(repeat(teacher_prompt_tokens), on_teacher),
            placement.put(repeat(teacher_prompt_mask), on_teacher),
            placement.key_on(teacher_key, on_teacher),
            max_lengths=placement.put(prefix_lengths, on_teacher),
            **settings,
        )
        written = prefix.responses, prefix.lengths
    forced_tokens, forced_lengths = placement.to_student(written)
    with placement.on(on_student):
        return generate(
            student, *student_inputs, forced_tokens=forced_tokens, forced_lengths=forced_lengths, **settings
        )
