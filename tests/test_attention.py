"""Attention kernels against the naive path and a NumPy float64 reference: values, gradients, padding, GQA, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import sharding

# Names from the module path: `tropd_jax.models.attention` may also be re-exported as the function.
from tropd_jax.models.attention import _choose, _contiguous_dot_product_attention, attention, target_backend

BLOCK = 16  # several blocks and a partial last block at T = 33 and 100


def padded_mask(t):
    """key_mask [2, t]: left padding of different lengths per row, right padding on row 0 only (so row 1 has real
    queries in the last, partial block); real lengths differ too."""
    left, right = (t // 4, t // 9), (t // 10, 0)
    mask = np.zeros((2, t), bool)
    for row in range(2):
        mask[row, left[row] : t - right[row]] = True
    return mask


def inputs(t, num_heads=4, num_kv_heads=2, dtype=jnp.float32, head_dim=16, seed=0):
    """Random q, k, v, key_mask and a cotangent that is zero at padding queries (their values are never used)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, num_heads, t, head_dim))
    k = rng.normal(size=(2, num_kv_heads, t, head_dim))
    v = rng.normal(size=(2, num_kv_heads, t, head_dim))
    mask = padded_mask(t)
    cotangent = rng.normal(size=q.shape) * mask[:, None, :, None]
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(mask), jnp.asarray(cotangent, jnp.float32))


def numpy_attention(q, k, v, mask):
    """Float64 causal GQA attention written from the definition, one query at a time; zeros on rows with no key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, t, d = q.shape
    group = n // k.shape[1]
    out = np.zeros_like(q)
    for row in range(b):
        for head in range(n):
            for query in range(t):
                keys = [s for s in range(query + 1) if mask[row, s]]
                if not keys:
                    continue
                scores = k[row, head // group, keys] @ q[row, head, query] / np.sqrt(d)
                weights = np.exp(scores - scores.max())
                out[row, head, query] = weights / weights.sum() @ v[row, head // group, keys]
    return out


def values_and_grads(implementation, q, k, v, mask, cotangent, **kwargs):
    """Output and d(sum(out * cotangent)) / d(q, k, v), jitted."""

    def run(q, k, v):
        out = attention(q, k, v, mask, implementation=implementation, block_size=BLOCK, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close_on_real_queries(out, expected, mask, atol):
    real = np.asarray(mask)[:, None, :, None]
    np.testing.assert_allclose(
        np.where(real, np.asarray(out, np.float32), 0),
        np.where(real, np.asarray(expected, np.float32), 0),
        atol=atol,
        rtol=atol,
    )


@pytest.mark.parametrize('implementation', ['naive', 'blockwise'])
def test_matches_numpy_float64_reference(implementation):
    q, k, v, mask, _ = inputs(33)
    out = attention(q, k, v, mask, implementation=implementation, block_size=BLOCK)
    assert_close_on_real_queries(out, numpy_attention(q, k, v, np.asarray(mask)), mask, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def assert_matches_naive_float32(implementation, q, k, v, mask, cotangent, **kwargs):
    """Values at real queries and gradients w.r.t. q, k, v equal the naive kernel's to 1e-5."""
    out, grads = values_and_grads(implementation, q, k, v, mask, cotangent, **kwargs)
    expected, expected_grads = values_and_grads('naive', q, k, v, mask, cotangent)
    assert np.isfinite(np.asarray(out)).all()
    assert_close_on_real_queries(out, expected, mask, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('t, num_heads, num_kv_heads', [(1, 4, 2), (7, 4, 2), (33, 4, 1), (100, 4, 2)])
def test_blockwise_matches_naive_float32(t, num_heads, num_kv_heads):
    assert_matches_naive_float32('blockwise', *inputs(t, num_heads, num_kv_heads))


def test_blockwise_matches_naive_bfloat16():
    q, k, v, mask, cotangent = inputs(100, num_kv_heads=4, dtype=jnp.bfloat16)  # also plain multi-head (N == KV)
    out, grads = values_and_grads('blockwise', q, k, v, mask, cotangent)
    expected, expected_grads = values_and_grads('naive', q, k, v, mask, cotangent)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_close_on_real_queries(out, expected, mask, atol=3e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(
            np.asarray(grad, np.float32), np.asarray(expected_grad, np.float32), atol=6e-2, rtol=6e-2
        )


def test_blockwise_memory_is_linear_in_length():
    """fwd + bwd at T = 4096 must need far less scratch than one [T, T] float32 score matrix per head."""
    b, n, t, d = 1, 2, 4096, 64
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def temp_bytes(implementation):
        loss = lambda q, k, v, mask: jnp.sum(attention(q, k, v, mask, implementation=implementation, block_size=256))
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            spec(b, n, t, d), spec(b, n, t, d), spec(b, n, t, d), jax.ShapeDtypeStruct((b, t), bool)
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    scores_per_head = t * t * 4  # 64 MiB
    blockwise, naive = temp_bytes('blockwise'), temp_bytes('naive')
    assert blockwise < scores_per_head / 4, blockwise
    assert naive > scores_per_head, naive


def test_splash_interpret_matches_naive():
    """The TPU kernel's wiring (segment ids, GQA, q scaling, T padding) in Pallas interpret mode on CPU."""
    assert_matches_naive_float32('splash', *inputs(100), interpret=True)


def test_splash_interpret_under_a_mesh():
    """With a mesh set, the kernel runs inside a shard_map (here a one-device mesh)."""
    q, k, v, mask, _ = inputs(7)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, mask, implementation='splash', interpret=True))(q, k, v)
    assert_close_on_real_queries(out, attention(q, k, v, mask, implementation='naive'), mask, atol=1e-5)


def test_splash_inside_a_shard_map_over_some_axes():
    """Inside a shard_map that is manual over some mesh axes only (the sampler's prefill: rows over `data`), the
    kernel runs in a shard_map over the axes left automatic (a Pallas call cannot be partitioned automatically)."""
    q, k, v, mask, _ = inputs(7)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rows = jax.sharding.PartitionSpec('data')

    def prefill(q, k, v, mask):
        assert set(jax.sharding.get_abstract_mesh().manual_axes) == {'data'}
        return attention(q, k, v, mask, implementation='splash', interpret=True)

    with jax.set_mesh(mesh):
        run = jax.shard_map(prefill, in_specs=(rows,) * 4, out_specs=rows, axis_names={'data'}, check_vma=False)
        out = jax.jit(run)(q, k, v, mask)
    assert_close_on_real_queries(out, attention(q, k, v, mask, implementation='naive'), mask, atol=1e-5)


def test_target_backend_picks_the_kernel_of_the_devices_compiled_for():
    """`auto` follows `target_backend` (ahead-of-time compiles for a TPU from a CPU host trace the splash kernel),
    and the host's backend outside it."""
    q, k, v, mask, _ = inputs(7)
    traced = lambda: str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, mask))(q, k, v))
    with target_backend('tpu'):
        assert 'pallas_call' in traced()
    assert 'pallas_call' not in traced()


# Packed rows: three sequences in two rows of 40 (row 0: lengths 20 and 13, then padding; row 1: 30, then padding),
# so that segments start inside blocks of 16 and cross block boundaries.
PACKED_SEGMENTS = [(0, 0, 20), (0, 20, 13), (1, 0, 30)]  # (row, start, length)


def packed_inputs(seed=1):
    q, k, v, _, _ = inputs(40, seed=seed)
    segment_ids = np.zeros((2, 40), np.int32)
    for number, (row, start, length) in enumerate(PACKED_SEGMENTS):
        segment_ids[row, start : start + length] = number + 1
    mask = segment_ids > 0
    cotangent = np.random.default_rng(seed).normal(size=q.shape) * mask[:, None, :, None]
    return q, k, v, jnp.asarray(mask), jnp.asarray(segment_ids), jnp.asarray(cotangent, jnp.float32)


@pytest.mark.parametrize('implementation', ['naive', 'blockwise', 'splash'])
def test_packed_rows_match_each_sequence_alone(implementation):
    """Attention over packed rows with segment ids: values and gradients of every sequence equal those of the
    sequence attended alone (naive kernel, a row of its own)."""
    q, k, v, mask, segment_ids, cotangent = packed_inputs()
    kwargs = dict(segment_ids=segment_ids, interpret=implementation == 'splash')
    out, grads = values_and_grads(implementation, q, k, v, mask, cotangent, **kwargs)
    assert np.isfinite(np.asarray(out)).all()
    for row, start, length in PACKED_SEGMENTS:
        alone = lambda x: x[row : row + 1, :, start : start + length]
        expected, expected_grads = values_and_grads(
            'naive', alone(q), alone(k), alone(v), jnp.ones((1, length), bool), alone(cotangent)
        )
        np.testing.assert_allclose(alone(out), expected, atol=1e-5, rtol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads):
            np.testing.assert_allclose(alone(grad), expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('length', [32, 33])
def test_cudnn_argument_preparation_with_xla(length):
    """The per-row rotation + sequence lengths of the cuDNN path, run through jax.nn's XLA implementation; an odd
    length goes through the extra empty column that cuDNN's training kernel needs."""
    q, k, v, mask, cotangent = inputs(length)

    def run(implementation):
        def loss(q, k, v):
            if implementation == 'naive':
                out = attention(q, k, v, mask, implementation='naive')
            else:
                out = _contiguous_dot_product_attention(q, k, v, mask, 'xla')
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    (out, grads), (expected, expected_grads) = run('xla'), run('naive')
    assert np.isfinite(np.asarray(out)).all()
    assert_close_on_real_queries(out, expected, mask, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_auto_choice():
    f32 = jnp.zeros((1, 4, 1024, 128), jnp.float32)
    bf16 = f32.astype(jnp.bfloat16)
    assert _choose('tpu', f32, 512) == 'splash'
    assert _choose('gpu', bf16, 512) == 'cudnn'
    assert _choose('gpu', f32, 512) == 'blockwise'
    assert _choose('gpu', jnp.zeros((1, 4, 8, 256), jnp.bfloat16), 512) == 'blockwise'
    assert _choose('cpu', f32, 512) == 'blockwise'
    assert _choose('cpu', f32, 1024) == 'naive'
    # On CPU (these tests), `auto` is exactly naive for one block.
    q, k, v, mask, _ = inputs(7)
    np.testing.assert_array_equal(
        attention(q, k, v, mask, block_size=BLOCK), attention(q, k, v, mask, implementation='naive')
    )


def test_errors_name_the_bad_value():
    q, k, v, mask, _ = inputs(7)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, mask, implementation='flash')
    with pytest.raises(ValueError, match="'splash' needs a TPU"):
        attention(q, k, v, mask, implementation='splash')
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        attention(q, k, v, mask, implementation='cudnn')
    with pytest.raises(ValueError, match='key_mask'):
        attention(q, k, v, mask[:, :3])
    with pytest.raises(ValueError, match='KV dividing N'):
        attention(q[:, :3], k, v, mask)
