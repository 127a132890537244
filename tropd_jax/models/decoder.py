"""Decoder-only transformer (Qwen2 / Qwen3 / Llama) in Flax NNX, with a preallocated KV cache.

Weights carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`) in their
`out_sharding` metadata; `tropd_jax.sharding` maps them to mesh axes. Parameters are created unsharded (eager
sharding off) so a model can be built without a mesh; `sharding.shard_model` / `from_pretrained(mesh=...)` place
them.

Calling convention (see docs/architecture.md):

  out, cache = model(tokens[B, T], positions[B, T], mask[B, T], cache=None, return_hidden=False)

Under `jax.jit`, either wrap the call in `nnx.jit`, or split once and use the pure `forward`:

  graphdef, state = nnx.split(model)
  logits, cache = jax.jit(forward, static_argnums=(0, 6))(graphdef, state, tokens, positions, mask, cache, False)

`forward` is what a `lax.while_loop` body should call (the state is a loop-invariant pytree, the cache a carry).
"""

import functools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from tropd_jax import sharding
from tropd_jax.models import attention as attention_lib
from tropd_jax.models.config import ModelConfig


class Kernel(NamedTuple):
    """How a layer computes (static): the attention implementation and block size (`attention.attention`) and the
    MLP's chunk size (`chunked_swiglu`; 0 = none)."""

    attention: str = 'auto'
    block_size: int = 512
    mlp_chunk_size: int = 0


@flax.struct.dataclass
class KVCache:
    """Preallocated keys / values of every layer.

    k and v: tuples of L per-layer buffers, k [B, KV, D, S] and v [B, KV, S, D] (one buffer per layer: attention
      reads its layer's buffer directly, where a slice of a stacked [L, ...] buffer would be copied first). KV heads
      come before slots and k is stored transposed, so both attention matmuls (`q k` and `p v`) take their cache
      operand as it is laid out: on XLA CPU a transposed operand made the scores cost twice the values.
    valid: [B, S] bool, the slots that hold a real (non-padding) token. A one-token decode step attends to every valid
      slot, wherever it lies: continuous batching writes each step of every row at one shared slot, going round the
      response region as a ring (rows at different steps of their responses), and invalidates a row's old slots when
      it starts a new rollout.
    index: [] int32, the next slot to write (shared by every row).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of `max_length` slots per row (one buffer per layer), in the compute dtype unless `dtype` is
    given."""
    dtype = jnp.dtype(dtype or config.dtype)
    k_shape = (batch_size, config.num_kv_heads, config.head_dim, max_length)
    v_shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    k = tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        k=k,
        v=v,
        valid=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


class _Init:
    """Creates the parameters of one `Decoder`, annotated with logical axis names.

    Random weights get a placeholder and are filled by `finish` from a single uniform draw (std 0.02): XLA compiles
    every distinct random shape separately (about a second each for threefry on CPU), which would dominate building
    a tiny model; one draw is one compile. The distribution of a random init is immaterial here (real weights come
    from checkpoints). Ones and zeros come from NumPy, which compiles nothing.
    """

    def __init__(self, rngs: nnx.Rngs, dtype):
        self.key, self.dtype, self.pending = rngs.params(), jnp.dtype(dtype), []

    def __call__(self, shape, axes, fill='random'):
        if fill == 'random':
            value = jax.ShapeDtypeStruct(shape, self.dtype)
        else:
            value = jnp.asarray(np.full(shape, 1.0 if fill == 'ones' else 0.0, self.dtype))
        with nnx.use_eager_sharding(False):  # placement is `sharding.shard_model`'s job; no mesh needed here
            param = nnx.Param(value, out_sharding=axes)
        if fill == 'random':
            self.pending.append(param)
        return param

    def finish(self):
        sizes = [math.prod(p.get_value().shape) for p in self.pending]
        bound = 0.02 * math.sqrt(3.0)
        flat = jax.random.uniform(self.key, (sum(sizes),), self.dtype, -bound, bound)
        if not isinstance(flat, jax.core.Tracer):
            flat = np.asarray(flat)  # split on the host: slicing on device would compile once per shape
        offsets = np.cumsum([0] + sizes)
        for param, start, size in zip(self.pending, offsets, sizes):
            param.set_value(jnp.asarray(flat[start : start + size].reshape(param.get_value().shape)))


def rms_norm(x, scale, eps):
    """HF RMSNorm: normalise in float32, cast back, then scale. x: [..., H], scale: [H]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [D / 2] (float32), with linear or Llama 3 scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling['rope_type'] == 'linear':
        return inv_freq / scaling['factor']
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def _fuse_projections(x) -> bool:
    """Whether to multiply by concatenated weights (q|k|v, gate|up): for one-token decode steps on CPU, where the
    fewer, larger matmuls are faster, and never under tensor parallelism (the concatenation would mix shards). Not on
    TPU / GPU: XLA hoists the concatenation out of the decode loop, a second copy of most of every layer's weights for
    the whole loop (0.29 GiB per layer of a 7B model per chip)."""
    return x.shape[1] == 1 and not sharding.tensor_parallel() and attention_lib.backend() == 'cpu'


def _weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """`module.<name>` in `dtype`; an int8 weight (`quantize.quantize_int8`) times its per-channel `<name>_scale`."""
    w = getattr(module, name)[...].astype(dtype)
    scale = getattr(module, name + '_scale', None)
    return w if scale is None else w * scale[...].astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE as in HF. x: [B, N, T, D]; cos, sin: [B, 1, T, D / 2] float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention; query head n uses KV head n // (num_heads // num_kv_heads), as HF's repeat_kv."""

    def __init__(self, config: ModelConfig, init: _Init):
        h, n, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = init((h, n, d), ('embed', 'heads', 'head_dim'))
        self.k_proj = init((h, kv, d), ('embed', 'kv_heads', 'head_dim'))
        self.v_proj = init((h, kv, d), ('embed', 'kv_heads', 'head_dim'))
        self.o_proj = init((n, d, h), ('heads', 'head_dim', 'embed'))
        self.use_bias = config.attention_bias
        self.use_o_bias = config.attention_bias and config.architecture != 'qwen2'
        if self.use_bias:
            self.q_bias = init((n, d), ('heads', 'head_dim'), 'zeros')
            self.k_bias = init((kv, d), ('kv_heads', 'head_dim'), 'zeros')
            self.v_bias = init((kv, d), ('kv_heads', 'head_dim'), 'zeros')
        if self.use_o_bias:
            self.o_bias = init((h,), ('embed',), 'zeros')
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = init((d,), ('head_dim',), 'ones')
            self.k_norm = init((d,), ('head_dim',), 'ones')
        self.eps = config.rms_norm_eps
        self.num_kv_heads = kv
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x, cos, sin, mask, allowed=None, cache=None, kernel=None, segment_ids=None):
        """x: [B, T, H]; mask: [B, T] bool, the new tokens that are real; cache: None or (k, v, index); segment_ids:
        None or [B, T] int (packed rows: tokens attend within their segment only; cache-free calls).

        Without `allowed` the T new tokens attend causally to each other (a plain forward, or a prefill into an empty
        cache) through `attention.attention` with `kernel`'s implementation and block size (a `Kernel`), which never
        builds [T, T] scores (but for 'naive').
        With `allowed` ([B, T, S] bool: which cache slots each query sees; the one-token decode step) they attend to
        the cache: `cache` is this layer's (k, v, index), laid out as `KVCache` states (k transposed: slots last), and
        the T new entries are written at slot `index`. Returns the output [B, T, H] and the updated (k, v) (None
        without a cache); the buffers are updated in place.
        """
        dt = self.dtype
        kernel = kernel or Kernel()
        if _fuse_projections(x):
            # One matmul for q, k and v (the weights are loop-invariant, so XLA concatenates them once per decode loop).
            h, n, d = self.q_proj[...].shape
            kv = self.num_kv_heads
            w = jnp.concatenate(
                [
                    _weight(self, 'q_proj', dt).reshape(h, n * d),
                    _weight(self, 'k_proj', dt).reshape(h, kv * d),
                    _weight(self, 'v_proj', dt).reshape(h, kv * d),
                ],
                axis=1,
            )
            qkv = (x @ w).reshape(x.shape[0], x.shape[1], n + 2 * kv, d).transpose(0, 2, 1, 3)
            q, k, v = qkv[:, :n], qkv[:, n : n + kv], qkv[:, n + kv :]
        else:
            q = jnp.einsum('bth,hnd->bntd', x, _weight(self, 'q_proj', dt))
            k = jnp.einsum('bth,hkd->bktd', x, _weight(self, 'k_proj', dt))
            v = jnp.einsum('bth,hkd->bktd', x, _weight(self, 'v_proj', dt))
        if self.use_bias:
            q = q + self.q_bias[...].astype(dt)[None, :, None, :]
            k = k + self.k_bias[...].astype(dt)[None, :, None, :]
            v = v + self.v_bias[...].astype(dt)[None, :, None, :]
        if self.qk_norm:
            q = rms_norm(q, self.q_norm[...], self.eps)
            k = rms_norm(k, self.k_norm[...], self.eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        b, n, t, d = q.shape
        new_cache = None
        if cache is not None:
            cache_k, cache_v, index = cache
            # One slot for every row: an in-place update. (A per-row slot is a scatter, which XLA TPU lays out anew,
            # copying the whole buffer in and out at every step.) k is stored [B, KV, D, S].
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.swapaxes(-1, -2).astype(cache_k.dtype), (0, 0, 0, index))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, 0, index, 0))
            new_cache = (cache_k, cache_v)

        if allowed is None:
            out = attention_lib.attention(
                q, k, v, mask, segment_ids=segment_ids, implementation=kernel.attention, block_size=kernel.block_size
            )
        else:
            k_t, v = cache_k, cache_v
            q = q.reshape(b, self.num_kv_heads, n // self.num_kv_heads, t, d)
            scores = jnp.einsum('bkgtd,bkds->bkgts', q, k_t.astype(dt), preferred_element_type=jnp.float32)
            scores = scores / math.sqrt(d)
            # A finite fill keeps rows with no allowed key finite: they become uniform, never NaN.
            scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum('bkgts,bksd->bkgtd', probs, v.astype(dt)).reshape(b, n, t, d)
        out = jnp.einsum('bntd,ndh->bth', out, _weight(self, 'o_proj', dt))
        if self.use_o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); over more than `chunk_size` > 0 positions, `chunked_swiglu`."""

    def __init__(self, config: ModelConfig, init: _Init):
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = init((h, m), ('embed', 'mlp'))
        self.up_proj = init((h, m), ('embed', 'mlp'))
        self.down_proj = init((m, h), ('mlp', 'embed'))
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x, chunk_size: int = 0):
        dt = self.dtype
        if _fuse_projections(x):
            m = self.gate_proj[...].shape[1]
            gate_up = x @ jnp.concatenate([_weight(self, 'gate_proj', dt), _weight(self, 'up_proj', dt)], axis=1)
            gate, up = gate_up[..., :m], gate_up[..., m:]
            return (jax.nn.silu(gate) * up) @ _weight(self, 'down_proj', dt)
        weights = (_weight(self, 'gate_proj', dt), _weight(self, 'up_proj', dt), _weight(self, 'down_proj', dt))
        if 0 < chunk_size < x.shape[1]:
            return chunked_swiglu(x, *weights, chunk_size)
        return _swiglu(x, *weights)


def _swiglu(x, gate, up, down):
    """[..., H] -> [..., H] with weights [H, M], [H, M], [M, H]."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_swiglu(x, gate, up, down, chunk_size: int):
    """`_swiglu` on x [B, T, H], `chunk_size` positions at a time, forward and backward: the [B, T, M] activations
    (M the MLP width, 4-6x H) exist one chunk at a time, and only x is kept for the backward pass, which recomputes
    each chunk's. The weight gradients are accumulated over chunks in float32. Same values as `_swiglu`."""
    return _chunked_swiglu_fwd(x, gate, up, down, chunk_size)[0]


def _padded_chunks(a, chunk_size: int):
    """[B, T, ...] zero-padded along T to whole chunks: (padded array, number of chunks)."""
    n = -(-a.shape[1] // chunk_size)
    return jnp.pad(a, ((0, 0), (0, n * chunk_size - a.shape[1])) + ((0, 0),) * (a.ndim - 2)), n


def _chunked_swiglu_fwd(x, gate, up, down, chunk_size):
    xp, n = _padded_chunks(x, chunk_size)

    def body(j, out):
        piece = lax.dynamic_slice_in_dim(xp, j * chunk_size, chunk_size, axis=1)
        return lax.dynamic_update_slice_in_dim(out, _swiglu(piece, gate, up, down), j * chunk_size, axis=1)

    out = lax.fori_loop(0, n, body, jnp.zeros(xp.shape[:2] + down.shape[1:], x.dtype))
    return out[:, : x.shape[1]], (x, gate, up, down)


def _chunked_swiglu_bwd(chunk_size, residuals, d_out):
    x, gate, up, down = residuals
    xp, n = _padded_chunks(x, chunk_size)
    dp, _ = _padded_chunks(d_out.astype(x.dtype), chunk_size)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def body(j, carry):
        dx, d_gate, d_up, d_down = carry
        piece = lax.dynamic_slice_in_dim(xp, j * chunk_size, chunk_size, axis=1)
        dy = lax.dynamic_slice_in_dim(dp, j * chunk_size, chunk_size, axis=1)
        g, u = piece @ gate, piece @ up
        # the same steps as autodiff of `_swiglu`
        act, act_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
        d_act = dy @ down.T
        d_g, d_u = act_vjp(d_act)
        d_piece = d_g @ gate.T + d_u @ up.T
        return (
            lax.dynamic_update_slice_in_dim(dx, d_piece, j * chunk_size, axis=1),
            d_gate + f32('bth,btm->hm', piece, d_g),
            d_up + f32('bth,btm->hm', piece, d_u),
            d_down + f32('btm,bth->mh', act, dy),
        )

    zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
    init = (jnp.zeros_like(xp), zeros(gate), zeros(up), zeros(down))
    dx, d_gate, d_up, d_down = lax.fori_loop(0, n, body, init)
    return dx[:, : x.shape[1]], d_gate.astype(gate.dtype), d_up.astype(up.dtype), d_down.astype(down.dtype)


chunked_swiglu.defvjp(_chunked_swiglu_fwd, _chunked_swiglu_bwd)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, init: _Init):
        self.input_norm = init((config.hidden_size,), ('embed',), 'ones')
        self.attn = Attention(config, init)
        self.post_attention_norm = init((config.hidden_size,), ('embed',), 'ones')
        self.mlp = MLP(config, init)
        self.eps = config.rms_norm_eps

    def __call__(self, x, cos, sin, mask, allowed=None, cache=None, kernel=None, segment_ids=None):
        """As `Attention`; `kernel` (a `Kernel`) also sets the MLP's chunk size."""
        kernel = kernel or Kernel()
        x_norm = rms_norm(x, self.input_norm[...], self.eps)
        out, cache = self.attn(x_norm, cos, sin, mask, allowed, cache, kernel, segment_ids)
        x = x + out
        x = x + self.mlp(rms_norm(x, self.post_attention_norm[...], self.eps), kernel.mlp_chunk_size)
        return x, cache


class Decoder(nnx.Module):
    """Qwen2 / Qwen3 / Llama decoder; `model.config` is its `ModelConfig`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = _Init(rngs, config.param_dtype)
        self.embed = init((config.vocab_size, config.hidden_size), ('vocab', 'embed'))
        self.layers = nnx.List([Block(config, init) for _ in range(config.num_layers)])
        self.final_norm = init((config.hidden_size,), ('embed',), 'ones')
        if not config.tie_word_embeddings:
            self.lm_head = init((config.hidden_size, config.vocab_size), ('embed', 'vocab'))
        init.finish()

    def lm_head_weight(self) -> jax.Array:
        """The output projection [H, V] in the parameter dtype (the transposed embedding when tied); an int8 model's
        (`quantize.quantize_int8`) scaled back, in the compute dtype."""
        name = 'embed' if self.config.tie_word_embeddings else 'lm_head'
        if getattr(self, name + '_scale', None) is not None:
            w = _weight(self, name, self.config.dtype)
        else:
            w = getattr(self, name)[...]
        return w.T if self.config.tie_word_embeddings else w

    def __call__(
        self, tokens, positions, mask, cache: KVCache | None = None, *, return_hidden: bool = False, segment_ids=None
    ):
        """Runs the decoder over T new tokens.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int RoPE positions (per row; `max(cumsum(input_mask) - 1, 0)` for left padding).
          mask: [B, T] 1 on real tokens, 0 on padding. Padding keys are never attended to.
          cache: None for a plain causal forward. Otherwise the T new keys / values go to slots
            [cache.index, cache.index + T) of every row and are marked valid where `mask` is 1. A one-token call (a
            decode step) attends to every valid slot of its row, its own included. A call of T > 1 tokens with a cache
            is a prefill: the cache must be empty (index 0), and the queries attend to the T new tokens only, through
            the attention kernel.
          return_hidden: return the final hidden states [B, T, H] (after the final norm) instead of logits.
          segment_ids: None, or [B, T] int for packed rows (several sequences per row, cache-free calls only): each
            token attends only to earlier tokens of its own segment; `positions` restart at 0 in every segment.

        Returns:
          (logits [B, T, V] or hidden [B, T, H], both in the compute dtype; the updated cache or None).
        """
        config, dt = self.config, jnp.dtype(self.config.dtype)
        t = tokens.shape[1]
        mask = mask.astype(bool)
        if segment_ids is not None and cache is not None:
            raise ValueError('segment_ids (packed rows) are for cache-free calls; got a cache.')
        # Gather from a table whole along `embed` (FSDP gathers weights anyway): a lookup in the fsdp-split table
        # would come out split along the hidden dimension and need an all-to-all to reach the batch split.
        embed = sharding.constrain(self.embed[...], ('vocab', None))
        x = jnp.take(embed, tokens, axis=0).astype(dt)
        if getattr(self, 'embed_scale', None) is not None:  # int8 rows, one scale per token (`quantize`)
            x = x * jnp.take(self.embed_scale[...][:, 0], tokens, axis=0).astype(dt)[..., None]
        x = sharding.constrain(x, ('batch', 'length', None))

        freqs = positions.astype(jnp.float32)[:, None, :, None] * rope_frequencies(config)  # [B, 1, T, D/2]
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)

        if cache is None:
            index = allowed = None
        else:
            index = cache.index
            if index.ndim:
                raise ValueError(f'KVCache.index must be a scalar (one slot for every row), got shape {index.shape}.')
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
            # A decode step attends to every valid slot (all written before it); a prefill (T > 1, empty cache) to its
            # own T tokens.
            allowed = valid[:, None, :] if t == 1 else None  # [B, 1, S]
        kernel = Kernel(config.attention, config.attention_block_size, config.mlp_chunk_size)
        remat = cache is None and config.remat != 'none'

        # Each layer takes its own cache buffers; the updated ones are collected.
        new_k, new_v = [], []
        if cache is None and config.scan_layers:
            x = _scan_blocks(self.layers, x, cos, sin, mask, kernel, config.remat, segment_ids)
        for layer, block in enumerate([] if cache is None and config.scan_layers else self.layers):
            if remat:
                x = _remat_block(block, x, cos, sin, mask, kernel, config.remat, segment_ids)
            else:
                layer_cache = None if cache is None else (cache.k[layer], cache.v[layer], index)
                x, kv = block(x, cos, sin, mask, allowed, layer_cache, kernel, segment_ids)
                if cache is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            x = sharding.constrain(x, ('batch', 'length', None))

        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + t)
        x = rms_norm(x, self.final_norm[...], config.rms_norm_eps)
        if return_hidden:
            return x, cache
        return x @ self.lm_head_weight().astype(dt), cache


LAYER_INPUT = 'layer_input'  # the `checkpoint_name` of each block's input (what `remat='offload'` moves to the host)
_CHECKPOINT_POLICIES = {  # ModelConfig.remat -> jax.checkpoint policy
    'full': None,  # keep only the layer's input, in device memory
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep only the layer's input, in host memory (pinned): the backward pass copies it back layer by layer
    'offload': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src='device',
        offload_dst='pinned_host',
    ),
}


def _block_fn(graphdef, kernel, policy: str, prevent_cse: bool = True):
    """`fn(state, x, cos, sin, mask, segment_ids) -> x` of a block split into (graphdef, state), under
    `jax.checkpoint` with the named policy unless it is 'none' (`prevent_cse` is not needed inside a scan)."""

    def run(state, x, cos, sin, mask, segment_ids):
        x = checkpoint_name(x, LAYER_INPUT)
        return nnx.merge(graphdef, state)(x, cos, sin, mask, kernel=kernel, segment_ids=segment_ids)[0]

    if policy == 'none':
        return run
    return jax.checkpoint(run, policy=_CHECKPOINT_POLICIES[policy], prevent_cse=prevent_cse)


def _remat_block(block: Block, x, cos, sin, mask, kernel, policy: str, segment_ids=None):
    """`block(x, ...)` whose activations the backward pass recomputes (`jax.checkpoint` with the named policy)."""
    graphdef, state = nnx.split(block)
    return _block_fn(graphdef, kernel, policy)(state, x, cos, sin, mask, segment_ids)


def _scan_blocks(blocks, x, cos, sin, mask, kernel, policy: str, segment_ids=None):
    """`x` through every block of `blocks` as one `lax.scan` over their parameters stacked along a new leading axis.

    The floating-point weights are cast to the compute dtype before stacking (each block casts them on use anyway, so
    the result is the same), so the stacked copy costs the layers' weights in that dtype; the gradient flows back
    through the stack to each block's own parameters. With a remat policy other than 'none' the scanned body is
    `jax.checkpoint`ed as `_remat_block` is.
    """
    dt = jnp.dtype(x.dtype)
    graphdef, first = nnx.split(blocks[0])
    rest = [nnx.split(block)[1] for block in blocks[1:]]
    cast = lambda v: v.astype(dt) if jnp.issubdtype(v.dtype, jnp.floating) else v
    stacked = jax.tree.map(lambda *vs: jnp.stack([cast(v) for v in vs]), first, *rest)

    run = _block_fn(graphdef, kernel, policy, prevent_cse=False)

    def body(x, state):
        return sharding.constrain(run(state, x, cos, sin, mask, segment_ids), ('batch', 'length', None)), None

    return jax.lax.scan(body, x, stacked)[0]


def init_decoder(config: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Decoder:
    """A randomly initialised `Decoder` built in one jitted call, its parameters placed on `mesh` if given.

    Same parameters as `Decoder(config, rngs=nnx.Rngs(seed))`; on a mesh each device only ever holds its own
    shards (the full model is never materialised on one device).
    """
    create = lambda: Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    out_shardings = None if mesh is None else sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def forward(graphdef, state, tokens, positions, mask, cache=None, return_hidden=False, segment_ids=None):
    """Pure form of `Decoder.__call__` on `nnx.split(model)`; jit it with `graphdef` (and `return_hidden`) static."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, mask, cache, return_hidden=return_hidden, segment_ids=segment_ids)
