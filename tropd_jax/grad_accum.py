"""Gradient accumulation over micro-batches (after Levanter's `grad_accum.microbatched`).

A batch of B rows is split into n = B / m micro-batches of m rows that run one after another in a `lax.scan`, so only
one micro-batch's activations and logits exist at a time. The batch loss is a weighted sum of the micro-batch losses,
L = sum_j w_j L_j, so its gradient is sum_j w_j grad L_j:

    token_mean (L = sum over the batch's response tokens / their number): w_j = micro-batch j's share of the batch's
        response tokens;
    seq_mean_token_mean (L = sum of the sequences' token-means / their number): w_j = its share of the batch's sequences
        with response tokens.

The loss metrics are `(sum, count)` pairs (`losses.loss_from_stats`): they add up over micro-batches exactly,
whatever each metric is averaged over (`losses.combine_metrics`).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tropd_jax import losses


def micro_batches(batch: dict, micro_batch_size: int) -> dict:
    """`[B, ...]` arrays as `[n, m, ...]` micro-batches (m = micro_batch_size): micro-batch j holds rows i * n + j, so
    the reshape keeps each device's rows on that device."""
    m = micro_batch_size
    return {k: v.reshape(m, v.shape[0] // m, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def micro_batch_weights(response_mask: jax.Array, micro_batch_size: int, aggregation: str) -> jax.Array:
    """w_j of each micro-batch of `micro_batches` (summing to 1, or all 0 for a batch without response tokens).

    Args:
      response_mask: [B, T], 1 on the response tokens the loss sees (prompt columns already dropped).
      micro_batch_size: m rows per micro-batch.
      aggregation: `token_mean` (weights by response tokens) or `seq_mean_token_mean` (by sequences with response
        tokens, counted where their response starts: a rollout's response tokens are contiguous and follow its
        prompt, so this also counts the segments of packed rows).
    Returns:
      [n] float32.
    """
    if aggregation not in losses.AGGREGATIONS:
        raise ValueError(f'aggregation={aggregation!r} must be one of {losses.AGGREGATIONS}')
    response = response_mask.astype(jnp.float32)
    if aggregation == 'seq_mean_token_mean':
        response = response * (1.0 - jnp.pad(response, ((0, 0), (1, 0)))[:, :-1])  # 1 where a response starts
    m = micro_batch_size
    counts = response.reshape(m, response.shape[0] // m, -1).sum(axis=(0, 2))
    return counts / jnp.maximum(counts.sum(), 1.0)


def accumulate(grad_fn: Callable, params, weights: jax.Array, micro) -> tuple[object, losses.MetricPairs]:
    """sum_j weights[j] * (gradient of micro-batch j) in float32, and the micro-batches' metric pairs combined.

    Args:
      grad_fn: `(params, micro_batch) -> (grads, pairs)`: the gradient of one micro-batch's loss (a pytree like
        `params`) and its `losses.MetricPairs`.
      params: the parameters (a pytree of arrays).
      weights: [n] float32, w_j of each micro-batch (`micro_batch_weights`).
      micro: a pytree of `[n, ...]` arrays (`micro_batches`), scanned along the leading axis; leaves may be None.
    Returns:
      (float32 gradients like `params`, the pairs of the whole batch).
    """

    def body(grads_sum, xs):
        weight, micro_batch = xs
        grads, pairs = grad_fn(params, micro_batch)
        grads_sum = jax.tree.map(lambda a, g: a + weight * g.astype(jnp.float32), grads_sum, grads)
        return grads_sum, pairs

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    grads, pairs = jax.lax.scan(body, zeros, (weights, micro))  # pairs: [n] per entry
    return grads, losses.combine_metrics(pairs)
