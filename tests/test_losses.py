"""tropd_jax.losses against the NumPy float64 re-derivation of docs/methods.md (tests/losses_reference.py).

The implementation runs in float32 (JAX defaults); values are compared at rtol 1e-4 / atol 1e-5 and gradients with
respect to the student logits (reference: float64 central differences) at rtol 1e-3 / atol 2e-5.
"""

import math

import jax
import jax.numpy as jnp
import losses_reference as ref
import numpy as np
import pytest

from tropd_jax import losses

# Small k / eopd_k so that the top-k sets are proper subsets of the vocabulary; a floor and an EOPD threshold that
# split this test batch's on-policy tokens; a visible prefix weight.
HP = dict(k=6, eopd_k=4, beta=0.05, jsd_beta=0.3, entropy_top_q=0.3, reward_floor=-1.0, eopd_entropy_threshold=1.5)
VALUE_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-3, atol=2e-5)
CASES = [(m, {}) for m in losses.METHODS] + [
    ('reopold', dict(reopold_entropy_top_q=0.45)),
    ('reopold', dict(progress=0.8)),  # refinement: every on-policy token
    ('opd', dict(importance_ratio_cap=1.05)),  # truncated importance weights (token_mean runs with rho != 1)
    ('tropd', dict(importance_ratio_cap=1.05)),
    ('topk_fkl', dict(topk_tail=True)),  # the top-k FKL with its tail outcome, on its own and in the methods using it
    ('tropd', dict(topk_tail=True)),
    ('eopd', dict(topk_tail=True)),
]


def batch(seed=2, batch_size=4, length=8, vocab=24, **kwargs):
    return ref.random_batch(np.random.default_rng(seed), batch_size, length, vocab, **kwargs)


def run(method, data, key, use_rollout=True, **kwargs):
    """JAX loss, metrics and gradient w.r.t. the student logits, as NumPy."""
    rollout = data['rollout_logprobs'] if use_rollout else None

    def f(student_logits):
        return losses.distillation_loss(
            method,
            student_logits,
            data['teacher_logits'],
            data['tokens'],
            data['response_mask'],
            data['prefix_mask'],
            key,
            rollout_logprobs=rollout,
            **kwargs,
        )

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(data['student_logits']))
    return float(loss), {k: np.asarray(v) for k, v in losses.metric_values(metrics).items()}, np.asarray(grad)


def reference_trust_mask(data, key, vocab_size=None):
    """M_t = jax.random.bernoulli(key, P_t) with the reference's P_t, after checking no draw sits on P_t."""
    zs, zt = data['student_logits'], data['teacher_logits']
    if vocab_size is not None:
        zs, zt = zs[..., :vocab_size], zt[..., :vocab_size]
    p = ref.trust_probability(ref.token_logprobs(zs, data['tokens']), ref.token_logprobs(zt, data['tokens']))
    uniform = np.asarray(jax.random.uniform(key, p.shape, jnp.float32), np.float64)
    near = (np.abs(uniform - p) < 1e-5) & (p < 1)
    assert not near.any(), 'test data: a Bernoulli draw is within 1e-5 of P_t; pick another key'
    return np.asarray(jax.random.bernoulli(key, jnp.asarray(p, jnp.float32)))


def check_margins(method, data, key, hp):
    """The test batch sits on no threshold of `method` and puts tokens on both sides of each (else re-seed)."""
    uniform = np.asarray(jax.random.uniform(key, data['tokens'].shape, jnp.float32))
    assert (
        ref.distance_to_thresholds(
            method,
            data['student_logits'],
            data['teacher_logits'],
            data['tokens'],
            data['response_mask'],
            data['prefix_mask'],
            uniform,
            **hp,
        )
        > 1e-3
    )
    on = (data['response_mask'] > 0) & (data['prefix_mask'] == 0)
    r = (
        ref.token_logprobs(data['teacher_logits'], data['tokens'])
        - ref.token_logprobs(data['student_logits'], data['tokens'])
    )[on]
    assert (r < hp['reward_floor']).any() and ((r < 0) & (r > hp['reward_floor'])).any() and (r > 0).any()
    teacher_entropy = ref.entropy(data['teacher_logits'])[on]
    assert (teacher_entropy > hp['eopd_entropy_threshold']).any()
    assert (teacher_entropy < hp['eopd_entropy_threshold']).any()


def test_reference_gradient_is_the_analytic_one():
    # Self-check of the reference's finite differences: grad(-r rho) = -r rho (onehot(y) - p_S), grad F =
    # -p_T|K + (sum_K p_T) p_S, grad of the prefix term = -beta (onehot(y) - p_S); weights 1 / #response tokens.
    data = batch()
    on = (data['response_mask'] > 0) & (data['prefix_mask'] == 0)
    pre = data['prefix_mask'] > 0
    weight = (data['response_mask'] / data['response_mask'].sum())[..., None]
    ps = np.exp(ref.log_softmax(data['student_logits']))
    pt = np.exp(ref.log_softmax(data['teacher_logits']))
    onehot = np.eye(24)[data['tokens']]
    s = ref.token_logprobs(data['student_logits'], data['tokens'])
    r = ref.token_logprobs(data['teacher_logits'], data['tokens']) - s
    rho = np.exp(s - data['rollout_logprobs'])
    prefix_grad = np.where(pre[..., None], -HP['beta'] * (onehot - ps), 0.0)
    args = (
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        np.zeros(on.shape, bool),
    )

    _, grad, _ = ref.distillation_loss('opd', *args, rollout_logprobs=data['rollout_logprobs'], **HP)
    k1 = np.where(on[..., None], (-r * rho)[..., None] * (onehot - ps), 0.0)
    np.testing.assert_allclose(grad, weight * (k1 + prefix_grad), rtol=1e-6, atol=1e-9)

    _, grad, _ = ref.distillation_loss('topk_fkl', *args, **HP)
    in_topk = np.zeros_like(pt)
    np.put_along_axis(in_topk, ref.teacher_topk(data['teacher_logits'], HP['k']), 1.0, axis=-1)
    fkl = -pt * in_topk + (pt * in_topk).sum(-1, keepdims=True) * ps
    np.testing.assert_allclose(grad, weight * (np.where(on[..., None], fkl, 0.0) + prefix_grad), rtol=1e-6, atol=1e-9)


def test_token_logprobs_and_trust_probability():
    data = batch()
    for dtype in (jnp.float32, jnp.bfloat16):
        logits = jnp.asarray(data['student_logits'], dtype)
        got = losses.token_logprobs(logits, jnp.asarray(data['tokens']))
        assert got.dtype == jnp.float32 and got.shape == data['tokens'].shape
        want = ref.token_logprobs(np.asarray(logits.astype(jnp.float32)), data['tokens'])
        np.testing.assert_allclose(got, want, **VALUE_TOL)
    s = ref.token_logprobs(data['student_logits'], data['tokens'])
    tau = ref.token_logprobs(data['teacher_logits'], data['tokens'])
    got = losses.trust_probability(jnp.asarray(s, jnp.float32), jnp.asarray(tau, jnp.float32))
    assert got.shape == s.shape
    np.testing.assert_allclose(got, np.minimum(np.exp(tau - s), 1.0), **VALUE_TOL)


@pytest.mark.parametrize('k,renormalize', [(1, False), (6, False), (6, True), (24, False)])
def test_topk_forward_kl(k, renormalize):
    data = batch()
    zs, zt = data['student_logits'], data['teacher_logits']

    def f(z):
        per_token = losses.topk_forward_kl(z, jnp.asarray(zt), k, renormalize=renormalize)
        return per_token.sum(), per_token

    (_, per_token), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(zs))
    assert per_token.shape == data['tokens'].shape and per_token.dtype == jnp.float32
    np.testing.assert_allclose(per_token, ref.topk_forward_kl(zs, zt, k, renormalize), **VALUE_TOL)
    h = 1e-5  # central differences of the per-position reference, one vocabulary column at a time
    want = np.zeros(zs.shape)
    for v in range(zs.shape[-1]):
        up, down = zs.astype(np.float64), zs.astype(np.float64)
        up[..., v] += h
        down[..., v] -= h
        ids = ref.teacher_topk(zt, k)
        want[..., v] = (
            ref.topk_forward_kl(up, zt, k, renormalize, ids) - ref.topk_forward_kl(down, zt, k, renormalize, ids)
        ) / (2 * h)
    np.testing.assert_allclose(grad, want, **GRAD_TOL)
    if k == 24 and not renormalize:  # K_t = the whole vocabulary: the full KL(p_T || p_S) >= 0
        assert (np.asarray(per_token) > -1e-5).all()


def _fd_gradient(f, z, h=1e-5):
    """Central differences of a per-position float64 function f([B, T, V]) -> [B, T], one vocabulary column at a
    time (each position's value depends on its own logits only)."""
    grad = np.zeros(z.shape)
    for v in range(z.shape[-1]):
        up, down = z.astype(np.float64), z.astype(np.float64)
        up[..., v] += h
        down[..., v] -= h
        grad[..., v] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize('beta', [0.1, 0.5, 0.9])
def test_generalized_jsd_value_and_gradient_are_exact(beta):
    # Independent of losses_reference's loss: the divergence written with probabilities, then finite differences.
    data = batch()
    zs, zt = data['student_logits'], data['teacher_logits']

    def exact(z):
        p_s, p_t = np.exp(ref.log_softmax(z)), np.exp(ref.log_softmax(zt))
        p_m = beta * p_t + (1 - beta) * p_s
        return beta * np.sum(p_t * np.log(p_t / p_m), -1) + (1 - beta) * np.sum(p_s * np.log(p_s / p_m), -1)

    value, grad = jax.value_and_grad(lambda z: losses.generalized_jsd(z, jnp.asarray(zt), beta).sum())(jnp.asarray(zs))
    per_token = losses.generalized_jsd(jnp.asarray(zs), jnp.asarray(zt), beta)
    np.testing.assert_allclose(per_token, exact(zs), **VALUE_TOL)
    assert (np.asarray(per_token) >= -1e-6).all()
    np.testing.assert_allclose(grad, _fd_gradient(exact, zs), **GRAD_TOL)
    # The teacher equal to the student is the minimum: value 0, gradient 0.
    same = jax.grad(lambda z: losses.generalized_jsd(z, jnp.asarray(zs), beta).sum())(jnp.asarray(zs))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


@pytest.mark.parametrize('k', [1, 6, 23, 24])
def test_topk_tail_forward_kl_is_a_divergence_over_k_plus_one_outcomes(k):
    # Written with probabilities and the rest of the vocabulary summed id by id (not 1 - sum over K_t), then finite
    # differences; >= 0; equal to the full-vocabulary forward KL when k = V - 1 or V (the tail is one id or empty).
    data = batch()
    zs, zt = data['student_logits'], data['teacher_logits']
    ids = ref.teacher_topk(zt, k)

    def f(z):
        return losses.topk_forward_kl(z, jnp.asarray(zt), k, tail=True)

    per_token = f(jnp.asarray(zs))
    grad = jax.grad(lambda z: f(z).sum())(jnp.asarray(zs))
    want = ref.topk_forward_kl(zs, zt, k, ids=ids, tail=True)
    np.testing.assert_allclose(per_token, want, **VALUE_TOL)
    np.testing.assert_allclose(
        grad, _fd_gradient(lambda z: ref.topk_forward_kl(z, zt, k, ids=ids, tail=True), zs), **GRAD_TOL
    )
    assert (want >= 0).all()
    # Merging the ids outside K_t into one outcome never increases a KL: a lower bound of the full forward KL.
    assert (want <= ref.forward_kl(zs, zt) + 1e-12).all()
    if k >= 23:
        np.testing.assert_allclose(per_token, ref.forward_kl(zs, zt), **VALUE_TOL)


@pytest.mark.parametrize('method', ['full_fkl', 'full_rkl'])
def test_full_vocabulary_kl_value_and_gradient_are_exact(method):
    # Closed forms in probabilities, then finite differences; zero value and gradient at p_S = p_T.
    data = batch()
    zs, zt = data['student_logits'], data['teacher_logits']

    def exact(z):
        p_s, p_t = np.exp(ref.log_softmax(z)), np.exp(ref.log_softmax(zt))
        return np.sum(p_t * np.log(p_t / p_s), -1) if method == 'full_fkl' else np.sum(p_s * np.log(p_s / p_t), -1)

    f = lambda z, t: losses.full_divergence(method, z, t, 0.5)
    per_token = f(jnp.asarray(zs), jnp.asarray(zt))
    grad = jax.grad(lambda z: f(z, jnp.asarray(zt)).sum())(jnp.asarray(zs))
    np.testing.assert_allclose(per_token, exact(zs), **VALUE_TOL)
    np.testing.assert_allclose(grad, _fd_gradient(exact, zs), **GRAD_TOL)
    same = jax.value_and_grad(lambda z: f(z, jnp.asarray(zs)).sum())(jnp.asarray(zs))
    np.testing.assert_allclose(same[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(same[1], 0.0, atol=1e-6)


def test_jsd_gradient_is_not_the_sampled_token_estimate():
    # The old loss differentiated beta KL_topk(p_T || p_M) + (1 - beta) (s_t - log p_M(y_t)) at the sampled token;
    # its gradient, averaged over y_t ~ p_S, is not the exact one. The expected gradient of the exact loss, here
    # summed over y_t weighted by p_S(y_t), must be the exact gradient (it does not depend on y_t).
    rng = np.random.default_rng(0)
    zs = (rng.normal(size=(1, 1, 12)) * 2).astype(np.float32)
    zt = (rng.normal(size=(1, 1, 12)) * 2).astype(np.float32)
    beta = 0.5

    def sampled_estimate(z, y):
        logp_s, logp_t = jax.nn.log_softmax(z), jax.lax.stop_gradient(jax.nn.log_softmax(jnp.asarray(zt)))
        log_pm = jnp.logaddexp(jnp.log(beta) + logp_t, jnp.log(1 - beta) + logp_s)
        teacher = jnp.sum(jnp.exp(logp_t) * (logp_t - log_pm))
        return beta * teacher + (1 - beta) * (logp_s[..., y] - log_pm[..., y]).sum()

    p_s = np.exp(ref.log_softmax(zs))[0, 0]
    expected_old = sum(p_s[y] * np.asarray(jax.grad(sampled_estimate)(jnp.asarray(zs), y)) for y in range(12))
    exact = np.asarray(jax.grad(lambda z: losses.generalized_jsd(z, jnp.asarray(zt), beta).sum())(jnp.asarray(zs)))
    cosine = float(np.sum(expected_old * exact) / np.linalg.norm(expected_old) / np.linalg.norm(exact))
    assert cosine < 0.9, cosine  # the estimate's gradient points elsewhere
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1), jnp.float32)
    loss_grad = jax.grad(
        lambda z: losses.distillation_loss(
            'jsd', z, jnp.asarray(zt), tokens, mask, 0 * mask, None, jsd_beta=beta, k=12
        )[0]
    )(jnp.asarray(zs))
    np.testing.assert_allclose(loss_grad, exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('aggregation', ['token_mean', 'seq_mean_token_mean'])
@pytest.mark.parametrize('method,extra', CASES)
def test_distillation_loss_matches_reference(method, extra, aggregation):
    # token_mean runs with off-policy rollout log-probs (rho != 1), seq_mean_token_mean without (rho = 1).
    data = batch(rollout_noise=0.1)
    hp = dict(HP, aggregation=aggregation, **extra)
    key = jax.random.key(7)
    check_margins(method, data, key, hp)
    use_rollout = aggregation == 'token_mean'
    loss, metrics, grad = run(method, data, key, use_rollout=use_rollout, **hp)
    want_loss, want_grad, want = ref.distillation_loss(
        method,
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        reference_trust_mask(data, key),
        rollout_logprobs=data['rollout_logprobs'] if use_rollout else None,
        **hp,
    )
    np.testing.assert_allclose(loss, want_loss, **VALUE_TOL)
    np.testing.assert_allclose(grad, want_grad, **GRAD_TOL)
    assert set(metrics) >= {
        'loss',
        'pg_loss',
        'fkl_loss',
        'prefix_loss',
        'trust_fraction',
        'trust_probability',
        'reward',
        'outlier_fraction',
        'student_entropy',
        'teacher_entropy',
        'prefix_fraction',
        'num_tokens',
    }
    for name, value in metrics.items():
        assert value.shape == () and value.dtype == np.float32, name
    for name in (
        'loss',
        'prefix_loss',
        'pg_loss',
        'fkl_loss',
        'prefix_fraction',
        'num_tokens',
        'reward',
        'trust_probability',
        'student_entropy',
        'teacher_entropy',
        'prefix_student_entropy',
        'prefix_teacher_entropy',
        'logprob_mismatch',
        'logprob_mismatch_max',
        'ratio_truncated_fraction',
        'teacher_topk_mass',
        'student_topk_mass',
    ):
        np.testing.assert_allclose(metrics[name], want[name], err_msg=name, **VALUE_TOL)
    if method in ref.TRUST_METHODS:
        np.testing.assert_allclose(metrics['trust_fraction'], want['trust_fraction'], **VALUE_TOL)
    if want['outlier_fraction'] is not None:
        np.testing.assert_allclose(metrics['outlier_fraction'], want['outlier_fraction'], **VALUE_TOL)


def test_entropy_metrics_without_prefix():
    # Without a prefix, response tokens and on-policy tokens coincide, whichever set the metrics average over.
    data = batch(prefixes=False)
    _, metrics, _ = run('tropd', data, jax.random.key(3), **HP)
    _, _, want = ref.distillation_loss(
        'tropd',
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        reference_trust_mask(data, jax.random.key(3)),
        **HP,
    )
    for name in ('student_entropy', 'teacher_entropy', 'trust_fraction', 'outlier_fraction'):
        np.testing.assert_allclose(metrics[name], want[name], err_msg=name, **VALUE_TOL)


@pytest.mark.parametrize('method', losses.METHODS)
def test_default_hyperparameters(method):
    # V = 64 so that the default k = 64 is valid; nothing but the required arguments is passed.
    data = batch(seed=5, batch_size=2, length=5, vocab=64, rollout_noise=0.1)
    key = jax.random.key(1)
    loss, _ = losses.distillation_loss(
        method,
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        key,
        rollout_logprobs=data['rollout_logprobs'],
    )
    want_loss, _, _ = ref.distillation_loss(
        method,
        data['student_logits'],
        data['teacher_logits'],
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        reference_trust_mask(data, key),
        rollout_logprobs=data['rollout_logprobs'],
    )
    np.testing.assert_allclose(loss, want_loss, **VALUE_TOL)


def truncation_bias(logits, k):
    """The gradient of the top-k FKL w.r.t. the student logits at p_S = p_T = p, without a tail outcome:
    -p_j (1[j in K_t] - p(K_t)), [B, T, V] float64 (it pushes mass from outside K_t onto K_t)."""
    p = np.exp(ref.log_softmax(logits))
    inside = np.zeros(p.shape, bool)
    np.put_along_axis(inside, ref.teacher_topk(logits, k), True, axis=-1)
    mass = np.sum(np.where(inside, p, 0.0), axis=-1, keepdims=True)
    return -p * (inside - mass)


def self_distillation_fkl_tokens(method, data, hp):
    """[B, T] bool: the on-policy tokens a method sends to the top-k FKL when teacher = student (r_t = 0 and P_t =
    M_t = 1 exactly), and the k it uses; (None, None) for methods without one there."""
    on = (data['response_mask'] > 0) & ~(data['prefix_mask'] > 0)
    if method in ('topk_fkl', 'aopd', 'tropd_aopd'):  # aopd: r_t > 0 is false, every token goes to the FKL
        return on, hp['k']
    if method == 'eopd':
        return on & (ref.entropy(data['teacher_logits']) > hp['eopd_entropy_threshold']), hp['eopd_k']
    return None, None  # K1 terms vanish at r_t = 0; trust methods keep every token (M_t = 1); divergences at 0


@pytest.mark.parametrize('tail', [False, True])
@pytest.mark.parametrize('method', losses.METHODS)
def test_self_distillation_is_a_fixed_point(method, tail):
    # Teacher = student (same logits), no prefix: the loss is 0 for every method, and so is its gradient, except the
    # top-k FKL's truncation bias -p_j (1[j in K_t] - p(K_t)) on the tokens it sees, which the tail outcome removes.
    data = batch(prefixes=False)
    data['teacher_logits'] = data['student_logits'].copy()
    hp = dict(HP, topk_tail=tail)
    loss, metrics, grad = run(method, data, jax.random.key(0), **hp)
    np.testing.assert_allclose([loss, metrics['reward'], metrics['trust_probability']], [0.0, 0.0, 1.0], atol=1e-6)
    tokens, k = self_distillation_fkl_tokens(method, data, hp)
    want = np.zeros(grad.shape)
    if tokens is not None and not tail:
        assert tokens.any(), 'no token reaches the top-k FKL: the bias check would be vacuous'
        n = (data['response_mask'] > 0).sum()
        want = np.where(tokens[..., None], truncation_bias(data['student_logits'], k) / n, 0.0)
        assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(grad, want, atol=2e-7)


def test_teacher_rejecting_every_token_routes_everything_to_fkl():
    data = batch(prefixes=False)
    np.put_along_axis(data['teacher_logits'], data['tokens'][..., None], -1e4, axis=-1)  # P_t = 0 exactly
    loss, metrics, grad = run('fkl_outlier', data, jax.random.key(0), **HP)
    on = data['response_mask'] > 0

    def mean_fkl(z):
        per_token = losses.topk_forward_kl(z, jnp.asarray(data['teacher_logits']), HP['k'])
        return jnp.sum(jnp.where(on, per_token, 0.0)) / on.sum()

    want_loss, want_grad = jax.value_and_grad(mean_fkl)(jnp.asarray(data['student_logits']))
    np.testing.assert_allclose(loss, want_loss, **VALUE_TOL)
    np.testing.assert_allclose(grad, want_grad, **VALUE_TOL)
    assert metrics['trust_fraction'] == 0.0 and metrics['outlier_fraction'] == 1.0
    assert metrics['trust_probability'] == 0.0


def test_teacher_always_out_scoring_the_student_makes_trust_methods_opd():
    data = batch(rollout_noise=0.1)
    # teacher = student + 3 on the realised token: tau_t > s_t everywhere, so P_t = M_t = 1.
    data['teacher_logits'] = data['student_logits'] + 3.0 * np.eye(24, dtype=np.float32)[data['tokens']]
    key = jax.random.key(4)
    opd_loss, _, opd_grad = run('opd', data, key, **HP)
    aopd_loss, _, aopd_grad = run('aopd', data, key, **HP)
    for method, (want_loss, want_grad) in {
        'fkl_outlier': (opd_loss, opd_grad),
        'tropd': (opd_loss, opd_grad),
        'tropd_mask': (opd_loss, opd_grad),
        'tropd_clip': (opd_loss, opd_grad),
        'tropd_aopd': (aopd_loss, aopd_grad),
    }.items():
        loss, metrics, grad = run(method, data, key, **HP)
        np.testing.assert_allclose(loss, want_loss, err_msg=method, **VALUE_TOL)
        np.testing.assert_allclose(grad, want_grad, err_msg=method, **VALUE_TOL)
        assert metrics['trust_fraction'] == 1.0 and metrics['trust_probability'] == 1.0


@pytest.mark.parametrize('method', losses.METHODS)
def test_prefix_term_gradient_is_beta_weighted_nll(method):
    data = batch()
    data['prefix_mask'] = data['response_mask'].copy()  # every response token written by the teacher
    beta, n = 0.25, data['response_mask'].sum()
    loss, metrics, grad = run(method, data, jax.random.key(0), **dict(HP, beta=beta))
    resp = data['response_mask'] > 0
    s = ref.token_logprobs(data['student_logits'], data['tokens'])
    tau = ref.token_logprobs(data['teacher_logits'], data['tokens'])
    np.testing.assert_allclose(loss, beta * np.sum(np.where(resp, tau - s, 0.0)) / n, **VALUE_TOL)
    nll_grad = np.exp(ref.log_softmax(data['student_logits'])) - np.eye(24)[data['tokens']]  # grad of -log p_S(y)
    np.testing.assert_allclose(grad, np.where(resp[..., None], beta * nll_grad / n, 0.0), **GRAD_TOL)
    assert metrics['prefix_fraction'] == 1.0


@pytest.mark.parametrize('target', [0.1, 0.5, 0.9, None])
def test_trust_mask_frequency_matches_trust_probability(target):
    """trust_fraction over n = 4096 tokens is within 5 binomial sigmas, sqrt(sum P(1 - P)) / n, of mean P_t."""
    rng = np.random.default_rng(0)
    shape, vocab = (8, 512), 8
    student = rng.normal(size=(*shape, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=shape).astype(np.int32)
    p = np.full(shape, target) if target is not None else rng.uniform(0.02, 1.0, size=shape)
    # Teacher logits whose log-softmax at y_t is exactly s_t + log P_t (any other entries).
    teacher = rng.normal(size=(*shape, vocab))
    np.put_along_axis(teacher, tokens[..., None], -np.inf, axis=-1)
    rest = np.log(np.exp(teacher).sum(-1))
    a = ref.token_logprobs(student, tokens) + np.log(p)
    np.put_along_axis(teacher, tokens[..., None], (a + rest - np.log1p(-np.exp(a)))[..., None], axis=-1)
    np.testing.assert_allclose(np.exp(ref.token_logprobs(teacher, tokens) - ref.token_logprobs(student, tokens)), p)
    mask = np.ones(shape, np.int32)
    _, metrics = losses.distillation_loss(
        'fkl_outlier',
        jnp.asarray(student),
        jnp.asarray(teacher, jnp.float32),
        jnp.asarray(tokens),
        mask,
        np.zeros(shape, np.int32),
        jax.random.key(123),
        k=4,
    )
    metrics = losses.metric_values(metrics)
    np.testing.assert_allclose(metrics['trust_probability'], p.mean(), rtol=1e-4)
    sigma = math.sqrt(np.sum(p * (1 - p))) / p.size
    assert abs(float(metrics['trust_fraction']) - p.mean()) < 5 * sigma
    np.testing.assert_allclose(metrics['outlier_fraction'], 1.0 - metrics['trust_fraction'], atol=1e-6)


def test_trust_mask_depends_on_the_key_only():
    data = batch()
    first, _, _ = run('fkl_outlier', data, jax.random.key(0), **HP)
    again, _, _ = run('fkl_outlier', data, jax.random.key(0), **HP)
    other = [run('fkl_outlier', data, jax.random.key(i), **HP)[0] for i in range(1, 6)]
    assert first == again and any(o != first for o in other)


@pytest.mark.parametrize('method', losses.METHODS)
def test_masked_vocabulary_extreme_logits_and_bfloat16_are_finite(method):
    data = batch()
    key = jax.random.key(0)
    # -inf on vocabulary entries 4..23 in both models (never sampled), and top-k sets (k = 6) larger than the four
    # finite entries, so that they contain masked entries.
    masked = {name: data[name].copy() for name in data}
    masked['student_logits'][..., 4:] = -np.inf
    masked['teacher_logits'][..., 4:] = -np.inf
    masked['tokens'] = masked['tokens'] % 4
    hp = dict(HP, eopd_k=6)
    loss, metrics, grad = run(method, masked, key, **hp)
    assert np.isfinite(loss) and np.isfinite(grad).all() and all(np.isfinite(v) for v in metrics.values())
    want_loss, want_grad, _ = ref.distillation_loss(
        method,
        masked['student_logits'],
        masked['teacher_logits'],
        masked['tokens'],
        masked['response_mask'],
        masked['prefix_mask'],
        reference_trust_mask(masked, key),
        rollout_logprobs=masked['rollout_logprobs'],
        **hp,
    )
    np.testing.assert_allclose(loss, want_loss, **VALUE_TOL)
    np.testing.assert_allclose(grad, want_grad, **GRAD_TOL)

    extreme = {name: data[name].copy() for name in data}
    extreme['student_logits'][..., :3] = [1e4, -1e4, 1e4]
    extreme['teacher_logits'][..., 2:5] = [-1e4, 1e4, -1e4]
    loss, metrics, grad = run(method, extreme, key, use_rollout=False, **HP)
    assert np.isfinite(loss) and np.isfinite(grad).all() and all(np.isfinite(v) for v in metrics.values())

    low = {name: data[name].copy() for name in data}
    low['student_logits'] = np.asarray(jnp.asarray(data['student_logits'], jnp.bfloat16).astype(jnp.float32))
    low['teacher_logits'] = np.asarray(jnp.asarray(data['teacher_logits'], jnp.bfloat16).astype(jnp.float32))
    args = (
        jnp.asarray(low['student_logits'], jnp.bfloat16),
        jnp.asarray(low['teacher_logits'], jnp.bfloat16),
        data['tokens'],
        data['response_mask'],
        data['prefix_mask'],
        key,
    )
    loss16, grad16 = jax.value_and_grad(lambda z: losses.distillation_loss(method, z, *args[1:], **HP)[0])(args[0])
    assert loss16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad16)).all()
    loss32, _, grad32 = run(method, low, key, use_rollout=False, **HP)  # same values, upcast before the call
    np.testing.assert_allclose(loss16, loss32, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad16.astype(jnp.float32)), grad32, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    'method,aggregation',
    [(m, 'token_mean') for m in losses.METHODS] + [(m, 'seq_mean_token_mean') for m in ('opd', 'tropd')],
)
def test_empty_response_gives_zero_loss_and_finite_gradients(method, aggregation):
    data = batch()
    data['response_mask'][:] = 0
    loss, metrics, grad = run(method, data, jax.random.key(0), **dict(HP, aggregation=aggregation))
    assert loss == 0.0 and np.all(grad == 0.0)
    assert all(np.isfinite(v) for v in metrics.values()) and metrics['num_tokens'] == 0.0


@pytest.mark.parametrize('method', ['tropd', 'jsd', 'eopd'])  # the slicing comes before any method's math
def test_vocab_size_slices_both_models_to_the_shared_vocabulary(method):
    data = batch(vocab=40)
    data['student_logits'] = data['student_logits'][..., :36]  # student padded to 36 rows, teacher to 40
    data['tokens'] = np.minimum(data['tokens'], 31)
    key = jax.random.key(2)
    loss, metrics, grad = run(method, data, key, vocab_size=32, **HP)
    sliced = dict(
        data, student_logits=data['student_logits'][..., :32], teacher_logits=data['teacher_logits'][..., :32]
    )
    want_loss, want_metrics, want_grad = run(method, sliced, key, **HP)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad[..., :32], want_grad, rtol=1e-6, atol=1e-8)
    assert grad.shape == (4, 8, 36) and np.all(grad[..., 32:] == 0.0)
    for name in want_metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)


def _shape_pattern(shape):
    return r'\D' + r',\s*'.join(str(d) for d in shape) + r'\D'


def test_bad_input_raises_value_error_naming_it():
    data = batch()
    zs, zt, tokens = data['student_logits'], data['teacher_logits'], data['tokens']
    rm, pm, key = data['response_mask'], data['prefix_mask'], jax.random.key(0)

    def call(
        method='tropd', student_logits=zs, teacher_logits=zt, tokens=tokens, response_mask=rm, prefix_mask=pm, **kwargs
    ):
        return losses.distillation_loss(
            method, student_logits, teacher_logits, tokens, response_mask, prefix_mask, key, **{'k': 6, **kwargs}
        )

    with pytest.raises(ValueError, match='no_such_method'):
        call('no_such_method')
    with pytest.raises(ValueError, match=_shape_pattern((4, 7))):
        call(tokens=tokens[:, :7])
    with pytest.raises(ValueError, match=_shape_pattern((4, 7))) as error:
        call(teacher_logits=zt[:, :7])
    assert 'teacher_logits' in str(error.value)
    with pytest.raises(ValueError, match=_shape_pattern((3, 8))):
        call(response_mask=rm[:3])
    with pytest.raises(ValueError, match=_shape_pattern((4, 6))):
        call(prefix_mask=pm[:, :6])
    with pytest.raises(ValueError, match=_shape_pattern((4, 5))):
        call(rollout_logprobs=data['rollout_logprobs'][:, :5])
    with pytest.raises(ValueError, match='20'):  # different vocabularies and no vocab_size
        call(student_logits=zs[..., :20])
    with pytest.raises(ValueError, match='30'):
        call(vocab_size=30)
    with pytest.raises(ValueError, match='25'):
        call('topk_fkl', k=25)
    with pytest.raises(ValueError, match='no_such_aggregation'):
        call(aggregation='no_such_aggregation')
    with pytest.raises(ValueError, match='25'):
        losses.topk_forward_kl(zs, zt, 25)
    with pytest.raises(ValueError, match=_shape_pattern((4, 8, 20))):
        losses.topk_forward_kl(zs[..., :20], zt, 4)


def test_jit_grad_and_vmap():
    # One compiled function: jit of vmap of grad, over three independent batches, against eager calls.
    datas = [batch(seed=s, rollout_noise=0.1) for s in (2, 3, 4)]
    names = ('student_logits', 'teacher_logits', 'tokens', 'response_mask', 'prefix_mask')
    stacked = [np.stack([d[n] for d in datas]) for n in names]
    keys = jax.random.split(jax.random.key(9), 3)

    def loss_fn(zs, zt, tokens, rm, pm, key, rollout):
        return losses.distillation_loss('tropd', zs, zt, tokens, rm, pm, key, rollout_logprobs=rollout, **HP)[0]

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))
    loss, grad = batched(*stacked, keys, np.stack([d['rollout_logprobs'] for d in datas]))
    for i, d in enumerate(datas):
        eager_loss, _, eager_grad = run('tropd', d, keys[i], **HP)
        np.testing.assert_allclose(loss[i], eager_loss, **VALUE_TOL)
        np.testing.assert_allclose(grad[i], eager_grad, **VALUE_TOL)
