"""`grad_accum` and the loss metrics' `(sum, count)` pairs against the whole batch at once.

A linear student (logits = x @ w + b) on 6 rows in micro-batches of 2 rows (3 micro-batches, rows j and j + 3): the
micro-batches hold 10, 5 and 7 response tokens and 2, 1 and 2 sequences (one row has no response token at all, one
rollout has no response token, one row holds two rollouts when packed), so weighting them equally, or by tokens under
the seq-mean, gives another gradient. The accumulated gradient and every metric must equal those of
`losses.distillation_loss` on the whole batch, with the trust region's draws keyed by rollout and position.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import grad_accum, losses

T, H, V, K = 10, 6, 16, 4
MICRO = 2
# Per row: [(response length, prefix length), ...] of the rollouts it holds, each after a one-token prompt.
ROWS = [[(8, 3)], [], [(3, 1), (4, 0)], [(2, 0)], [(5, 2)], [(0, 0)]]
TOKENS_PER_MICRO_BATCH = [10, 5, 7]  # rows (0, 3), (1, 4), (2, 5)
SEQUENCES_PER_MICRO_BATCH = [2, 1, 2]
HP = dict(k=K, beta=0.5)


def make_batch(packed: bool, seed=0) -> dict:
    """[B, T] masks, ids and per-token inputs; unpacked, row 2 keeps only its first rollout."""
    rng = np.random.default_rng(seed)
    b = len(ROWS)
    response, prefix = np.zeros((b, T), np.float32), np.zeros((b, T), np.float32)
    segment_ids, rollout_ids, positions = (np.zeros((b, T), np.int32) for _ in range(3))
    for r, row in enumerate(ROWS):
        column = 0
        for segment, (length, prefix_length) in enumerate(row if packed else row[:1]):
            span = slice(column, column + 1 + length)  # the prompt token, then the response
            segment_ids[r, span] = segment + 1
            rollout_ids[r, span] = 2 * r + segment
            positions[r, span] = np.arange(1 + length)
            response[r, column + 1 : column + 1 + length] = 1
            prefix[r, column + 1 : column + 1 + prefix_length] = 1
            column += 1 + length
    student_logprobs = rng.normal(size=(b, T)).astype(np.float32) - 3.0
    return dict(
        x=rng.normal(size=(b, T, H)).astype(np.float32),
        teacher_logits=(2.0 * rng.normal(size=(b, T, V))).astype(np.float32),
        tokens=rng.integers(0, V, size=(b, T)).astype(np.int32),
        response_mask=response,
        prefix_mask=prefix,
        segment_ids=segment_ids,
        rollout_ids=rollout_ids,
        positions=positions,
        rollout_logprobs=student_logprobs * response,
    )


def make_params(seed=1):
    rng = np.random.default_rng(seed)
    return dict(
        w=jnp.asarray(rng.normal(size=(H, V)), jnp.float32), b=jnp.asarray(0.5 * rng.normal(size=(V,)), jnp.float32)
    )


def loss_fn(method, aggregation, packed):
    key = jax.random.key(5)

    def fn(params, batch):
        logits = batch['x'] @ params['w'] + params['b']
        return losses.distillation_loss(
            method,
            logits,
            batch['teacher_logits'],
            batch['tokens'],
            batch['response_mask'],
            batch['prefix_mask'],
            key,
            rollout_logprobs=batch['rollout_logprobs'],
            draw_ids=(batch['rollout_ids'], batch['positions']),
            segment_ids=batch['segment_ids'] if packed else None,
            aggregation=aggregation,
            **HP,
        )

    return fn


@pytest.mark.parametrize('aggregation', ['token_mean', 'seq_mean_token_mean'])
def test_micro_batch_weights_count_tokens_or_sequences(aggregation):
    for packed in (False, True):
        response = jnp.asarray(make_batch(packed)['response_mask'])
        weights = np.asarray(grad_accum.micro_batch_weights(response, MICRO, aggregation))
        if not packed:  # row 2 holds one rollout of 3 tokens
            counts = [10, 5, 3] if aggregation == 'token_mean' else [2, 1, 1]
        else:
            counts = TOKENS_PER_MICRO_BATCH if aggregation == 'token_mean' else SEQUENCES_PER_MICRO_BATCH
        np.testing.assert_allclose(weights, np.asarray(counts) / sum(counts), rtol=1e-6, err_msg=f'packed={packed}')
    assert not np.any(grad_accum.micro_batch_weights(jnp.zeros((4, T)), MICRO, aggregation))  # no response token


@pytest.mark.parametrize(
    'aggregation, packed',
    [('token_mean', False), ('seq_mean_token_mean', False), ('token_mean', True), ('seq_mean_token_mean', True)],
)
def test_accumulated_gradient_and_metrics_equal_the_whole_batch(aggregation, packed):
    batch = {k: jnp.asarray(v) for k, v in make_batch(packed).items()}
    params = make_params()
    fn = loss_fn('tropd', aggregation, packed)

    (loss, pairs), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
    want = losses.metric_values(pairs)

    @jax.jit
    def accumulated(params, batch):
        weights = grad_accum.micro_batch_weights(batch['response_mask'], MICRO, aggregation)
        return grad_accum.accumulate(
            jax.grad(fn, has_aux=True), params, weights, grad_accum.micro_batches(batch, MICRO)
        )

    got_grads, got_pairs = accumulated(params, batch)
    got = losses.metric_values(got_pairs)

    # The data are what the test needs: micro-batches of unequal size, trust draws on both sides, a prefix.
    assert 0.1 < want['trust_fraction'] < 0.9, want['trust_fraction']
    assert want['prefix_fraction'] > 0 and want['logprob_mismatch_max'] > want['logprob_mismatch'] > 0
    np.testing.assert_allclose(got['loss'], loss, rtol=1e-5)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for name in grads:
        scale = float(jnp.abs(grads[name]).max())
        assert scale > 0
        np.testing.assert_allclose(got_grads[name], grads[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_pairs_of_two_unequal_parts_add_up_to_the_whole_batch():
    """An on-policy mean (and every other metric) over two parts of 1 and 5 rows equals the whole batch's, which a
    mean of the parts' means does not; the counts are the numbers of tokens each mean is over."""
    data = make_batch(packed=True)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    params = make_params()
    fn = jax.jit(loss_fn('tropd', 'token_mean', True))
    _, whole = fn(params, batch)
    parts = [fn(params, {k: v[rows] for k, v in batch.items()})[1] for rows in (slice(0, 1), slice(1, None))]
    combined = losses.combine_metrics(jax.tree.map(lambda *x: jnp.stack(x), *parts))
    want, got = losses.metric_values(whole), losses.metric_values(combined)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)

    # The on-policy reward r_t = tau_t - s_t from the logits in float64.
    response, prefix = data['response_mask'], data['prefix_mask']
    on_policy = (response - prefix) > 0
    logits = data['x'].astype(np.float64) @ np.asarray(params['w'], np.float64) + np.asarray(params['b'], np.float64)

    def token_logprobs(z):
        z = z - z.max(-1, keepdims=True)
        z = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return np.take_along_axis(z, data['tokens'][..., None], axis=-1)[..., 0]

    reward = token_logprobs(data['teacher_logits'].astype(np.float64)) - token_logprobs(logits)
    np.testing.assert_allclose(got['reward'], reward[on_policy].mean(), rtol=1e-5)
    means = [float(losses.metric_values(p)['reward']) for p in parts]
    assert abs(np.mean(means) - reward[on_policy].mean()) > 0.1, means
    np.testing.assert_allclose(combined['reward'][1], on_policy.sum())
    np.testing.assert_allclose(combined['prefix_loss'][1], prefix.sum())
    np.testing.assert_allclose(combined['num_tokens'], (response.sum(), 0))
    mismatch_max = [float(p['logprob_mismatch_max'][0]) for p in parts]
    assert mismatch_max[0] != mismatch_max[1] and got['logprob_mismatch_max'] == max(mismatch_max)
