"""The paper's losses as pure JAX functions (docs/methods.md states every formula).

Conventions: `logits[:, t]` is the distribution of `tokens[:, t]` (the caller has already shifted). Every quantity
is computed in float32 whatever the input dtype. Teacher inputs never carry gradient.

The computation has two halves so that the fused loss (`tropd_jax.fused_loss`) can share the second:
  1. `token_statistics`: full logits -> `TokenStats` (per-token log-probs, top-k log-probs, entropies).
  2. `loss_from_stats`: `TokenStats` + masks -> every method's per-token loss, aggregation and metrics.
`distillation_loss` chains the two and is the readable definition the rest of the project is tested against.

Metrics come as `(sum, count)` pairs (`loss_from_stats`): `combine_metrics` adds up the pairs of the parts of a batch
(micro-batches) exactly, `metric_values` turns pairs into values.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

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

# Methods whose on-policy term is a divergence over the whole shared vocabulary (`full_divergence`): they need both
# full distributions of every token (the fused loss recomputes them from hidden states and both LM heads).
FULL_VOCABULARY_METHODS = ('jsd', 'full_fkl', 'full_rkl')

# Methods whose on-policy term routes tokens through the stochastic trust region M_t ~ Bernoulli(P_t).
TRUST_REGION_METHODS = ('fkl_outlier', 'tropd', 'tropd_mask', 'tropd_clip', 'tropd_aopd')

DEFAULT_HYPERPARAMETERS = dict(
    k=64,  # teacher top-k for the forward KL (paper: 64)
    beta=0.001,  # weight of the off-policy prefix term (paper: 0.001)
    renormalize=False,  # renormalise p_T and p_S over the top-k set (ours)
    topk_tail=False,  # top-k FKL over K_t plus one "rest of the vocabulary" outcome on both sides (ours)
    jsd_beta=0.5,  # GKD generalised-JSD interpolation
    entropy_top_q=0.2,  # entropy_opd: fraction of on-policy tokens kept, by student entropy
    reward_floor=-2.0,  # tau_c for clip / mask variants (ours)
    eopd_k=16,  # EOPD's top-k FKL size
    eopd_entropy_threshold=0.8,  # EOPD: FKL where teacher entropy exceeds this
    reopold_mixture_weight=0.9,  # REOPOLD: mixture teacher weight lambda; rewards floor at log(1 - lambda) (ours)
    reopold_entropy_top_q=0.2,  # REOPOLD: on-policy tokens kept while exploring, by student entropy (ours)
    reopold_exploration_fraction=0.5,  # REOPOLD: fraction of training in the exploration phase (ours)
    importance_ratio_cap=None,  # truncated importance weight: rho_t capped at this value (None = no cap)
    aggregation='token_mean',  # or "seq_mean_token_mean"
)

AGGREGATIONS = ('token_mean', 'seq_mean_token_mean')

# {metric name: (sum, count)} float32 scalars (or arrays with a leading axis, one pair per part of a batch).
MetricPairs = dict[str, tuple[jax.Array, jax.Array]]


class TokenStats(NamedTuple):
    """Per-token statistics all methods are computed from. Shapes `[B, T]` unless stated.

    student_logprobs: s_t = log pi_S(y_t) (carries gradient).
    teacher_logprobs: tau_t = log pi_T(y_t).
    student_topk_logprobs: [B, T, k] log p_S at the teacher's top-k ids (carries gradient).
    teacher_topk_logprobs: [B, T, k] log p_T at its top-k ids, sorted descending.
    student_entropy, teacher_entropy: full shared-vocabulary entropies (no gradient).
    full_divergence: the per-token divergence of a `FULL_VOCABULARY_METHODS` method over the whole shared vocabulary
      (carries gradient), or None for the other methods.
    """

    student_logprobs: jax.Array
    teacher_logprobs: jax.Array
    student_topk_logprobs: jax.Array
    teacher_topk_logprobs: jax.Array
    student_entropy: jax.Array
    teacher_entropy: jax.Array
    full_divergence: jax.Array | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Per-token quantities on full logits.


def _check_logits_tokens(logits: jax.Array, tokens: jax.Array, name: str = 'logits') -> None:
    if logits.ndim != 3:
        raise ValueError(f'{name} must be [B, T, V], got shape {logits.shape}')
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f'tokens must be [B, T] = {logits.shape[:2]} to match {name}, got shape {tokens.shape}')


def log_softmax(logits: jax.Array) -> jax.Array:
    """float32 log-softmax over the last axis; rows of all -inf give -inf, not NaN."""
    logits = logits.astype(jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    shifted = logits - jax.lax.stop_gradient(m)
    sum_exp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    return shifted - jnp.log(jnp.maximum(sum_exp, jnp.finfo(jnp.float32).tiny))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens] in float32. logits [B, T, V], tokens [B, T] -> [B, T]."""
    _check_logits_tokens(logits, tokens)
    logp = log_softmax(logits)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) in float32, [B, T, V] -> [B, T]; -inf entries contribute 0."""
    logp = log_softmax(logits)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def trust_probability(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
    """P_t = min(exp(tau_t - sg(s_t)), 1), [B, T]. No gradient (it only routes tokens)."""
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f'student_logprobs {student_logprobs.shape} and teacher_logprobs {teacher_logprobs.shape} differ in shape'
        )
    delta = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32) - student_logprobs.astype(jnp.float32))
    return jnp.exp(jnp.minimum(delta, 0.0))


def _finite_logprobs(logp: jax.Array) -> jax.Array:
    # -inf log-probs (masked vocabulary entries) would give 0 * -inf = NaN in p log p; clamp to a finite floor.
    return jnp.maximum(logp, jnp.finfo(jnp.float32).min / 4)


def _log_tail(topk_logprobs: jax.Array) -> jax.Array:
    """log(1 - sum_k exp(topk_logprobs)), the log-mass outside the top-k set: [B, T, k] -> [B, T, 1].

    log1mexp of the set's log-mass, accurate at both ends. When the set holds all the mass in float32 (the rest is
    below ~1e-7) it is clamped to log(tiny) ~ -87, and its gradient there is dropped. The inner `where`s keep the
    branch not taken finite, so no NaN reaches the gradient."""
    log_mass = jnp.minimum(jax.nn.logsumexp(topk_logprobs, axis=-1, keepdims=True), 0.0)
    near_one = log_mass > -math.log(2.0)
    return jnp.where(
        near_one,
        jnp.log(jnp.maximum(-jnp.expm1(jnp.where(near_one, log_mass, -1.0)), jnp.finfo(jnp.float32).tiny)),
        jnp.log1p(-jnp.exp(jnp.where(near_one, -1.0, log_mass))),
    )


def topk_kl_from_logprobs(
    student_topk_logprobs: jax.Array,
    teacher_topk_logprobs: jax.Array,
    renormalize: bool = False,
    tail: bool = False,
) -> jax.Array:
    """F_t = sum_{v in K_t} p_T(v) (log p_T(v) - log p_S(v)), from [B, T, k] log-probs -> [B, T].

    `tail=True` adds the outcome "not in K_t" on both sides, p_T(tail) (log p_T(tail) - log p_S(tail)) with
    p(tail) = 1 - sum_{K_t} p: a KL between two distributions over k + 1 outcomes, so it is >= 0 and its gradient
    is zero at p_S = p_T (without it the gradient there is -p_j (1[j in K_t] - p_T(K_t)), the truncation bias).
    """
    s = student_topk_logprobs.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_topk_logprobs.astype(jnp.float32))
    if renormalize:
        s = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
        t = t - jax.nn.logsumexp(t, axis=-1, keepdims=True)
    if tail:
        s = jnp.concatenate([s, _log_tail(s)], axis=-1)
        t = jnp.concatenate([t, _log_tail(t)], axis=-1)
    p_t = jnp.exp(t)
    return jnp.sum(jnp.where(p_t > 0, p_t * (_finite_logprobs(t) - _finite_logprobs(s)), 0.0), axis=-1)


def teacher_topk(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The teacher's top-k ids and full-vocabulary log-probs, sorted descending: ([B, T, k] int32, [B, T, k])."""
    logp = jax.lax.stop_gradient(log_softmax(teacher_logits))
    values, ids = jax.lax.top_k(logp, k)
    return ids.astype(jnp.int32), values


def topk_forward_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, k: int, renormalize: bool = False, tail: bool = False
) -> jax.Array:
    """Top-k forward KL F_t of SPEC.md. [B, T, V] x 2 -> [B, T]; gradient flows through log p_S on K_t only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} differ')
    _check_k(k, student_logits.shape[-1])
    ids, teacher_lp = teacher_topk(teacher_logits, k)
    student_lp = jnp.take_along_axis(log_softmax(student_logits), ids, axis=-1)
    return topk_kl_from_logprobs(student_lp, teacher_lp, renormalize, tail)


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or k < 1 or k > vocab:
        raise ValueError(f'k={k!r} must be an integer in [1, vocab size {vocab}]')


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, beta_j: float) -> jax.Array:
    """GKD generalised JSD over the full vocabulary, [B, T, V] x 2 -> [B, T]:

    beta_j KL(p_T || p_M) + (1 - beta_j) KL(p_S || p_M),  p_M = beta_j p_T + (1 - beta_j) p_S.

    Differentiated exactly through p_S (both terms depend on it); the teacher carries no gradient.
    """
    log_ps = _finite_logprobs(log_softmax(student_logits))
    log_pt = jax.lax.stop_gradient(_finite_logprobs(log_softmax(teacher_logits)))
    log_pm = jnp.logaddexp(jnp.log(beta_j) + log_pt, jnp.log1p(-beta_j) + log_ps)
    p_t, p_s = jnp.exp(log_pt), jnp.exp(log_ps)
    teacher_term = jnp.sum(jnp.where(p_t > 0, p_t * (log_pt - log_pm), 0.0), axis=-1)
    student_term = jnp.sum(jnp.where(p_s > 0, p_s * (log_ps - log_pm), 0.0), axis=-1)
    return beta_j * teacher_term + (1.0 - beta_j) * student_term


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """KL(p_T || p_S) over the full vocabulary, [B, T, V] x 2 -> [B, T]; gradient through p_S only."""
    log_ps = _finite_logprobs(log_softmax(student_logits))
    log_pt = jax.lax.stop_gradient(_finite_logprobs(log_softmax(teacher_logits)))
    p_t = jnp.exp(log_pt)
    return jnp.sum(jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0), axis=-1)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """KL(p_S || p_T) over the full vocabulary, [B, T, V] x 2 -> [B, T]; differentiated exactly through p_S (the
    expectation over p_S included, unlike a sampled-token estimate)."""
    log_ps = _finite_logprobs(log_softmax(student_logits))
    log_pt = jax.lax.stop_gradient(_finite_logprobs(log_softmax(teacher_logits)))
    p_s = jnp.exp(log_ps)
    return jnp.sum(jnp.where(p_s > 0, p_s * (log_ps - log_pt), 0.0), axis=-1)


def full_divergence(method: str, student_logits: jax.Array, teacher_logits: jax.Array, jsd_beta: float) -> jax.Array:
    """The per-token divergence of a `FULL_VOCABULARY_METHODS` method on full logits, [B, T, V] x 2 -> [B, T]."""
    if method == 'jsd':
        return generalized_jsd(student_logits, teacher_logits, jsd_beta)
    if method == 'full_fkl':
        return forward_kl(student_logits, teacher_logits)
    if method == 'full_rkl':
        return reverse_kl(student_logits, teacher_logits)
    raise ValueError(f'method {method!r} has no full-vocabulary divergence; those that do: {FULL_VOCABULARY_METHODS}')


def token_statistics(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    k: int,
    divergence: str | None = None,
    jsd_beta: float = DEFAULT_HYPERPARAMETERS['jsd_beta'],
) -> TokenStats:
    """Full logits [B, T, V] (same V) + tokens [B, T] -> TokenStats with top-k size k, and `full_divergence` of the
    method `divergence` (one of `FULL_VOCABULARY_METHODS`; None = not computed)."""
    _check_k(k, student_logits.shape[-1])
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    student_logp = log_softmax(student_logits)
    teacher_logp = log_softmax(teacher_logits)
    idx = tokens[..., None].astype(jnp.int32)
    ids, teacher_topk_lp = teacher_topk(teacher_logits, k)
    return TokenStats(
        student_logprobs=jnp.take_along_axis(student_logp, idx, axis=-1)[..., 0],
        teacher_logprobs=jnp.take_along_axis(teacher_logp, idx, axis=-1)[..., 0],
        student_topk_logprobs=jnp.take_along_axis(student_logp, ids, axis=-1),
        teacher_topk_logprobs=teacher_topk_lp,
        student_entropy=jax.lax.stop_gradient(entropy(student_logits)),
        teacher_entropy=entropy(teacher_logits),
        full_divergence=(
            None if divergence is None else full_divergence(divergence, student_logits, teacher_logits, jsd_beta)
        ),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Methods on TokenStats.


def _entropy_selection(student_entropy: jax.Array, on_policy: jax.Array, top_q: float) -> jax.Array:
    """1 on the on-policy tokens whose entropy is at least the ceil(q n)-th largest of the batch's n; [B, T]."""
    flat = jnp.where(on_policy > 0, student_entropy, -jnp.inf).reshape(-1)
    n = jnp.sum(on_policy > 0)
    keep = jnp.maximum(jnp.ceil(top_q * n).astype(jnp.int32), 1)
    threshold = jnp.sort(flat)[::-1][jnp.minimum(keep, flat.shape[0]) - 1]
    return ((student_entropy >= threshold) & (on_policy > 0)).astype(jnp.float32)


def mixture_clipped_reward(reward: jax.Array, mixture_weight: float) -> jax.Array:
    """REOPOLD's reward (our reading, docs/methods.md): r_t where r_t >= 0, else the reward against the mixture
    teacher lambda pi_T + (1 - lambda) pi_S, log(lambda exp(r_t) + 1 - lambda) >= max(r_t, log(1 - lambda)). [B, T]."""
    mixed = jnp.log(mixture_weight * jnp.exp(jnp.minimum(reward, 0.0)) + (1.0 - mixture_weight))
    return jnp.where(reward >= 0, reward, mixed)


def _masked_pair(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of the mean of x [B, T] over the tokens of w [B, T]."""
    return jnp.sum(x * w), jnp.sum(w)


def keyed_uniforms(key: jax.Array, rollout: jax.Array, position: jax.Array) -> jax.Array:
    """[B, T] float32 uniforms on [0, 1), one per (rollout index, position) pair, both `[B, T]` int: the draw of
    `fold_in(fold_in(key, rollout), position)`. A token draws the same number wherever it sits in the batch (packed
    or not, in any micro-batch)."""
    draw = lambda r, p: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, r), p))
    return jax.vmap(jax.vmap(draw))(rollout.astype(jnp.int32), position.astype(jnp.int32))


def _sequence_pair(
    per_token: jax.Array, response: jax.Array, segment_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(sum over sequences of each one's token-mean of `per_token` [B, T], number of sequences with response tokens).
    A sequence is a row, or with `segment_ids` [B, T] (packed rows: 1, 2, ... per row, 0 on padding) a segment of a
    row."""
    if segment_ids is None:
        sums, counts = jnp.sum(per_token, axis=-1), jnp.sum(response, axis=-1)
    else:
        b, t = per_token.shape
        ids = (jnp.arange(b)[:, None] * (t + 2) + jnp.clip(segment_ids, 0, t + 1)).reshape(-1)
        sums = jax.ops.segment_sum(per_token.reshape(-1), ids, num_segments=b * (t + 2))
        counts = jax.ops.segment_sum(response.reshape(-1), ids, num_segments=b * (t + 2))
    has_tokens = (counts > 0).astype(jnp.float32)
    return jnp.sum(sums / jnp.maximum(counts, 1.0) * has_tokens), jnp.sum(has_tokens)


def metric_values(pairs: MetricPairs) -> dict[str, jax.Array]:
    """The metrics' values from their (sum, count) pairs: `{name: sum / max(count, 1)}` (see `loss_from_stats`)."""
    return {name: total / jnp.maximum(count, 1.0) for name, (total, count) in pairs.items()}


def combine_metrics(pairs: MetricPairs) -> MetricPairs:
    """The pairs of n disjoint parts of a batch, each entry stacked along a leading axis [n] (the outputs of a
    `lax.scan`, or `jnp.stack` of per-part pairs) -> the pairs of the whole batch: sums and counts add, except that
    a maximum (a metric named `*_max`) takes the largest part's."""
    return {
        name: (jnp.max(total, axis=0) if name.endswith('_max') else jnp.sum(total, axis=0), jnp.sum(count, axis=0))
        for name, (total, count) in pairs.items()
    }


def loss_from_stats(
    method: str,
    stats: TokenStats,
    response_mask: jax.Array,
    prefix_mask: jax.Array,
    key: jax.Array | None,
    *,
    rollout_logprobs: jax.Array | None = None,
    use_importance_ratio: bool = True,
    progress: float | jax.Array | None = None,
    draw_ids: tuple[jax.Array, jax.Array] | None = None,
    segment_ids: jax.Array | None = None,
    **hyperparameters,
) -> tuple[jax.Array, MetricPairs]:
    """Every method's loss from per-token statistics (docs/methods.md). Masks [B, T] -> (scalar loss, metrics).

    The metrics are float32 `(sum, count)` pairs of scalars, without gradient, so that the parts of a batch (micro-
    batches, devices, steps) combine exactly without knowing what each metric is averaged over (`combine_metrics`);
    `metric_values` turns them into values, `sum / max(count, 1)`. A mean over some tokens is (sum over them, their
    number), `loss` is the loss's own numerator and denominator (tokens, or sequences with `seq_mean_token_mean`).
    `num_tokens` (a total) and `logprob_mismatch_max` (a maximum) have count 0, so their value is their sum; a
    metric named `*_max` combines by the larger sum, not by adding.

    `rollout_logprobs` [B, T] are the sampler's log-probs: the importance ratio's denominator when
    `use_importance_ratio`, and always the source of the `logprob_mismatch*` metrics. `progress` (step / total steps,
    a scalar; None = 0) drives REOPOLD's exploration-to-refinement schedule. `draw_ids` = (rollout index, position),
    each [B, T] int: M_t is drawn from `keyed_uniforms(key, *draw_ids)` (the same draw for a token wherever it sits),
    not by array position. `segment_ids` [B, T]: packed rows (`tropd_jax.packing`), for `seq_mean_token_mean`.
    """
    hp = resolve_hyperparameters(method, hyperparameters)
    shape = stats.student_logprobs.shape
    for name, x in (('response_mask', response_mask), ('prefix_mask', prefix_mask)):
        if x.shape != shape:
            raise ValueError(f'{name} must be [B, T] = {shape}, got shape {x.shape}')
    if rollout_logprobs is not None and rollout_logprobs.shape != shape:
        raise ValueError(f'rollout_logprobs must be [B, T] = {shape}, got shape {rollout_logprobs.shape}')
    needed = topk_size(method, hyperparameters)
    if stats.teacher_topk_logprobs.shape[-1] < needed:
        raise ValueError(
            f'method {method!r} needs {needed} teacher top-k entries, got {stats.teacher_topk_logprobs.shape[-1]}'
        )

    response = response_mask.astype(jnp.float32)
    prefix = prefix_mask.astype(jnp.float32) * response
    on_policy = response - prefix

    s = stats.student_logprobs.astype(jnp.float32)
    tau = jax.lax.stop_gradient(stats.teacher_logprobs.astype(jnp.float32))
    s_finite = _finite_logprobs(s)
    tau_finite = _finite_logprobs(tau)
    reward = jax.lax.stop_gradient(tau_finite - s_finite)  # r_t
    behaviour = s if rollout_logprobs is None or not use_importance_ratio else rollout_logprobs.astype(jnp.float32)
    ratio = jnp.exp(s_finite - jax.lax.stop_gradient(_finite_logprobs(behaviour)))  # rho_t, value 1 on-policy
    cap = hp['importance_ratio_cap']
    truncated = jnp.zeros(shape, jnp.float32)
    if cap is not None:
        # Truncated importance weight: value min(rho_t, C), gradient min(rho_t, C) grad s_t (the weight is capped,
        # the score-function direction is kept).
        capped = jax.lax.stop_gradient(jnp.minimum(ratio, cap) / jnp.maximum(ratio, jnp.finfo(jnp.float32).tiny))
        truncated = jax.lax.stop_gradient((ratio > cap).astype(jnp.float32))
        ratio = ratio * capped
    trust_p = trust_probability(s_finite, tau_finite)  # P_t
    k = hp['k']
    student_topk, teacher_topk_lp = stats.student_topk_logprobs[..., :k], stats.teacher_topk_logprobs[..., :k]
    fkl = topk_kl_from_logprobs(student_topk, teacher_topk_lp, hp['renormalize'], hp['topk_tail'])
    if method in TRUST_REGION_METHODS:
        if key is None:
            raise ValueError(f'method {method!r} draws the trust mask M_t ~ Bernoulli(P_t) and needs a PRNG key')
        if draw_ids is None:
            trust = jax.random.bernoulli(key, trust_p).astype(jnp.float32)  # M_t
        else:
            trust = (keyed_uniforms(key, *draw_ids) < trust_p).astype(jnp.float32)
    else:
        trust = jnp.ones(shape, jnp.float32)

    pg = -reward * ratio  # the K1 policy-gradient term -r_t rho_t
    floor = hp['reward_floor']
    zero = jnp.zeros(shape, jnp.float32)
    pg_term, fkl_term, routed = zero, zero, zero  # routed: tokens clipped / masked / sent to FKL
    if method == 'opd':
        pg_term = pg
    elif method == 'topk_fkl':
        fkl_term = fkl
    elif method in FULL_VOCABULARY_METHODS:
        if stats.full_divergence is None:
            raise ValueError(f'method {method!r} needs TokenStats.full_divergence (its divergence over the vocabulary)')
        fkl_term = stats.full_divergence
    elif method == 'entropy_opd':
        selected = _entropy_selection(stats.student_entropy, on_policy, hp['entropy_top_q'])
        pg_term = selected * pg
        routed = 1.0 - selected
    elif method == 'clip_outlier':
        clipped = reward < floor
        pg_term = -jnp.maximum(reward, floor) * ratio
        routed = clipped.astype(jnp.float32)
    elif method == 'reopold':
        # Exploration (progress < fraction): only the top-q student-entropy tokens get the (mixture-clipped) reward;
        # refinement: every on-policy token does.
        progress = jnp.asarray(0.0 if progress is None else progress, jnp.float32)
        exploring = progress < hp['reopold_exploration_fraction']
        selected = _entropy_selection(stats.student_entropy, on_policy, hp['reopold_entropy_top_q'])
        selected = jnp.where(exploring, selected, 1.0)
        pg_term = -selected * mixture_clipped_reward(reward, hp['reopold_mixture_weight']) * ratio
        routed = 1.0 - selected * (reward >= 0)
    elif method == 'mask_outlier':
        kept = (reward >= floor).astype(jnp.float32)
        pg_term = kept * pg
        routed = 1.0 - kept
    elif method in ('fkl_outlier', 'tropd'):
        pg_term = trust * pg
        fkl_term = (1.0 - trust) * fkl
        routed = 1.0 - trust
    elif method == 'tropd_mask':
        pg_term = trust * pg
        routed = 1.0 - trust
    elif method == 'tropd_clip':
        pg_term = trust * pg + (1.0 - trust) * (-jnp.maximum(reward, floor) * ratio)
        routed = 1.0 - trust
    elif method == 'eopd':
        kk = hp['eopd_k']
        uncertain = (stats.teacher_entropy > hp['eopd_entropy_threshold']).astype(jnp.float32)
        pg_term = pg
        fkl_term = uncertain * topk_kl_from_logprobs(
            stats.student_topk_logprobs[..., :kk],
            stats.teacher_topk_logprobs[..., :kk],
            hp['renormalize'],
            hp['topk_tail'],
        )
        routed = uncertain
    elif method in ('aopd', 'tropd_aopd'):
        positive = (reward > 0).astype(jnp.float32)
        pg_term = trust * positive * pg
        fkl_term = (1.0 - trust * positive) * fkl
        routed = 1.0 - trust * positive

    prefix_term = hp['beta'] * (tau_finite - s_finite)  # K1 estimate of KL(pi_T || pi_S) on teacher samples
    per_token = on_policy * (pg_term + fkl_term) + prefix * prefix_term

    if hp['aggregation'] == 'token_mean':
        loss_sum, loss_count = jnp.sum(per_token), jnp.sum(response)
    else:
        loss_sum, loss_count = _sequence_pair(per_token, response, segment_ids)
    loss = loss_sum / jnp.maximum(loss_count, 1.0)

    # |log pi_sampler - log pi_learner| per on-policy token (0 without sampler log-probs).
    mismatch = zero
    if rollout_logprobs is not None:
        mismatch = jnp.abs(_finite_logprobs(rollout_logprobs.astype(jnp.float32)) - s_finite)
    none = jnp.zeros((), jnp.float32)  # the count of a metric that is not a mean
    metrics = dict(
        loss=(loss_sum, loss_count),
        pg_loss=_masked_pair(pg_term, on_policy),
        fkl_loss=_masked_pair(fkl_term, on_policy),
        prefix_loss=_masked_pair(prefix_term, prefix),
        trust_fraction=_masked_pair(trust, on_policy),
        trust_probability=_masked_pair(trust_p, on_policy),
        reward=_masked_pair(reward, on_policy),
        outlier_fraction=_masked_pair(routed, on_policy),
        # Entropies on on-policy tokens (what the student generated), and on the teacher-written prefix apart.
        student_entropy=_masked_pair(stats.student_entropy, on_policy),
        teacher_entropy=_masked_pair(stats.teacher_entropy, on_policy),
        prefix_student_entropy=_masked_pair(stats.student_entropy, prefix),
        prefix_teacher_entropy=_masked_pair(stats.teacher_entropy, prefix),
        # How much the top-k statistics see: the teacher's mass inside its top-k K_t, and the student's mass on it.
        teacher_topk_mass=_masked_pair(jnp.sum(jnp.exp(teacher_topk_lp), axis=-1), on_policy),
        student_topk_mass=_masked_pair(jnp.sum(jnp.exp(student_topk), axis=-1), on_policy),
        logprob_mismatch=_masked_pair(mismatch, on_policy),
        logprob_mismatch_max=(jnp.max(mismatch * on_policy), none),
        ratio_truncated_fraction=_masked_pair(truncated, on_policy),
        prefix_fraction=(jnp.sum(prefix), jnp.sum(response)),
        num_tokens=(jnp.sum(response), none),
    )
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def resolve_hyperparameters(method: str, hyperparameters: dict) -> dict:
    """Defaults of docs/methods.md updated with `hyperparameters`; unknown names or bad values raise ValueError."""
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}; expected one of {", ".join(METHODS)}')
    unknown = sorted(set(hyperparameters) - set(DEFAULT_HYPERPARAMETERS))
    if unknown:
        raise ValueError(f'unknown loss hyperparameter(s) {unknown}; known: {sorted(DEFAULT_HYPERPARAMETERS)}')
    hp = {**DEFAULT_HYPERPARAMETERS, **hyperparameters}
    if hp['aggregation'] not in AGGREGATIONS:
        raise ValueError(f'aggregation={hp["aggregation"]!r} must be one of {AGGREGATIONS}')
    for name in ('renormalize', 'topk_tail'):
        if not isinstance(hp[name], bool):
            raise ValueError(f'{name}={hp[name]!r} must be True or False')
    if hp['renormalize'] and hp['topk_tail']:
        raise ValueError('renormalize=True and topk_tail=True exclude each other: renormalising leaves no tail mass')
    if not 0.0 < hp['jsd_beta'] < 1.0:
        raise ValueError(f'jsd_beta={hp["jsd_beta"]!r} must be in (0, 1)')
    for name in ('entropy_top_q', 'reopold_entropy_top_q'):
        q = hp[name]
        if not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
            raise ValueError(f'{name}={q!r} must be in (0, 1]')
    if not isinstance(hp['reopold_mixture_weight'], (int, float)) or not 0.0 < hp['reopold_mixture_weight'] < 1.0:
        raise ValueError(f'reopold_mixture_weight={hp["reopold_mixture_weight"]!r} must be in (0, 1)')
    fraction = hp['reopold_exploration_fraction']
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f'reopold_exploration_fraction={fraction!r} must be in [0, 1]')
    cap = hp['importance_ratio_cap']
    if cap is not None and (not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 1.0):
        raise ValueError(f'importance_ratio_cap={cap!r} must be None or a finite value >= 1')
    for name in ('k', 'eopd_k'):
        if not isinstance(hp[name], int) or hp[name] < 1:
            raise ValueError(f'{name}={hp[name]!r} must be a positive integer')
    if not math.isfinite(hp['reward_floor']) or hp['reward_floor'] > 0:
        raise ValueError(f'reward_floor={hp["reward_floor"]!r} must be a finite value <= 0')
    return hp


def topk_size(method: str, hyperparameters: dict) -> int:
    """How many teacher top-k entries a method needs (the size the teacher pass must keep)."""
    hp = resolve_hyperparameters(method, hyperparameters)
    return max(hp['k'], hp['eopd_k']) if method == 'eopd' else hp['k']


# The keyword arguments of `loss_from_stats` that are not hyperparameters; the entry points on logits or hidden
# states take them all as `**options` and pass them on.
# The keyword-only options of `loss_from_stats` (read from its signature, so the two never disagree); every other
# keyword argument of the losses is a hyperparameter.
LOSS_OPTIONS = tuple(
    name for name, p in inspect.signature(loss_from_stats).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def hyperparameters_of(options: dict) -> dict:
    """The hyperparameters among `loss_from_stats` keyword arguments (every name not in `LOSS_OPTIONS`)."""
    return {name: value for name, value in options.items() if name not in LOSS_OPTIONS}


def distillation_loss(
    method: str,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    prefix_mask: jax.Array,
    key: jax.Array | None,
    *,
    vocab_size: int | None = None,
    **options,
) -> tuple[jax.Array, MetricPairs]:
    """The batch loss of `method` (docs/methods.md) on full logits.

    Args:
      student_logits: [B, T, V_S], any float dtype; carries gradient.
      teacher_logits: [B, T, V_T]; stop-gradient is applied.
      tokens: [B, T] int, the realised tokens (logits[:, t] is the distribution of tokens[:, t]).
      response_mask: [B, T], 1 on every response token (teacher prefix and on-policy).
      prefix_mask: [B, T], 1 on teacher-written prefix tokens.
      key: PRNG key of the Bernoulli trust mask (may be None for methods without a trust region).
      vocab_size: the shared real vocabulary; both logits are sliced to it. None needs V_S == V_T.
      **options: the keyword arguments of `loss_from_stats`:
        rollout_logprobs: [B, T] log-probs of the policy that sampled the tokens (importance ratio, mismatch
          metrics); None = on-policy.
        use_importance_ratio: False keeps rho_t = 1 in value (rollout_logprobs then only feed the metrics).
        progress: step / total steps (REOPOLD's schedule); None = 0.
        draw_ids: (rollout index [B, T], position [B, T]) int: M_t keyed by them; None = by array position.
        segment_ids: [B, T] int segment of each token in packed rows (0 = padding); None = one sequence per row.
        and the hyperparameters: see `DEFAULT_HYPERPARAMETERS`.
    Returns:
      (scalar float32 loss, {name: (sum, count)} float32 scalar metrics; `metric_values` gives their values).
    """
    hp = resolve_hyperparameters(method, hyperparameters_of(options))
    _check_logits_tokens(student_logits, tokens, 'student_logits')
    _check_logits_tokens(teacher_logits, tokens, 'teacher_logits')
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f'student vocabulary {v_s} != teacher vocabulary {v_t}: pass vocab_size= the shared real vocabulary'
            )
    else:
        if not 0 < vocab_size <= min(v_s, v_t):
            raise ValueError(f'vocab_size={vocab_size} must be in [1, min(student {v_s}, teacher {v_t})]')
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    divergence = method if method in FULL_VOCABULARY_METHODS else None
    stats = token_statistics(student_logits, teacher_logits, tokens, topk_size(method, hp), divergence, hp['jsd_beta'])
    return loss_from_stats(method, stats, response_mask, prefix_mask, key, **options)
