"""Causal grouped-query attention behind one function, with kernels that never build [T, T] scores.

`attention(q, k, v, key_mask)` is the cache-free attention of the decoder: student scoring (with gradients),
teacher scoring and the sampler's prefill. At the paper's 9,120-token sequences one [T, T] float32 score matrix is
333 MB per head and row, so every implementation except `naive` works on blocks:

  naive      the decoder's original math: [B, KV, G, T, T] float32 scores. The reference; fine for short T.
  blockwise  pure JAX flash attention: online softmax over key blocks, one query block at a time, and a custom VJP
             that recomputes score blocks (FlashAttention-2 backward). O(T * block) memory forward and backward, on
             any backend.
  splash     TPU: the Pallas splash-attention kernel shipped with JAX (causal mask, key_mask as segment ids).
  cudnn      NVIDIA GPU: `jax.nn.dot_product_attention(implementation='cudnn')`. Requires each row's real tokens to
             form ONE contiguous block (left-padded prompt + right-padded response, as rollouts are); a mask with
             holes would silently give wrong values, and a traced mask cannot be checked at trace time.
  auto       by the backend at trace time (`jax.default_backend()`, or the one `target_backend` names): TPU ->
             splash; GPU -> cudnn for bf16 / fp16 inputs with a head dim that is a multiple of 8 and at most 128,
             else blockwise; CPU -> naive when T <= block_size (one block: nothing to save, and exact parity with the
             old path), else blockwise.
"""

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from tropd_jax import sharding

IMPLEMENTATIONS = ('auto', 'naive', 'blockwise', 'splash', 'cudnn')

_GPU_BACKENDS = ('gpu', 'cuda')
_TARGET_BACKEND = contextvars.ContextVar('attention_target_backend', default=None)


@contextlib.contextmanager
def target_backend(name: str | None):
    """Within this context, `attention` (and the decoder's decode step) choose their kernels for the `name` backend
    ('tpu', 'gpu', 'cpu') instead of `jax.default_backend()`: for programs compiled ahead of time for devices this
    process does not run on (`tropd_jax.aot` compiles for a TPU topology on a CPU host, and must trace the program a
    TPU would run, splash kernel included)."""
    token = _TARGET_BACKEND.set(name)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def backend() -> str:
    """The backend the program being traced is for: `target_backend`'s, else `jax.default_backend()`."""
    return _TARGET_BACKEND.get() or jax.default_backend()


def attention(
    q, k, v, key_mask, *, segment_ids=None, implementation: str = 'auto', block_size: int = 512, interpret: bool = False
) -> jax.Array:
    """Causal grouped-query attention.

    q: [B, N, T, D]; k, v: [B, KV, T, D] (same T, RoPE already applied); key_mask: [B, T] bool, True on real tokens.
    Query head n uses KV head n // (N // KV) (HF's repeat_kv). Query t attends to keys s <= t with key_mask[b, s].
    Scores are accumulated in float32 and scaled by 1 / sqrt(D); softmax in float32. Returns [B, N, T, D] in q.dtype.
    Rows with no allowed key (queries on left padding) come out finite (zeros, or uniform over keys for `naive`);
    their values are never used downstream.

    segment_ids: None, or [B, T] int for packed rows (several sequences per row): query t also needs
    segment_ids[b, s] == segment_ids[b, t], so no sequence sees another. `cudnn` takes one contiguous block per row
    and falls back to `blockwise` for packed rows.

    `block_size` is the query / key block of `blockwise` (and the T up to which `auto` picks `naive` on CPU).
    `interpret=True` runs `splash` in Pallas interpret mode on any backend (for tests; slow).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'Unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}.')
    _check_shapes(q, k, v, key_mask)
    platform = backend()
    if implementation == 'auto':
        implementation = _choose(platform, q, block_size)
    key_mask = key_mask.astype(bool)
    if segment_ids is not None:
        if segment_ids.shape != key_mask.shape:
            raise ValueError(f'Expected segment_ids of shape {key_mask.shape}, got {segment_ids.shape}.')
        segment_ids = segment_ids.astype(jnp.int32)
        if implementation == 'cudnn':
            implementation = 'blockwise'
    if implementation == 'naive':
        return _naive(q, k, v, key_mask, segment_ids)
    if implementation == 'blockwise':
        return _blockwise(q, k, v, key_mask, block_size, segment_ids)
    if implementation == 'splash':
        if platform != 'tpu' and not interpret:
            raise ValueError(
                f"Attention implementation 'splash' needs a TPU; the backend is {platform!r} "
                '(interpret=True runs it anywhere, slowly).'
            )
        return _splash(q, k, v, key_mask, interpret, segment_ids)
    if platform not in _GPU_BACKENDS:
        raise ValueError(f"Attention implementation 'cudnn' needs an NVIDIA GPU; the backend is {platform!r}.")
    return _contiguous_dot_product_attention(q, k, v, key_mask, 'cudnn')


def _check_shapes(q, k, v, key_mask):
    if q.ndim != 4:
        raise ValueError(f'Expected q of shape [B, N, T, D], got {q.shape}.')
    b, n, t, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[2:] != (t, d) or n % k.shape[1]:
        raise ValueError(
            f'Expected k and v of shape [B, KV, T, D] with KV dividing N for q {q.shape}; '
            f'got k {k.shape} and v {v.shape}.'
        )
    if key_mask.shape != (b, t):
        raise ValueError(f'Expected key_mask of shape {(b, t)}, got {key_mask.shape}.')


def _cudnn_supported(q) -> bool:
    """Whether cuDNN's flash attention takes these queries: half-precision inputs, head dim a multiple of 8 <= 128
    (128 is the limit before Hopper; Hopper allows 256, but 128 is what our models use)."""
    d = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def _choose(backend: str, q, block_size: int) -> str:
    """The implementation `auto` picks on `backend` for queries q [B, N, T, D]."""
    if backend == 'tpu':
        return 'splash'
    if backend in _GPU_BACKENDS and _cudnn_supported(q):
        return 'cudnn'
    if backend == 'cpu' and q.shape[2] <= block_size:
        return 'naive'
    return 'blockwise'


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _naive(q, k, v, key_mask, segment_ids=None):
    """The decoder's original attention: full [B, KV, G, T, T] float32 scores."""
    b, n, t, d = q.shape
    dt = q.dtype
    q = q.reshape(b, k.shape[1], n // k.shape[1], t, d)
    scores = jnp.einsum('bkgtd,bksd->bkgts', q, k.astype(dt), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & key_mask[:, None, :]  # [B, T, T]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    # A finite fill keeps rows with no allowed key (left padding) finite: they become uniform, never NaN.
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum('bkgts,bksd->bkgtd', probs, v.astype(dt)).reshape(b, n, t, d)


# --- blockwise (flash attention in plain JAX) ---------------------------------------------------------------------


def _blockwise(q, k, v, key_mask, block_size, segment_ids=None):
    """Pads T to a multiple of the block (padded keys masked), groups query heads by KV head, runs `_flash`."""
    b, n, t, d = q.shape
    kv = k.shape[1]
    block = min(block_size, _round_up(t, 8))
    pad = _round_up(t, block) - t
    q = q.reshape(b, kv, n // kv, t, d)  # GQA without repeating K / V
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if segment_ids is None:
        segment_ids = jnp.zeros(key_mask.shape, jnp.int32)  # one segment per row
    if pad:
        q = jnp.pad(q, [(0, 0)] * 3 + [(0, pad), (0, 0)])
        k = jnp.pad(k, [(0, 0)] * 2 + [(0, pad), (0, 0)])
        v = jnp.pad(v, [(0, 0)] * 2 + [(0, pad), (0, 0)])
        key_mask = jnp.pad(key_mask, [(0, 0), (0, pad)])
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)])
    out = _flash(q, k, v, key_mask, segment_ids, block)
    return out[:, :, :, :t].reshape(b, n, t, d)


def _block_scores(q_block, k, key_mask, segment_ids, i, j, block):
    """Scaled float32 scores [B, KV, G, c, c] of query block i (q_block [B, KV, G, c, D]) against key block j of
    k [B, KV, T, D], -inf where the key is later than the query, masked out, or in another segment."""
    k_block = lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
    scores = jnp.einsum('bkgtd,bksd->bkgts', q_block, k_block, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(q_block.shape[-1]))
    causal = (i * block + jnp.arange(block))[:, None] >= (j * block + jnp.arange(block))[None, :]
    allowed = causal[None] & lax.dynamic_slice_in_dim(key_mask, j * block, block, axis=1)[:, None, :]  # [B, c, c]
    same = (
        lax.dynamic_slice_in_dim(segment_ids, i * block, block, axis=1)[:, :, None]
        == lax.dynamic_slice_in_dim(segment_ids, j * block, block, axis=1)[:, None, :]
    )
    allowed &= same
    return jnp.where(allowed[:, None, None], scores, -jnp.inf)


def _flash_forward(q, k, v, key_mask, segment_ids, block):
    """Output [B, KV, G, T, D] (q.dtype) and per-row logsumexp [B, KV, G, T] (float32; 0 on rows with no key)."""
    b, kv, g, t, d = q.shape

    def query_block(i):
        q_i = lax.dynamic_slice_in_dim(q, i * block, block, axis=3)

        def key_block(j, carry):
            acc, row_max, row_sum = carry
            scores = _block_scores(q_i, k, key_mask, segment_ids, i, j, block)
            new_max = jnp.maximum(row_max, scores.max(-1))
            # -inf (no allowed key yet) is replaced by 0 so that exp(-inf - max) is 0, not NaN.
            safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            probs = jnp.exp(scores - safe_max[..., None])
            correction = jnp.exp(row_max - safe_max)
            v_j = lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
            acc = acc * correction[..., None] + jnp.einsum(
                'bkgts,bksd->bkgtd', probs.astype(v.dtype), v_j, preferred_element_type=jnp.float32
            )
            return acc, new_max, row_sum * correction + probs.sum(-1)

        init = (
            jnp.zeros((b, kv, g, block, d), jnp.float32),
            jnp.full((b, kv, g, block), -jnp.inf),
            jnp.zeros((b, kv, g, block), jnp.float32),
        )
        # Key blocks after block i lie wholly above the causal diagonal: the loop stops at i.
        acc, row_max, row_sum = lax.fori_loop(0, i + 1, key_block, init)
        empty = row_sum == 0
        out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
        return out.astype(q.dtype), jnp.where(empty, 0.0, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))

    out, lse = lax.map(query_block, jnp.arange(t // block))  # [nq, B, KV, G, c, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, t, d)
    return out, jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, key_mask, segment_ids, block):
    """q: [B, KV, G, T, D]; k, v: [B, KV, T, D]; key_mask, segment_ids: [B, T]; T a multiple of `block`.
    Returns [B, KV, G, T, D]."""
    return _flash_forward(q, k, v, key_mask, segment_ids, block)[0]


def _flash_fwd(q, k, v, key_mask, segment_ids, block):
    out, lse = _flash_forward(q, k, v, key_mask, segment_ids, block)
    return out, (
        q,
        k,
        v,
        key_mask,
        segment_ids,
        out,
        lse,
    )  # O(T * D) residuals: score blocks are recomputed in the backward


def _flash_bwd(block, residuals, d_out):
    """FlashAttention-2 backward: for each key block, visit the query blocks at or after it, recompute
    P = exp(S - lse), and accumulate dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dK += dS^T Q, dQ += dS K."""
    q, k, v, key_mask, segment_ids, out, lse = residuals
    b, kv, g, t, d = q.shape
    dt = q.dtype
    scale = 1.0 / math.sqrt(d)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, T]
    num_blocks = t // block

    def key_block(d_q, j):
        k_j = lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
        v_j = lax.dynamic_slice_in_dim(v, j * block, block, axis=2)

        def query_block(i, carry):
            d_q, d_k, d_v = carry
            rows = lambda x: lax.dynamic_slice_in_dim(x, i * block, block, axis=3)
            q_i, d_out_i, lse_i, delta_i = rows(q), rows(d_out), rows(lse), rows(delta)
            probs = jnp.exp(
                _block_scores(q_i, k, key_mask, segment_ids, i, j, block) - lse_i[..., None]
            )  # [B, KV, G, c, c]
            d_v = d_v + jnp.einsum('bkgts,bkgtd->bksd', probs.astype(dt), d_out_i, preferred_element_type=jnp.float32)
            d_probs = jnp.einsum('bkgtd,bksd->bkgts', d_out_i, v_j, preferred_element_type=jnp.float32)
            d_scores = (probs * (d_probs - delta_i[..., None]) * scale).astype(dt)
            d_k = d_k + jnp.einsum('bkgts,bkgtd->bksd', d_scores, q_i, preferred_element_type=jnp.float32)
            d_q_i = rows(d_q) + jnp.einsum('bkgts,bksd->bkgtd', d_scores, k_j, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(d_q, d_q_i, i * block, axis=3), d_k, d_v

        zeros = jnp.zeros((b, kv, block, d), jnp.float32)
        # Query blocks before block j see none of its keys: the loop starts at j.
        d_q, d_k, d_v = lax.fori_loop(j, num_blocks, query_block, (d_q, zeros, zeros))
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(num_blocks))
    d_k = jnp.moveaxis(d_k, 0, 2).reshape(b, kv, t, d)
    d_v = jnp.moveaxis(d_v, 0, 2).reshape(b, kv, t, d)
    return d_q.astype(dt), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- splash (TPU) ---------------------------------------------------------------------------------------------------


def _splash(q, k, v, key_mask, interpret, packed_segment_ids=None):
    """Splash attention per row (vmapped over the batch), inside a shard_map over the current mesh if one is set.

    key_mask becomes segment ids (real 1, padding 0): real queries see real keys only; padding queries see padding
    keys only, which always include themselves, so every row is finite. Packed rows: real tokens take their segment id
    + 1, so sequences see only themselves. T is padded to a multiple of the kernel's
    block (padding is segment 0). The kernel does not scale scores, so q is scaled first (in float32, then cast).
    """
    b, n, t, d = q.shape
    block = min(512, _round_up(t, 128))  # the kernel's blocks are multiples of 128 lanes
    padded = _round_up(t, block)
    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    segment_ids = key_mask.astype(jnp.int32)
    if packed_segment_ids is not None:
        segment_ids = jnp.where(key_mask, packed_segment_ids + 1, 0)
    if padded > t:
        q, k, v = (jnp.pad(x, [(0, 0), (0, 0), (0, padded - t), (0, 0)]) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - t)])

    def local(q, k, v, segment_ids):
        # Built from this shard's head count; the causal mask's block structure is computed with NumPy at trace time.
        mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * q.shape[1])
        sizes = splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        )
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=segment_ids, kv=segment_ids))

    mesh = jax.sharding.get_abstract_mesh()
    manual = tuple(mesh.manual_axes) if not mesh.empty else ()
    automatic = [] if mesh.empty else [a for a in mesh.axis_names if a not in manual]
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names) or not automatic:
        # No mesh, or inside a shard_map over every axis (the caller split the work by hand): call the kernel directly.
        out = local(q, k, v, segment_ids)
    else:
        # A pallas_call cannot be partitioned automatically: split it by hand over the automatic axes (all of them, or
        # those an enclosing shard_map left, as in the sampler's prefill), rows over the batch axes, heads over
        # `tensor` only when both the query and the KV heads divide (each shard then keeps HF's head grouping).
        q_spec = sharding.logical_to_spec(('batch', 'heads', None, None), q.shape, mesh, skip_axes=manual)
        kv_spec = sharding.logical_to_spec(('batch', 'kv_heads', None, None), k.shape, mesh, skip_axes=manual)
        heads = q_spec[1] if q_spec[1] == kv_spec[1] else None
        q_spec = jax.sharding.PartitionSpec(q_spec[0], heads, None, None)
        kv_spec = jax.sharding.PartitionSpec(q_spec[0], heads, None, None)
        mask_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        out = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
            out_specs=q_spec,
            axis_names=set(automatic),
            check_vma=False,
        )(q, k, v, segment_ids)
    return out[:, :, :t]


# --- cuDNN (GPU) ----------------------------------------------------------------------------------------------------


def _contiguous_dot_product_attention(q, k, v, key_mask, implementation):
    """`jax.nn.dot_product_attention` for rows whose real tokens form one contiguous block.

    cuDNN takes padding only as per-row lengths at the END of a row. So each row is rotated left by its number of
    leading pads (real tokens then start at 0), attended with `is_causal=True` and sequence lengths = number of real
    tokens, and the output rotated back. Within the block, causal order is unchanged by the rotation, so real queries
    get exactly the attention of `naive`; padding queries get zeros or uniform values (finite). `implementation` is
    passed through: 'cudnn' on GPU, 'xla' to test this preparation on CPU. A row with holes in key_mask is NOT
    supported (it would attend the holes); a row with no real token is not either. An odd T gets one more, empty
    column at the end (beyond every row's length): cuDNN's training kernel takes no odd sequence length ("Unsupported
    sequence length Q 4095, KV 4095" on an H200), and scoring calls have odd T whenever the rollouts' P + N is even.
    q: [B, N, T, D]; k, v: [B, KV, T, D]; key_mask: [B, T] bool. Returns [B, N, T, D].
    """
    t = q.shape[2]
    lengths = key_mask.sum(axis=-1, dtype=jnp.int32)
    leading = jnp.argmax(key_mask, axis=-1).astype(jnp.int32)  # index of the first real token
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    shifted = (positions + leading[:, None]) % t  # [B, T]: rotated slot s holds original slot s + leading
    restored = (positions - leading[:, None]) % t
    rotate = lambda x, index: jnp.take_along_axis(x, index[:, None, :, None], axis=2)
    even = t + t % 2
    # [B, T', heads, D] as jax.nn expects, T' = T rounded up to even (the extra column is past every row's length).
    to_layout = lambda x: jnp.pad(rotate(x, shifted).transpose(0, 2, 1, 3), ((0, 0), (0, even - t), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        to_layout(q),
        to_layout(k),
        to_layout(v),
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return rotate(out[:, :t].transpose(0, 2, 1, 3), restored).astype(q.dtype)
