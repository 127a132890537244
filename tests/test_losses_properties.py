"""Property tests (hypothesis) of tropd_jax.losses against the float64 reference in tests/losses_reference.py.

Eager JAX compiles every operation once per new shape (the trust mask's `jax.random.bernoulli` takes seconds), so
shapes and top-k sizes come from small pools that stay compiled across examples; values, masks (prompt, prefix,
padding, empty rows), keys and hyperparameters vary freely.
"""

import jax
import jax.numpy as jnp
import losses_reference as ref
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tropd_jax import losses

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = ((1, 1, 3), (2, 5, 8))  # [B, T, V]; a single token, and a batch with room for prompt, prefix and padding
TRUST_SHAPE = (2, 5, 8)
MARGIN = 1e-4  # inputs within this of a threshold of their method are skipped (float32 rounding could cross it)


@st.composite
def cases(draw, methods=losses.METHODS):
    """A random method, batch and hyperparameters."""
    method = draw(st.sampled_from(methods))
    batch_size, length, vocab = TRUST_SHAPE if method in ref.TRUST_METHODS else draw(st.sampled_from(SHAPES))
    top_k = st.sampled_from(sorted({1, 2, vocab}))
    data = ref.random_batch(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        batch_size,
        length,
        vocab,
        scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
        prefixes=draw(st.booleans()),
        empty_row=draw(st.booleans()),
        rollout_noise=draw(st.sampled_from([0.0, 0.3])),
    )
    hp = dict(
        k=draw(top_k),
        eopd_k=draw(top_k),
        beta=draw(st.sampled_from([0.001, 0.5])),
        renormalize=draw(st.booleans()),
        jsd_beta=draw(st.sampled_from([0.1, 0.5, 0.9])),
        entropy_top_q=draw(st.sampled_from([0.3, 0.7, 1.0])),
        reward_floor=draw(st.sampled_from([-2.0, -0.5])),
        eopd_entropy_threshold=draw(st.sampled_from([0.3, 0.8, 1.5])),
        reopold_entropy_top_q=draw(st.sampled_from([0.2, 0.45])),
        reopold_mixture_weight=draw(st.sampled_from([0.5, 0.9])),
        progress=draw(st.sampled_from([None, 0.7])),
        importance_ratio_cap=draw(st.sampled_from([None, 1.1])),  # continuous in rho: no margin needed
        aggregation=draw(st.sampled_from(['token_mean', 'seq_mean_token_mean'])),
    )
    return method, data, hp, jax.random.key(draw(st.integers(0, 2**31 - 1)))


def run(method, data, key, **hp):
    def f(student_logits):
        return losses.distillation_loss(
            method,
            student_logits,
            data['teacher_logits'],
            data['tokens'],
            data['response_mask'],
            data['prefix_mask'],
            key,
            rollout_logprobs=data['rollout_logprobs'],
            **hp,
        )[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(data['student_logits']))
    return float(loss), np.asarray(grad)


def uniforms(method, data, key):
    """The draws of the trust mask, M_t = uniforms < P_t (jax.random.bernoulli); unused outside trust methods."""
    if method not in ref.TRUST_METHODS:  # skip compiling the PRNG for shapes that never need it
        return np.ones(data['tokens'].shape)
    return np.asarray(jax.random.uniform(key, data['tokens'].shape, jnp.float32))


def far_from_thresholds(method, data, key, hp):
    return (
        ref.distance_to_thresholds(
            method,
            data['student_logits'],
            data['teacher_logits'],
            data['tokens'],
            data['response_mask'],
            data['prefix_mask'],
            uniforms(method, data, key),
            **hp,
        )
        > MARGIN
    )


@SETTINGS
@given(cases())
def test_loss_and_gradient_match_reference(case):
    method, data, hp, key = case
    assume(far_from_thresholds(method, data, key, hp))
    loss, grad = run(method, data, key, **hp)
    trust_mask = uniforms(method, data, key) < ref.trust_probability(
        ref.token_logprobs(data['student_logits'], data['tokens']),
        ref.token_logprobs(data['teacher_logits'], data['tokens']),
    )
    want_loss, want_grad, _ = ref.distillation_loss(
        method,
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        trust_mask,
        rollout_logprobs=data['rollout_logprobs'],
        **hp,
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=5e-5)


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_invariances(case, seed):
    method, data, hp, key = case
    assume(far_from_thresholds(method, data, key, hp))
    rng = np.random.default_rng(seed)
    loss, grad = run(method, data, key, **hp)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    outside = data['response_mask'] == 0
    # Nothing flows to or from prompt and padding positions.
    assert np.all(grad[outside] == 0.0)
    other = dict(data)
    for name in ('student_logits', 'teacher_logits'):
        other[name] = np.where(outside[..., None], rng.normal(size=data[name].shape) * 5, data[name]).astype(np.float32)
    np.testing.assert_allclose(run(method, other, key, **hp)[0], loss, rtol=1e-6, atol=1e-7)
    # Softmax is invariant to a per-position constant added to either model's logits.
    shifted = dict(data)
    for name in ('student_logits', 'teacher_logits'):
        shifted[name] = (data[name] + rng.uniform(-4, 4, size=data[name].shape[:2] + (1,))).astype(np.float32)
    assume(far_from_thresholds(method, shifted, key, hp))
    np.testing.assert_allclose(run(method, shifted, key, **hp)[0], loss, rtol=1e-4, atol=1e-4)
    # An empty response is a zero loss with zero gradients.
    empty_loss, empty_grad = run(method, dict(data, response_mask=np.zeros_like(data['response_mask'])), key, **hp)
    assert empty_loss == 0.0 and np.all(empty_grad == 0.0)


@SETTINGS
@given(st.sampled_from(SHAPES), st.data())
def test_per_token_functions(shape, data):
    batch_size, length, vocab = shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    zs = (rng.normal(size=(batch_size, length, vocab)) * scale).astype(np.float32)
    zt = (rng.normal(size=(batch_size, length, vocab)) * scale).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(batch_size, length)).astype(np.int32)
    s, tau = losses.token_logprobs(zs, tokens), losses.token_logprobs(zt, tokens)
    np.testing.assert_allclose(s, ref.token_logprobs(zs, tokens), rtol=1e-5, atol=1e-5)
    assert (np.asarray(s) <= 0).all()
    p = np.asarray(losses.trust_probability(s, tau))
    assert ((p >= 0) & (p <= 1)).all() and (p[np.asarray(tau) >= np.asarray(s)] == 1).all()
    k = data.draw(st.sampled_from(sorted({1, 2, vocab})))
    ordered = -np.sort(-zt, axis=-1)
    assume(k == vocab or (ordered[..., k - 1] - ordered[..., k]).min() > MARGIN)
    for renormalize in (False, True):
        f = np.asarray(losses.topk_forward_kl(zs, zt, k, renormalize=renormalize))
        np.testing.assert_allclose(f, ref.topk_forward_kl(zs, zt, k, renormalize), rtol=1e-4, atol=1e-4 * scale)
        if renormalize or k == vocab:  # a proper KL divergence
            assert (f > -1e-5 * max(scale, 1.0)).all()


@settings(SETTINGS, max_examples=6)
@given(cases(methods=('tropd',)), st.floats(0.5, 5.0))
def test_trust_region_limits(case, bonus):
    _, data, hp, key = case
    onehot = np.eye(data['student_logits'].shape[-1], dtype=np.float32)[data['tokens']]
    # The teacher out-scores the student on every realised token: P_t = M_t = 1, the trust methods are OPD / AOPD.
    out_scoring = dict(data, teacher_logits=data['student_logits'] + bonus * onehot)
    for method, baseline in (('tropd', 'opd'), ('tropd_clip', 'opd'), ('tropd_aopd', 'aopd')):
        for got, want in zip(run(method, out_scoring, key, **hp), run(baseline, out_scoring, key, **hp)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The teacher gives every realised token probability 0: P_t = M_t = 0, TrOPD is top-k FKL.
    rejecting = dict(data, teacher_logits=np.where(onehot > 0, -1e4, data['teacher_logits']).astype(np.float32))
    for got, want in zip(run('tropd', rejecting, key, **hp), run('topk_fkl', rejecting, key, **hp)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
