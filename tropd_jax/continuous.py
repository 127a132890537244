"""Continuous batching: `generate`'s decode of R rollouts through S < R decode slots (`decode_continuous`)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax.decoding import FINISH_EOS, DecodeInputs, Records, _constrain_cache, _head, assemble, prepare
from tropd_jax.models.decoder import KVCache, forward, init_cache


class SlotState(NamedTuple):
    """The loop state of continuous batching: which rollout each slot runs (`rows` for none) and its next response
    step, each slot's last token, the cache, how many rollouts have been taken, and the records."""

    slot_row: jax.Array  # [S]
    slot_t: jax.Array  # [S]
    token: jax.Array  # [S]
    cache: KVCache
    pending: jax.Array  # [] the next rollout (in `order`) to take
    records: Records


def decode_continuous(
    graphdef,
    state,
    inputs: DecodeInputs,
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
    """`decoding.decode` with continuous batching: R rollouts through `decode_slots` = S < R decode slots.

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
    t, as `decoding.decode` does, so its tokens do not depend on which slot it ran in or when. Rollouts with no
    budget are never prefilled.
    """
    del segment_length
    rows, prompt_length = inputs.prompt_tokens.shape
    slots = min(decode_slots, rows)
    model = nnx.merge(graphdef, state)
    config = model.config
    prepared = prepare(
        inputs,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
        pad_id=pad_id,
        vocab_size=vocab_size,
    )
    prompt_tokens, prompt_mask, prompt_positions = inputs.prompt_tokens, prepared.prompt_mask, prepared.prompt_positions
    max_lengths, uniforms, forced_tokens, forced_lengths = (
        prepared.max_lengths,
        inputs.uniforms,
        inputs.forced_tokens,
        inputs.forced_lengths,
    )
    # Rollouts with a budget first (in order), those without last: `runnable` of them are ever decoded.
    order = jnp.argsort(max_lengths <= 0, stable=True).astype(jnp.int32)
    runnable = jnp.sum(max_lengths > 0)
    lm_head = model.lm_head_weight().astype(jnp.dtype(config.dtype))
    empty = jnp.int32(rows)  # the rollout id of an empty slot (out of range: its writes are dropped)
    group = min(refill_group_size or max(1, slots // 8), slots)

    def emit(slot_row, t, logits, records: Records):
        """Token t [K] of the rollouts slot_row [K] (`empty` for none) from logits [K, V]; records it. Returns the
        tokens, slot_row with the slots whose rollout stopped emptied, and the records."""
        row = jnp.minimum(slot_row, rows - 1)
        token, logprob, model_logprob = prepared.choose(
            logits, uniforms[row, t], forced_tokens[row, t], t < forced_lengths[row]
        )
        active = (slot_row < rows) & (t < max_lengths[row])
        target = jnp.where(active, slot_row, empty)
        hit_eos = active & jnp.isin(token, inputs.eos_ids)
        records = Records(
            tokens=records.tokens.at[target, t].set(token, mode='drop'),
            logprobs=records.logprobs.at[target, t].set(logprob, mode='drop'),
            model_logprobs=records.model_logprobs.at[target, t].set(model_logprob, mode='drop'),
            lengths=records.lengths.at[target].add(1, mode='drop'),
            finish=records.finish.at[jnp.where(hit_eos, slot_row, empty)].set(FINISH_EOS, mode='drop'),
        )
        stopped = ~active | hit_eos | (t + 1 >= max_lengths[row])
        slot_row = jnp.where(stopped, empty, slot_row)
        return token, slot_row, records

    records = prepared.records
    # The first S rollouts: one batched prefill into slots [0, P) of every slot, then their first tokens.
    first = order[:slots]
    cache = _constrain_cache(init_cache(config, slots, prompt_length + max_new_tokens))
    hidden, cache = forward(
        graphdef, state, prompt_tokens[first], prompt_positions[first], prompt_mask[first], cache, True
    )
    slot_row = jnp.where(jnp.arange(slots) < runnable, first, empty)
    token, slot_row, records = emit(slot_row, jnp.zeros((slots,), jnp.int32), _head(hidden[:, -1], lm_head), records)
    slot_t = jnp.ones((slots,), jnp.int32)  # the next token each slot emits

    def can_refill(carry: SlotState):
        """Whether a group can be refilled: `refill_group` empty slots (fewer once fewer rollouts are pending)."""
        left = runnable - carry.pending
        return (left > 0) & (jnp.sum(carry.slot_row >= rows) >= jnp.minimum(group, left))

    def refill_group(carry: SlotState) -> SlotState:
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
        return SlotState(
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

    def step(carry: SlotState) -> SlotState:
        """Feeds each busy slot's last token (at its slot P + t - 1) and emits its token t; then refills."""
        slot_row, slot_t, token, cache, pending, records = carry
        busy = slot_row < rows
        row = jnp.minimum(slot_row, rows - 1)
        position = prepared.prompt_count[row] + slot_t - 1
        hidden, cache = forward(graphdef, state, token[:, None], position[:, None], busy[:, None], cache, True)
        token, slot_row, records = emit(slot_row, slot_t, _head(hidden[:, 0], lm_head), records)
        slot_t = jnp.where(slot_row < rows, slot_t + 1, 1)  # an emptied slot's (masked) step stays within [0, N)
        cache = cache.replace(index=prompt_length + (cache.index - prompt_length) % max_new_tokens)  # the ring
        return refill(SlotState(slot_row, slot_t, token, cache, pending, records))

    def busy(carry: SlotState):
        done = jnp.all(carry.slot_row >= rows).astype(jnp.int32)
        return ~(jax.lax.pmin(done, sync_axes) if sync_axes else done).astype(bool)

    carry = refill(SlotState(slot_row, slot_t, token, cache, jnp.minimum(runnable, slots), records))
    return assemble(inputs, jax.lax.while_loop(busy, step, carry).records)
