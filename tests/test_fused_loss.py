"""tropd_jax.fused_loss against the reference loss on full logits (and the teacher pass against NumPy float64).

For every method, loss, metrics and gradients w.r.t. the student hidden states and LM head equal
`losses.distillation_loss(hidden @ head, teacher_hidden @ teacher_head, ...)` in float32, on one device and on a
2x2x2 ('data', 'fsdp', 'tensor') mesh of fake CPU devices (a subprocess: XLA_FLAGS must precede jax's start), with
chunk sizes that do not divide the tokens, and student / teacher heads padded to different sizes (100 and 96 rows)
around a shared real vocabulary of 90. The padding rows are scaled up so any leak into a softmax or top-k shows.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import losses_reference as ref
import numpy as np
import pytest

from tropd_jax import fused_loss, losses

B, T, H = 2, 11, 16
H_TEACHER = 12  # the teacher's hidden size differs, as a larger teacher's does
STUDENT_ROWS, TEACHER_ROWS, VOCAB = 100, 96, 90
K = 8
HP = dict(k=K, eopd_k=4, beta=0.05, entropy_top_q=0.3, reward_floor=-1.0, reopold_entropy_top_q=0.5)
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def make_data(length=T, seed=0):
    """Hidden states, padded heads, tokens, masks, rollout log-probs (NumPy float32) and hyperparameters."""
    rng = np.random.default_rng(seed)

    def head(rows, hidden=H):
        w = rng.normal(size=(hidden, rows)) * 0.5
        w[:, VOCAB:] *= 3.0  # padding rows: large logits that must never count
        return w.astype(np.float32)

    d = dict(
        student_hidden=rng.normal(size=(B, length, H)).astype(np.float32),
        student_head=head(STUDENT_ROWS),
        teacher_hidden=rng.normal(size=(B, length, H_TEACHER)).astype(np.float32),
        teacher_head=head(TEACHER_ROWS, H_TEACHER),
        tokens=rng.integers(0, VOCAB, (B, length)).astype(np.int32),
    )
    t = np.arange(length)[None]
    d['response_mask'] = ((t >= np.array([[2], [3]])) & (t < np.array([[length], [length - 2]]))).astype(np.float32)
    d['prefix_mask'] = d['response_mask'] * (t < np.array([[5], [0]]))
    student_logits = (d['student_hidden'] @ d['student_head'])[..., :VOCAB]
    teacher_logits = (d['teacher_hidden'] @ d['teacher_head'])[..., :VOCAB]
    s = ref.token_logprobs(student_logits, d['tokens'])
    d['rollout_logprobs'] = ((s + rng.normal(0.0, 0.3, s.shape)) * d['response_mask']).astype(np.float32)
    # An EOPD threshold at the median teacher entropy splits the batch.
    hp = dict(HP, eopd_entropy_threshold=float(np.median(ref.entropy(teacher_logits))))
    # M_t ~ Bernoulli(P_t) must not hinge on float32 rounding of P_t.
    key = jax.random.key(3)
    p = ref.trust_probability(s, ref.token_logprobs(teacher_logits, d['tokens']))
    u = np.asarray(jax.random.uniform(key, p.shape, jnp.float32), np.float64)
    assert not ((np.abs(u - p) < 1e-4) & (p < 1)).any(), 'test data: a trust draw sits on P_t; pick another key'
    return d, hp, key


def reference(methods, d, hp, key):
    """{method: (loss, metrics, (d hidden, d head))} of `losses.distillation_loss` on full logits."""

    def run(method, hidden, head):
        return losses.distillation_loss(
            method,
            hidden @ head,
            d['teacher_hidden'] @ d['teacher_head'],
            d['tokens'],
            d['response_mask'],
            d['prefix_mask'],
            key,
            rollout_logprobs=d['rollout_logprobs'],
            vocab_size=VOCAB,
            **hp,
        )

    @jax.jit
    def all_methods(hidden, head):
        return {
            m: jax.value_and_grad(lambda h, w: run(m, h, w), argnums=(0, 1), has_aux=True)(hidden, head)
            for m in methods
        }

    return jax.device_get(all_methods(d['student_hidden'], d['student_head']))


def fused(methods, d, hp, key, chunk_size, put=lambda name, x: x):
    """Same as `reference` through `teacher_pass` + `fused_distillation_loss`; `put` places each input."""
    args = {name: put(name, x) for name, x in d.items()}

    @jax.jit
    def all_methods(a):
        full = any(m in losses.FULL_VOCABULARY_METHODS for m in methods)
        targets = fused_loss.teacher_pass(
            a['teacher_hidden'],
            a['teacher_head'],
            a['tokens'],
            k=K,
            vocab_size=VOCAB,
            chunk_size=chunk_size,
            full_vocabulary=full,
        )

        def run(method, hidden, head):
            return fused_loss.fused_distillation_loss(
                method,
                hidden,
                head,
                targets,
                a['tokens'],
                a['response_mask'],
                a['prefix_mask'],
                key,
                rollout_logprobs=a['rollout_logprobs'],
                vocab_size=VOCAB,
                chunk_size=chunk_size,
                **hp,
            )

        return {
            m: jax.value_and_grad(lambda h, w: run(m, h, w), argnums=(0, 1), has_aux=True)(
                a['student_hidden'], a['student_head']
            )
            for m in methods
        }

    return jax.device_get(all_methods(args)), all_methods, args


def assert_same(expected, actual):
    (loss, metrics), grads = expected
    (f_loss, f_metrics), f_grads = actual
    np.testing.assert_allclose(f_loss, loss, **VALUE_TOL)
    for name, value in losses.metric_values(metrics).items():
        np.testing.assert_allclose(losses.metric_values(f_metrics)[name], value, **VALUE_TOL, err_msg=name)
    for name, g, f_g in zip(('hidden', 'head'), grads, f_grads):
        assert np.abs(g).max() > 0, f'reference gradient w.r.t. the {name} is zero: the test would be vacuous'
        np.testing.assert_allclose(f_g, g, **GRAD_TOL, err_msg=f'gradient w.r.t. the {name}')


# ---------------------------------------------------------------------------------------------------------------------
# One device.


@pytest.fixture(scope='module')
def data():
    return make_data()


@pytest.fixture(scope='module')
def single_device(data):
    d, hp, key = data
    # chunk_size 6 with B = 2: 3 positions per row per chunk, 4 chunks over T = 11 (one padded position per row).
    return reference(losses.METHODS, d, hp, key), fused(losses.METHODS, d, hp, key, chunk_size=6)[0]


@pytest.mark.parametrize('method', losses.METHODS)
def test_fused_loss_equals_reference(single_device, method):
    expected, actual = single_device
    assert_same(expected[method], actual[method])


# 1: one position per row per chunk (11 chunks); 5: 2 per row, 6 chunks, one padded position; 1000: a single chunk.
@pytest.mark.parametrize('chunk_size', [1, 5, 1000])
def test_chunk_sizes(data, single_device, chunk_size):
    d, hp, key = data
    expected = single_device[0]['tropd']
    assert_same(expected, fused(['tropd'], d, hp, key, chunk_size)[0]['tropd'])


def test_topk_tail_equals_reference(data):
    """The top-k FKL with its tail outcome (`topk_tail=True`) in every method that has a top-k FKL term."""
    d, hp, key = data
    methods, hp = ('topk_fkl', 'tropd', 'eopd', 'aopd'), dict(hp, topk_tail=True)
    expected, actual = reference(methods, d, hp, key), fused(methods, d, hp, key, chunk_size=6)[0]
    for method in methods:
        assert_same(expected[method], actual[method])


@pytest.mark.parametrize('chunk_size', [1, 6, 64])
def test_teacher_pass_matches_float64(data, chunk_size):
    d, _, _ = data
    logits = (d['teacher_hidden'].astype(np.float64) @ d['teacher_head'])[..., :VOCAB]
    targets = fused_loss.teacher_pass(
        d['teacher_hidden'], d['teacher_head'], d['tokens'], k=K, vocab_size=VOCAB, chunk_size=chunk_size
    )
    ids = ref.teacher_topk(logits, K)
    assert targets.topk_ids.dtype == jnp.int32
    np.testing.assert_array_equal(targets.topk_ids, ids)
    np.testing.assert_allclose(targets.topk_logprobs, np.take_along_axis(ref.log_softmax(logits), ids, -1), atol=1e-5)
    np.testing.assert_allclose(targets.teacher_logprobs, ref.token_logprobs(logits, d['tokens']), atol=1e-5)
    np.testing.assert_allclose(targets.teacher_entropy, ref.entropy(logits), atol=1e-5)


def test_teacher_pass_takes_a_function_and_has_no_gradient(data):
    d, _, _ = data
    kwargs = dict(k=K, vocab_size=VOCAB, chunk_size=4)
    direct = fused_loss.teacher_pass(d['teacher_hidden'], d['teacher_head'], d['tokens'], **kwargs)
    lazy = fused_loss.teacher_pass(lambda: jnp.asarray(d['teacher_hidden']), d['teacher_head'], d['tokens'], **kwargs)
    for a, b in zip(direct, lazy):
        np.testing.assert_array_equal(a, b)

    def total(hidden, head):
        t = fused_loss.teacher_pass(hidden, head, d['tokens'], **kwargs)
        return jnp.sum(t.topk_logprobs) + jnp.sum(t.teacher_logprobs) + jnp.sum(t.teacher_entropy)

    for g in jax.grad(total, argnums=(0, 1))(d['teacher_hidden'], d['teacher_head']):
        np.testing.assert_array_equal(g, 0.0)


def _fd_columns(f, z, h=1e-5):
    """Central differences of a per-position float64 function f([B, T, V]) -> [B, T], one column at a time."""
    grad = np.zeros(z.shape)
    for v in range(z.shape[-1]):
        up, down = z.copy(), z.copy()
        up[..., v] += h
        down[..., v] -= h
        grad[..., v] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize('method', losses.FULL_VOCABULARY_METHODS)
def test_exact_divergences_match_float64(data, method):
    """The fused per-token divergence and its gradient w.r.t. the student hidden states and head against NumPy float64
    on the shared vocabulary (finite differences w.r.t. the logits, then the chain rule through hidden @ head)."""
    d, _, _ = data
    reference_fn = {
        'jsd': lambda z, t: ref.generalized_jsd(z, t, 0.3),
        'full_fkl': ref.forward_kl,
        'full_rkl': ref.reverse_kl,
    }[method]
    student = d['student_hidden'].astype(np.float64) @ d['student_head'].astype(np.float64)
    teacher = (d['teacher_hidden'].astype(np.float64) @ d['teacher_head'].astype(np.float64))[..., :VOCAB]
    weights = np.random.default_rng(1).uniform(size=d['tokens'].shape)
    targets = fused_loss.teacher_pass(
        d['teacher_hidden'], d['teacher_head'], d['tokens'], k=K, vocab_size=VOCAB, chunk_size=6, full_vocabulary=True
    )

    def divergence(hidden, head):
        stats = fused_loss.student_stats(
            hidden, head, d['tokens'], targets, vocab_size=VOCAB, chunk_size=6, divergence=method, jsd_beta=0.3
        )
        return jnp.sum(stats.full_divergence * weights), stats.full_divergence

    (_, per_token), grads = jax.value_and_grad(divergence, argnums=(0, 1), has_aux=True)(
        d['student_hidden'], d['student_head']
    )
    np.testing.assert_allclose(per_token, reference_fn(student[..., :VOCAB], teacher), rtol=1e-5, atol=1e-5)
    d_logits = np.zeros(student.shape)
    d_logits[..., :VOCAB] = weights[..., None] * _fd_columns(lambda z: reference_fn(z, teacher), student[..., :VOCAB])
    want_hidden = d_logits @ d['student_head'].T.astype(np.float64)
    want_head = np.einsum('bth,btv->hv', d['student_hidden'].astype(np.float64), d_logits)
    np.testing.assert_allclose(grads[0], want_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], want_head, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tail', [False, True])
def test_self_distillation_fused(data, tail):
    """Teacher = student (same hidden states and head), no prefix: every method's loss is 0; the gradient too, except
    the top-k FKL's truncation bias -p_j (1[j in K_t] - p(K_t)) (here `topk_fkl`, on every on-policy token), which the
    tail outcome removes."""
    d, hp, key = data
    same = dict(d, teacher_hidden=d['student_hidden'], teacher_head=d['student_head'][:, :TEACHER_ROWS])
    same['prefix_mask'] = np.zeros_like(d['prefix_mask'])
    hp = dict(hp, topk_tail=tail)
    methods = ('topk_fkl', 'tropd', 'opd', 'jsd', 'full_fkl', 'full_rkl')
    results = fused(methods, same, hp, key, chunk_size=6)[0]
    logits = (d['student_hidden'].astype(np.float64) @ d['student_head'])[..., :VOCAB]
    p = np.exp(ref.log_softmax(logits))
    inside = np.zeros(p.shape, bool)
    np.put_along_axis(inside, ref.teacher_topk(logits, K), True, axis=-1)
    bias = -p * (inside - np.sum(np.where(inside, p, 0.0), axis=-1, keepdims=True))
    for method, ((loss, _), grads) in results.items():
        np.testing.assert_allclose(loss, 0.0, atol=1e-5, err_msg=method)
        d_logits = np.zeros(d['student_hidden'].shape[:2] + (STUDENT_ROWS,))
        if method == 'topk_fkl' and not tail:
            on = d['response_mask'] > 0
            d_logits[..., :VOCAB] = np.where(on[..., None], bias / on.sum(), 0.0)
            assert np.abs(d_logits).max() > 1e-3
        np.testing.assert_allclose(grads[0], d_logits @ d['student_head'].T, atol=1e-6, err_msg=method)
        want_head = np.einsum('bth,btv->hv', d['student_hidden'], d_logits)
        np.testing.assert_allclose(grads[1], want_head, atol=1e-6, err_msg=method)


def test_bfloat16_inputs(data):
    """bf16 hidden states and head: logits are exact float32 products, so the loss equals the float32 reference on the
    rounded inputs; gradients come back in bf16, within bf16 rounding of the reference."""
    d, hp, key = data
    names = ('student_hidden', 'student_head', 'teacher_hidden', 'teacher_head')
    rounded = dict(d)
    for name in names:
        rounded[name] = np.asarray(jnp.asarray(d[name], jnp.bfloat16).astype(jnp.float32))
    expected = reference(['tropd'], rounded, hp, key)['tropd']
    bf16 = {n: jnp.asarray(x, jnp.bfloat16) if n in names else x for n, x in d.items()}
    (loss, _), grads = fused(['tropd'], bf16, hp, key, chunk_size=6)[0]['tropd']
    np.testing.assert_allclose(loss, expected[0][0], rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, expected[1]):
        assert g.dtype == jnp.bfloat16
        g = np.asarray(g, np.float32)
        assert np.linalg.norm(g - g_ref) <= 2e-2 * np.linalg.norm(g_ref)


@pytest.mark.slow
def test_memory_grows_with_chunk_not_tokens():
    """Compile-only XLA memory analysis: the fused step's temporaries grow by O(k) bytes per token, the naive step's
    by several float32 rows of the vocabulary."""
    hidden, vocab, k, chunk = 32, 8192, 16, 128
    s = jax.ShapeDtypeStruct

    def temp(f, *args):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def sizes(n):
        h, w = s((1, n, hidden), jnp.float32), s((hidden, vocab), jnp.float32)
        tok, mask = s((1, n), jnp.int32), s((1, n), jnp.float32)
        targets = fused_loss.TeacherTargets(
            s((1, n), jnp.float32), s((1, n, k), jnp.int32), s((1, n, k), jnp.float32), s((1, n), jnp.float32)
        )
        key = jax.random.key(0)

        def fused_step(h, w, targets, tok, mask):
            return jax.grad(
                lambda h, w: fused_loss.fused_distillation_loss(
                    'tropd', h, w, targets, tok, mask, mask, key, vocab_size=vocab, chunk_size=chunk, k=k
                )[0],
                argnums=(0, 1),
            )(h, w)

        def naive_step(h, w, teacher_logits, tok, mask):
            return jax.grad(
                lambda h, w: losses.distillation_loss('tropd', h @ w, teacher_logits, tok, mask, mask, key, k=k)[0],
                argnums=(0, 1),
            )(h, w)

        def teacher_step(h, w, tok):
            return fused_loss.teacher_pass(h, w, tok, k=k, vocab_size=vocab, chunk_size=chunk)

        return (
            temp(fused_step, h, w, targets, tok, mask),
            temp(naive_step, h, w, s((1, n, vocab), jnp.float32), tok, mask),
            temp(teacher_step, h, w, tok),
        )

    small, large = sizes(1024), sizes(4096)
    fused_slope, naive_slope, teacher_slope = [(b - a) / 3072 for a, b in zip(small, large)]
    assert naive_slope > 2 * 4 * vocab  # the naive loss keeps several [n, V] float32 buffers
    assert fused_slope < 32 * k, fused_slope  # a few O(k) float32 arrays per token, nothing of size V
    assert teacher_slope < 32 * k, teacher_slope
    assert large[0] < large[1] / 10


def test_validation_errors(data):
    d, hp, key = data
    hidden, head, tokens = d['student_hidden'], d['student_head'], d['tokens']
    targets = fused_loss.teacher_pass(d['teacher_hidden'], d['teacher_head'], tokens, k=4, vocab_size=VOCAB)
    with pytest.raises(ValueError, match='vocab_size=97'):
        fused_loss.teacher_pass(d['teacher_hidden'], d['teacher_head'], tokens, k=4, vocab_size=97)
    with pytest.raises(ValueError, match='k=91'):
        fused_loss.teacher_pass(d['teacher_hidden'], d['teacher_head'], tokens, k=91, vocab_size=VOCAB)
    with pytest.raises(ValueError, match='chunk_size=0'):
        fused_loss.teacher_pass(d['teacher_hidden'], d['teacher_head'], tokens, k=4, vocab_size=VOCAB, chunk_size=0)
    with pytest.raises(ValueError, match='tokens must be'):
        fused_loss.student_stats(hidden, head, tokens[:, :-1], targets, vocab_size=VOCAB)
    with pytest.raises(ValueError, match='student_lm_head'):
        fused_loss.student_stats(hidden, head.T, tokens, targets, vocab_size=VOCAB)
    with pytest.raises(ValueError, match='targets.teacher_logprobs'):
        fused_loss.student_stats(hidden[:1], head, tokens[:1], targets, vocab_size=VOCAB)
    with pytest.raises(ValueError, match='needs 8 teacher top-k entries'):
        fused_loss.fused_distillation_loss(
            'tropd', hidden, head, targets, tokens, d['response_mask'], d['prefix_mask'], key, vocab_size=VOCAB, **hp
        )
    with pytest.raises(ValueError, match=r'use teacher_pass\(\.\.\., full_vocabulary=True\)'):
        fused_loss.fused_distillation_loss(
            'jsd', hidden, head, targets, tokens, d['response_mask'], d['prefix_mask'], key, vocab_size=VOCAB, k=4
        )
    with pytest.raises(ValueError, match='unknown method'):
        fused_loss.fused_distillation_loss(
            'nope', hidden, head, targets, tokens, d['response_mask'], d['prefix_mask'], key, vocab_size=VOCAB
        )


# ---------------------------------------------------------------------------------------------------------------------
# A 2x2x2 mesh of fake CPU devices, in a subprocess.

# (T, spec of the [B, T, H] hidden states, spec of the [H, V] heads, chunk_size, methods). Tokens and masks follow the
# hidden states' first two axes. The first layout is what the logical rules of tropd_jax.sharding give at B = 2
# (batch on 'data', model dimension on 'fsdp', vocabulary on 'tensor'), with padding; the second splits the tokens
# over both 'data' and 'fsdp'.
MESH_LAYOUTS = (
    (11, ('data', None, 'fsdp'), ('fsdp', 'tensor'), 8, losses.METHODS),
    (12, ('data', 'fsdp', None), (None, 'tensor'), 10, ('tropd', 'eopd', 'jsd')),
)


def mesh_check() -> dict:
    """Runs every layout of MESH_LAYOUTS on a 2x2x2 mesh; returns {layout: {method: errors}} and the shapes of all
    all-gathers in the compiled programs."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tropd_jax import sharding

    mesh = sharding.make_mesh(2, 2, 2)
    results = {}
    for i, (length, hidden_spec, head_spec, chunk_size, methods) in enumerate(MESH_LAYOUTS):
        d, hp, key = make_data(length)
        expected = reference(methods, d, hp, key)

        def put(name, x):
            spec = head_spec if 'head' in name else hidden_spec[: x.ndim]
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        with jax.set_mesh(mesh):
            actual, compiled_fn, args = fused(methods, d, hp, key, chunk_size, put)
            text = compiled_fn.lower(args).compile().as_text()
        errors = {}
        for m in methods:
            try:
                assert_same(expected[m], actual[m])
                errors[m] = None
            except AssertionError as e:
                errors[m] = str(e)
        lines = [line for line in text.splitlines() if 'all-gather(' in line]
        gathers = [line.split('= ', 1)[1].split(' all-gather')[0] for line in lines]
        # Every [H, n] array of the program: the student's LM head, its gradient and any copies of them; and every
        # [H_TEACHER, n] array: the teacher's head and its copies.
        head_columns = sorted({int(n) for n in re.findall(rf'\[{H},(\d+)\]', text)})
        teacher_head_columns = sorted({int(n) for n in re.findall(rf'\[{H_TEACHER},(\d+)\]', text)})
        results[str(i)] = dict(
            errors=errors, all_gathers=gathers, head_columns=head_columns, teacher_head_columns=teacher_head_columns
        )
    return results


@pytest.fixture(scope='module')
def mesh_results():
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env['PYTHONPATH'] = os.pathsep.join([tests_dir, env.get('PYTHONPATH', '')])
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('layout', range(len(MESH_LAYOUTS)))
def test_mesh_equals_reference(mesh_results, layout):
    result = mesh_results[str(layout)]
    assert set(result['errors']) == set(MESH_LAYOUTS[layout][4])
    failed = {m: e for m, e in result['errors'].items() if e is not None}
    assert not failed, failed
    # The top-k gathers k candidates per vocabulary shard, never a chunk of logits over the whole vocabulary.
    for shape in result['all_gathers']:
        assert f',{STUDENT_ROWS}]' not in shape and f',{TEACHER_ROWS}]' not in shape, shape
    # The student head and its float32 gradient are split along the vocabulary over fsdp x tensor: [H, V / 4].
    assert STUDENT_ROWS // 4 in result['head_columns'], result['head_columns']
    if MESH_LAYOUTS[layout][2] == ('fsdp', 'tensor'):
        # Heads split as the logical rules split them ([H / fsdp, V / tensor]): no device ever holds a whole-H slice
        # wider than 1 / (fsdp x tensor) = 1/4 of a head's vocabulary, nor of its gradient. The chunks' logits are
        # split along the vocabulary over fsdp too, instead of gathering the head FSDP-style.
        assert result['head_columns'], 'no [H, n] array found: the check below would pass vacuously'
        assert max(result['head_columns']) <= STUDENT_ROWS // 4, result['head_columns']
        # The exact divergences zero-pad the teacher's head to the student's width (96 -> 100 columns) once per call;
        # the re-split moves a few halo columns, still far from a whole head.
        assert result['teacher_head_columns'], 'no [H_TEACHER, n] array found'
        assert max(result['teacher_head_columns']) <= STUDENT_ROWS // 4 + 3, result['teacher_head_columns']


if __name__ == '__main__':
    print(json.dumps(mesh_check()))
