"""Int8 weight-only quantisation: the per-channel codes against NumPy, and the int8 decoder against a float decoder
holding the dequantised weights (every matrix, embedding and LM head, tied or not, scoring and decode steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax.models import ModelConfig, init_cache, init_decoder
from tropd_jax.models.quantize import QUANTIZED_WEIGHTS, int8_channels, quantize_int8


def test_int8_channels_match_a_numpy_reference():
    w = np.random.default_rng(0).normal(size=(6, 3, 5)).astype(np.float32)
    w[:, 1, 2] = 0.0  # an all-zero channel
    q, scale = int8_channels(jnp.asarray(w), (0,))
    ref_scale = np.abs(w.astype(np.float64)).max(axis=0, keepdims=True) / 127
    ref_scale[ref_scale == 0] = 1.0
    ref_q = np.clip(np.round(w / ref_scale), -127, 127)
    assert q.dtype == jnp.int8 and scale.shape == (1, 3, 5)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q), ref_q)
    assert np.abs(np.asarray(q) * np.asarray(scale) - w).max() <= ref_scale.max() / 2 + 1e-7


def _dequantised_copy(model, quantized):
    """`model` with every quantised weight replaced by NumPy's q * scale of `quantized` (float64, then float32)."""
    modules = lambda m: [m] + [x for block in m.layers for x in (block.attn, block.mlp)]
    for plain, quant in zip(modules(model), modules(quantized)):
        for name in QUANTIZED_WEIGHTS[type(plain)]:
            if getattr(plain, name, None) is None:
                continue
            q = np.asarray(getattr(quant, name)[...], np.float64)
            scale = np.asarray(getattr(quant, name + '_scale')[...], np.float64)
            getattr(plain, name).set_value(jnp.asarray((q * scale).astype(np.float32)))
    return model


@pytest.mark.parametrize('tied', [True, False])
def test_int8_decoder_matches_the_dequantised_float_decoder(tied):
    config = ModelConfig(
        architecture='qwen3',
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
        tie_word_embeddings=tied,
    )
    model = init_decoder(config, seed=1)
    quantized = quantize_int8(model)
    state = nnx.state(quantized)
    assert state['layers'][0]['mlp']['gate_proj'].get_value().dtype == jnp.int8
    assert state['embed'].get_value().dtype == jnp.int8
    reference = _dequantised_copy(init_decoder(config, seed=1), quantized)

    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    got, _ = quantized(tokens, positions, mask)
    want, _ = reference(tokens, positions, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quantized.lm_head_weight(), reference.lm_head_weight(), rtol=1e-6, atol=1e-7)
    # A one-token decode step (the fused-projection path) after a prefill.
    outs = []
    for m in (quantized, reference):
        _, cache = m(tokens, positions, mask, init_cache(config, 2, 8))
        step, _ = m(tokens[:, :1], positions[:, -1:] + 1, jnp.ones((2, 1)), cache)
        outs.append(step)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # Quantisation is not the identity: the float model's own weights give other logits.
    original, _ = model(tokens, positions, mask)
    assert not np.allclose(original, got, atol=1e-6)
