"""Packing: the plan and its round trip, and the loss and its gradients on packed rows against the unpacked rollouts
(the decoder's attention kernels keeping segments apart, RoPE positions restarting per segment)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import losses, packing, scoring
from tropd_jax.models import ModelConfig, init_decoder


def unpack(packed: np.ndarray, p: packing.Plan, columns: int, fill=0) -> np.ndarray:
    """The inverse of `packing.pack` for one array: `[num_rows, row_length, ...]` -> `[R, columns, ...]`, each
    rollout's real tokens back at their columns, `fill` elsewhere."""
    packed = np.asarray(packed)
    out = np.full((len(p.row), columns) + packed.shape[2:], fill, packed.dtype)
    for r in range(len(p.row)):
        out[r, p.first[r] : p.first[r] + p.length[r]] = packed[p.row[r], p.start[r] : p.start[r] + p.length[r]]
    return out


def padding_fraction(input_mask: np.ndarray) -> float:
    """The fraction of computed tokens (every column of every row) that are padding."""
    return float(1.0 - input_mask.sum() / max(input_mask.size, 1))


P, N = 8, 12  # prompt bucket and response columns of the unpacked rollouts
# Prompt and response lengths per rollout, all different, so that segments start anywhere in a packed row.
PROMPT_LENGTHS = [8, 3, 5, 1, 6, 2, 7]
RESPONSE_LENGTHS = [12, 4, 9, 2, 0, 11, 6]
CONFIG = ModelConfig(
    architecture='qwen3',
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
    tie_word_embeddings=True,
)


def rollouts(seed=0):
    """[R, P + N] rollout arrays (left-padded prompts, right-padded responses, teacher prefixes on some rows)."""
    rng = np.random.default_rng(seed)
    r = len(PROMPT_LENGTHS)
    tokens = np.zeros((r, P + N), np.int32)
    input_mask, response_mask, prefix_mask = (np.zeros((r, P + N), np.int32) for _ in range(3))
    for row, (prompt, response) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)):
        tokens[row, P - prompt : P + response] = rng.integers(1, CONFIG.vocab_size, prompt + response)
        input_mask[row, P - prompt : P + response] = 1
        response_mask[row, P : P + response] = 1
        prefix_mask[row, P : P + min(response, row % 3)] = 1
    logprobs = (rng.normal(size=(r, P + N)) * response_mask).astype(np.float32)
    return dict(
        tokens=tokens, input_mask=input_mask, response_mask=response_mask, prefix_mask=prefix_mask, logprobs=logprobs
    )


def test_plan_pack_unpack_round_trip():
    arrays = rollouts()
    lengths = arrays['input_mask'].sum(axis=1)
    plan = packing.plan(arrays['input_mask'], row_length=24, multiple_of=2)
    assert plan.num_rows % 2 == 0 and plan.num_rows < len(lengths)
    packed = packing.pack(arrays, plan)
    # Segments are disjoint, within the row, and as long as their rollouts.
    for row in range(plan.num_rows):
        ids = packed['segment_ids'][row]
        for segment in range(1, ids.max() + 1):
            columns = np.flatnonzero(ids == segment)
            assert len(columns) and np.all(np.diff(columns) == 1)
            np.testing.assert_array_equal(packed['positions'][row, columns], np.arange(len(columns)))
    np.testing.assert_array_equal(packed['input_mask'], packed['segment_ids'] > 0)
    assert (packed['segment_ids'] > 0).sum() == lengths.sum()
    for name, x in arrays.items():
        np.testing.assert_array_equal(
            unpack(packed[name], plan, P + N) * arrays['input_mask'], x * arrays['input_mask']
        )
    assert padding_fraction(packed['input_mask']) < padding_fraction(arrays['input_mask'])
    with pytest.raises(ValueError, match='row_length=10'):
        packing.plan(arrays['input_mask'], row_length=10)


def loss_and_grads(params, graphdef, teacher, arrays, method, prompt_length, packed):
    extra = (arrays['positions'], arrays['segment_ids']) if packed else ()
    t = scoring.targets(
        arrays['tokens'],
        arrays['input_mask'],
        arrays['response_mask'],
        arrays['prefix_mask'],
        arrays['logprobs'],
        prompt_length,
    )
    teacher_logits = scoring.response_logits(teacher, arrays['tokens'], arrays['input_mask'], prompt_length, *extra)

    def loss_fn(params):
        student = nnx.merge(graphdef, params)
        logits = scoring.response_logits(student, arrays['tokens'], arrays['input_mask'], prompt_length, *extra)
        return losses.distillation_loss(
            method,
            logits,
            teacher_logits,
            t.tokens,
            t.response_mask,
            t.prefix_mask,
            None,
            rollout_logprobs=t.rollout_logprobs,
        )[0]

    return jax.value_and_grad(loss_fn)(params)


@pytest.mark.slow
@pytest.mark.parametrize('attention', ['naive', 'blockwise'])
@pytest.mark.parametrize('method', ['opd', 'jsd'])
def test_packed_loss_and_gradients_equal_unpacked(attention, method):
    config = dataclasses.replace(CONFIG, attention=attention, attention_block_size=8)  # segments cross blocks
    graphdef, params = nnx.split(init_decoder(config, seed=0))
    teacher = init_decoder(config, seed=1)
    arrays = rollouts()
    plan = packing.plan(arrays['input_mask'], row_length=24)
    packed = {k: jnp.asarray(v) for k, v in packing.pack(arrays, plan).items()}
    unpacked = {k: jnp.asarray(v) for k, v in arrays.items()}
    run = jax.jit(loss_and_grads, static_argnums=(1, 4, 5, 6))
    loss, grads = run(params, graphdef, teacher, unpacked, method, P, False)
    packed_loss, packed_grads = run(params, graphdef, teacher, packed, method, 1, True)
    # OPD's loss here is a mean of s - tau ~ 1e-4: differences of log-probs near -log V, each known to float32's
    # ~5e-7 and summed in another order when packed, so the absolute tolerance is on that scale, not on the mean's.
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-8)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for got, want in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, atol=1e-5 * scale)
