"""NumPy float64 re-derivation of the TrOPD losses, written from docs/methods.md alone.

An independent reference for `tropd_jax.losses`: it never imports the package. Gradients with respect to the student
logits are central finite differences in float64, taken with every stop-gradient quantity (r_t, P_t, M_t, the rollout
log-probs, the teacher top-k ids, the entropy selections) frozen at its value on the unperturbed logits.

Shapes: logits [B, T, V]; tokens, masks, log-probs [B, T]. `trust_mask` is the boolean M_t [B, T], drawn by the
caller (the tests draw it with `jax.random.bernoulli(key, P)`, the documented contract).
"""

import math

import numpy as np

METHODS = (
    'opd',
    'topk_fkl',
    'jsd',
    'entropy_opd',
    'clip_outlier',
    'mask_outlier',
    'fkl_outlier',
    'tropd',
    'tropd_mask',
    'tropd_clip',
    'eopd',
    'reopold',
    'aopd',
    'tropd_aopd',
    'full_fkl',
    'full_rkl',
)
# Methods whose per-token loss reads M_t.
TRUST_METHODS = ('fkl_outlier', 'tropd', 'tropd_mask', 'tropd_clip', 'tropd_aopd')

DEFAULTS = dict(
    k=64,
    beta=0.001,
    renormalize=False,
    topk_tail=False,
    jsd_beta=0.5,
    entropy_top_q=0.2,
    reward_floor=-2.0,
    eopd_k=16,
    eopd_entropy_threshold=0.8,
    reopold_mixture_weight=0.9,
    reopold_entropy_top_q=0.2,
    reopold_exploration_fraction=0.5,
    importance_ratio_cap=None,
    aggregation='token_mean',
)


def log_softmax(logits):
    """[..., V] -> [..., V] float64; -inf logits give -inf."""
    z = np.asarray(logits, np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def entropy(logits):
    """[..., V] -> [...]: -sum p log p with 0 log 0 = 0."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    return -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=-1)


def token_logprobs(logits, tokens):
    """[B, T, V], [B, T] -> [B, T] log-softmax at `tokens`."""
    return np.take_along_axis(log_softmax(logits), np.asarray(tokens)[..., None], axis=-1)[..., 0]


def trust_probability(student_logprobs, teacher_logprobs):
    """P_t = min(exp(tau_t - s_t), 1)."""
    with np.errstate(over='ignore'):
        return np.minimum(np.exp(np.asarray(teacher_logprobs, np.float64) - student_logprobs), 1.0)


def teacher_topk(teacher_logits, k):
    """[B, T, V] -> [B, T, k] ids of the k largest teacher logits."""
    return np.argsort(-np.asarray(teacher_logits, np.float64), axis=-1, kind='stable')[..., :k]


def _logsumexp(x):
    m = np.max(x, axis=-1, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def topk_forward_kl(student_logits, teacher_logits, k, renormalize=False, ids=None, tail=False):
    """F_t = sum_{v in K_t} p_T(v) (log p_T(v) - log p_S(v)) -> [B, T]; `ids` overrides K_t (frozen top-k).

    `tail`: plus p_T(rest) (log p_T(rest) - log p_S(rest)), rest = the vocabulary outside K_t, its mass 1 - sum_K p
    summed directly over the ids outside K_t.
    """
    ids = teacher_topk(teacher_logits, k) if ids is None else ids
    log_pt = np.take_along_axis(log_softmax(teacher_logits), ids, axis=-1)
    log_ps = np.take_along_axis(log_softmax(student_logits), ids, axis=-1)
    if renormalize:  # a proper KL between the two distributions restricted to K_t
        log_pt = log_pt - _logsumexp(log_pt)
        log_ps = log_ps - _logsumexp(log_ps)
    if tail:

        def rest(logits):
            p = np.exp(log_softmax(logits))
            inside = np.zeros(p.shape, bool)
            np.put_along_axis(inside, ids, True, axis=-1)
            with np.errstate(divide='ignore'):  # k = V: an empty tail
                return np.log(np.sum(np.where(inside, 0.0, p), axis=-1, keepdims=True))

        log_pt = np.concatenate([log_pt, rest(teacher_logits)], axis=-1)
        log_ps = np.concatenate([log_ps, rest(student_logits)], axis=-1)
    pt = np.exp(log_pt)
    with np.errstate(invalid='ignore'):
        return np.sum(np.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)


def _kl_sum(log_p, log_q):
    """sum_v p(v) (log p(v) - log q(v)) over the last axis, 0 log 0 = 0."""
    p = np.exp(log_p)
    with np.errstate(invalid='ignore'):
        return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def generalized_jsd(student_logits, teacher_logits, beta):
    """beta KL(p_T || p_M) + (1 - beta) KL(p_S || p_M), p_M = beta p_T + (1 - beta) p_S, over the full vocabulary."""
    p_s, p_t = np.exp(log_softmax(student_logits)), np.exp(log_softmax(teacher_logits))
    p_m = beta * p_t + (1.0 - beta) * p_s
    with np.errstate(divide='ignore'):
        log_s, log_t, log_m = np.log(p_s), np.log(p_t), np.log(p_m)
    return beta * _kl_sum(log_t, log_m) + (1.0 - beta) * _kl_sum(log_s, log_m)


def forward_kl(student_logits, teacher_logits):
    """KL(p_T || p_S) over the full vocabulary -> [B, T]."""
    return _kl_sum(log_softmax(teacher_logits), log_softmax(student_logits))


def reverse_kl(student_logits, teacher_logits):
    """KL(p_S || p_T) over the full vocabulary -> [B, T]."""
    return _kl_sum(log_softmax(student_logits), log_softmax(teacher_logits))


def mixture_reward(r, weight):
    """REOPOLD's reward: r where r >= 0, else log(weight exp(r) + 1 - weight) (the mixture teacher's log-ratio)."""
    return np.where(r >= 0, r, np.log(weight * np.exp(np.minimum(r, 0.0)) + 1.0 - weight))


def top_q_selection(values, eligible, q):
    """Keeps the eligible entries at least as large as the ceil(q n)-th largest of the n eligible ones."""
    n = int(eligible.sum())
    count = min(n, math.ceil(q * n - 1e-9))  # q n is exact in the tests' inputs; the epsilon guards 0.2 * 15
    if count <= 0:
        return np.zeros_like(eligible)
    threshold = np.sort(values[eligible])[::-1][count - 1]
    return eligible & (values >= threshold)


def _constants(
    student_logits,
    teacher_logits,
    tokens,
    response_mask,
    prefix_mask,
    trust_mask,
    rollout_logprobs,
    hp,
    progress=None,
    use_importance_ratio=True,
):
    """Every stop-gradient quantity, evaluated once on the unperturbed student logits."""
    response = np.asarray(response_mask) > 0
    prefix = response & (np.asarray(prefix_mask) > 0)
    on_policy = response & ~prefix
    s = token_logprobs(student_logits, tokens)
    tau = token_logprobs(teacher_logits, tokens)
    student_entropy = entropy(student_logits)
    c = dict(
        response=response,
        prefix=prefix,
        on_policy=on_policy,
        s=s,
        tau=tau,
        r=tau - s,
        P=trust_probability(s, tau),
        M=np.asarray(trust_mask, bool),
        s_rollout=(
            s if rollout_logprobs is None or not use_importance_ratio else np.asarray(rollout_logprobs, np.float64)
        ),
        student_entropy=student_entropy,
        teacher_entropy=entropy(teacher_logits),
        topk=teacher_topk(teacher_logits, hp['k']),
        eopd_topk=teacher_topk(teacher_logits, hp['eopd_k']),
        entropy_selected=top_q_selection(student_entropy, on_policy, hp['entropy_top_q']),
    )
    exploring = (0.0 if progress is None else progress) < hp['reopold_exploration_fraction']
    c['reopold_selected'] = (
        top_q_selection(student_entropy, on_policy, hp['reopold_entropy_top_q']) if exploring else on_policy
    )
    return c


def _terms(method, student_logits, teacher_logits, tokens, c, hp):
    """Per-token (pg, fkl, prefix) terms [B, T] at every position, as functions of the student logits."""
    s = token_logprobs(student_logits, tokens)
    r, M, floor = c['r'], c['M'], hp['reward_floor']
    rho = np.exp(s - c['s_rollout'])
    cap = hp['importance_ratio_cap']
    if cap is not None:  # truncated importance weight: value min(rho, C); the cap factor is frozen
        rho = rho * np.minimum(c['rho'], cap) / c['rho']
    k1 = -r * rho

    def fkl():
        return topk_forward_kl(
            student_logits, teacher_logits, hp['k'], hp['renormalize'], ids=c['topk'], tail=hp['topk_tail']
        )

    zero = np.zeros_like(s)
    if method == 'opd':
        pg, fk = k1, zero
    elif method == 'topk_fkl':
        pg, fk = zero, fkl()
    elif method == 'jsd':
        pg, fk = zero, generalized_jsd(student_logits, teacher_logits, hp['jsd_beta'])  # reported as fkl_loss
    elif method == 'full_fkl':
        pg, fk = zero, forward_kl(student_logits, teacher_logits)
    elif method == 'full_rkl':
        pg, fk = zero, reverse_kl(student_logits, teacher_logits)
    elif method == 'entropy_opd':
        pg, fk = np.where(c['entropy_selected'], k1, 0.0), zero
    elif method == 'clip_outlier':
        pg, fk = -np.maximum(r, floor) * rho, zero
    elif method == 'mask_outlier':
        pg, fk = np.where(r >= floor, k1, 0.0), zero
    elif method in ('fkl_outlier', 'tropd'):
        pg, fk = np.where(M, k1, 0.0), np.where(M, 0.0, fkl())
    elif method == 'tropd_mask':
        pg, fk = np.where(M, k1, 0.0), zero
    elif method == 'tropd_clip':
        pg, fk = np.where(M, k1, -np.maximum(r, floor) * rho), zero
    elif method == 'eopd':
        f16 = topk_forward_kl(
            student_logits, teacher_logits, hp['eopd_k'], hp['renormalize'], ids=c['eopd_topk'], tail=hp['topk_tail']
        )
        pg, fk = k1, np.where(c['teacher_entropy'] > hp['eopd_entropy_threshold'], f16, 0.0)
    elif method == 'reopold':
        reward = mixture_reward(r, hp['reopold_mixture_weight'])
        pg, fk = np.where(c['reopold_selected'], -reward * rho, 0.0), zero
    elif method == 'aopd':
        pg, fk = np.where(r > 0, k1, 0.0), np.where(r > 0, 0.0, fkl())
    elif method == 'tropd_aopd':
        pg, fk = np.where(M & (r > 0), k1, 0.0), np.where(M & (r > 0), 0.0, fkl())
    else:
        raise ValueError(f'unknown method {method!r}')
    prefix_term = hp['beta'] * (c['tau'] - s)
    on, pre = c['on_policy'], c['prefix']
    return np.where(on, pg, 0.0), np.where(on, fk, 0.0), np.where(pre, prefix_term, 0.0)


def aggregation_weights(response_mask, aggregation):
    """[B, T] weights c_t with loss = sum_t c_t l_t."""
    w = (np.asarray(response_mask) > 0).astype(np.float64)
    if aggregation == 'token_mean':
        return w / max(w.sum(), 1.0)
    if aggregation == 'seq_mean_token_mean':
        per_seq = w.sum(axis=1, keepdims=True)
        num_seqs = max(int((per_seq > 0).sum()), 1)
        return w / np.maximum(per_seq, 1.0) / num_seqs
    raise ValueError(f'unknown aggregation {aggregation!r}')


def outlier_indicator(method, c, hp):
    """[B, T] bool of the on-policy tokens that a method clips / masks / routes to FKL; None where not defined."""
    if method in ('fkl_outlier', 'tropd', 'tropd_mask', 'tropd_clip'):
        return ~c['M']
    if method in ('clip_outlier', 'mask_outlier'):
        return c['r'] < hp['reward_floor']
    if method == 'aopd':
        return c['r'] <= 0
    return None


def distillation_loss(
    method,
    student_logits,
    teacher_logits,
    tokens,
    response_mask,
    prefix_mask,
    trust_mask,
    *,
    rollout_logprobs=None,
    use_importance_ratio=True,
    progress=None,
    vocab_size=None,
    fd_step=1e-5,
    **hyperparameters,
):
    """Returns (loss, grad [B, T, V] w.r.t. the student logits, metrics dict) in float64."""
    hp = dict(DEFAULTS, **hyperparameters)
    zs, zt = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    if vocab_size is not None:
        zs, zt = zs[..., :vocab_size], zt[..., :vocab_size]
    c = _constants(
        zs, zt, tokens, response_mask, prefix_mask, trust_mask, rollout_logprobs, hp, progress, use_importance_ratio
    )
    c['rho'] = np.exp(token_logprobs(zs, tokens) - c['s_rollout'])
    weights = aggregation_weights(response_mask, hp['aggregation'])

    def per_token(z):
        return sum(_terms(method, z, zt, tokens, c, hp))

    pg, fk, pre = _terms(method, zs, zt, tokens, c, hp)
    loss = float(np.sum(weights * (pg + fk + pre)))

    # Every per-token loss depends on its own position's logits only: perturbing vocabulary entry v at every
    # position at once gives column v of every position's gradient.
    grad = np.zeros_like(zs)
    live = weights != 0
    for v in range(zs.shape[-1]):
        up, down = zs.copy(), zs.copy()
        up[..., v] += fd_step
        down[..., v] -= fd_step
        with np.errstate(invalid='ignore'):
            diff = (per_token(up) - per_token(down)) / (2 * fd_step)
        grad[..., v] = np.where(live & np.isfinite(zs[..., v]), weights * diff, 0.0)

    n_resp, n_on = c['response'].sum(), c['on_policy'].sum()

    def mean_on(x):
        return float(np.sum(np.where(c['on_policy'], x, 0.0)) / max(n_on, 1))

    def mean_prefix(x):
        return float(np.sum(np.where(c['prefix'], x, 0.0)) / max(c['prefix'].sum(), 1))

    mismatch = np.zeros_like(c['s'])
    if rollout_logprobs is not None:
        mismatch = np.abs(np.asarray(rollout_logprobs, np.float64) - c['s'])
    cap = hp['importance_ratio_cap']

    outliers = outlier_indicator(method, c, hp)
    metrics = dict(
        loss=loss,
        # Each term's mean over the tokens it applies to (the on-policy terms on on-policy tokens, the prefix
        # term on prefix tokens): n_on (pg + fkl) + n_prefix prefix = n_response loss under token_mean.
        pg_loss=mean_on(pg),
        fkl_loss=mean_on(fk),
        prefix_loss=float(pre.sum() / max(c['prefix'].sum(), 1)),
        trust_fraction=mean_on(c['M']),
        trust_probability=mean_on(c['P']),
        reward=mean_on(c['r']),
        outlier_fraction=None if outliers is None else mean_on(outliers),
        student_entropy=mean_on(c['student_entropy']),
        teacher_entropy=mean_on(c['teacher_entropy']),
        prefix_student_entropy=mean_prefix(c['student_entropy']),
        prefix_teacher_entropy=mean_prefix(c['teacher_entropy']),
        teacher_topk_mass=mean_on(topk_mass(zt, zt, hp['k'])),
        student_topk_mass=mean_on(topk_mass(zs, zt, hp['k'])),
        logprob_mismatch=mean_on(mismatch),
        logprob_mismatch_max=float(np.max(np.where(c['on_policy'], mismatch, 0))),
        ratio_truncated_fraction=0.0 if cap is None else mean_on(c['rho'] > cap),
        prefix_fraction=float(c['prefix'].sum() / max(n_resp, 1)),
        num_tokens=float(n_resp),
    )
    return loss, grad, metrics


def topk_mass(logits, teacher_logits, k):
    """[B, T]: the probability mass softmax(logits) puts on the teacher's top-k ids."""
    ids = teacher_topk(teacher_logits, k)
    return np.sum(np.take_along_axis(np.exp(log_softmax(logits)), ids, axis=-1), axis=-1)


def random_batch(rng, batch, length, vocab, *, scale=2.0, prefixes=True, empty_row=True, rollout_noise=0.0):
    """Random student/teacher logits and masks in the losses' (already shifted) layout, as float32 NumPy.

    Each row: prompt columns, then a response (a teacher prefix sampled from the teacher, then on-policy tokens
    sampled from the student), then right padding. Row 0 is left empty when `empty_row`.
    """
    student = (rng.normal(size=(batch, length, vocab)) * scale).astype(np.float32)
    teacher = (0.6 * student + rng.normal(size=(batch, length, vocab)) * scale).astype(np.float32)
    response_mask = np.zeros((batch, length), np.int32)
    prefix_mask = np.zeros((batch, length), np.int32)
    for b in range(batch):
        if empty_row and b == 0:
            continue
        start = int(rng.integers(0, length // 4 + 1))
        n = int(rng.integers((length - start + 1) // 2, length - start + 1))
        response_mask[b, start : start + n] = 1
        if prefixes:
            prefix_mask[b, start : start + int(rng.integers(0, n // 2 + 1))] = 1
    probs_s, probs_t = np.exp(log_softmax(student)), np.exp(log_softmax(teacher))
    probs = np.where(prefix_mask[..., None] > 0, probs_t, probs_s)
    tokens = np.array([[rng.choice(vocab, p=p / p.sum()) for p in row] for row in probs], np.int32)
    rollout = token_logprobs(student, tokens) + rng.normal(size=tokens.shape) * rollout_noise
    rollout = np.where(response_mask > 0, rollout, 0.0).astype(np.float32)
    return dict(
        student_logits=student,
        teacher_logits=teacher,
        tokens=tokens,
        response_mask=response_mask,
        prefix_mask=prefix_mask,
        rollout_logprobs=rollout,
    )


def distance_to_thresholds(
    method, student_logits, teacher_logits, tokens, response_mask, prefix_mask, uniforms, **hyperparameters
):
    """Smallest float64 gap, over the on-policy tokens, between a quantity and a threshold `method` compares it to.

    A float32 implementation may fall on the other side of a threshold closer than its rounding error; tests skip
    (or re-seed) such inputs. `uniforms` [B, T] are the draws of the trust mask (M_t = uniforms < P_t).
    """
    hp = dict(DEFAULTS, **hyperparameters)
    on = (np.asarray(response_mask) > 0) & ~(np.asarray(prefix_mask) > 0)
    if not on.any():
        return np.inf
    s, tau = token_logprobs(student_logits, tokens), token_logprobs(teacher_logits, tokens)
    r, p = (tau - s)[on], trust_probability(s, tau)[on]
    gaps = [np.inf]
    if method in TRUST_METHODS:
        u = np.asarray(uniforms, np.float64)[on]
        gaps += list(np.abs(u - p)[p < 1])
    if method in ('clip_outlier', 'mask_outlier', 'tropd_clip'):
        gaps += list(np.abs(r - hp['reward_floor']))
    if method in ('aopd', 'tropd_aopd'):
        gaps += list(np.abs(r))
    if method == 'eopd':
        gaps += list(np.abs(entropy(teacher_logits)[on] - hp['eopd_entropy_threshold']))
    q = {'entropy_opd': hp['entropy_top_q'], 'reopold': hp['reopold_entropy_top_q']}.get(method)
    if q is not None:
        gaps += list(np.diff(np.sort(entropy(student_logits)[on]))) + [abs(q * on.sum() - round(q * on.sum()))]
    # Every method reports the top-k mass metrics, so no method's top-k set may hinge on a near tie.
    sizes = [hp['k']] + ([hp['eopd_k']] if method == 'eopd' else [])
    vocab = np.shape(teacher_logits)[-1]
    ordered = -np.sort(-np.asarray(teacher_logits, np.float64)[on], axis=-1)
    for size in sizes:
        if size < vocab:
            gaps += list(ordered[:, size - 1] - ordered[:, size])
    return float(min(gaps))
