"""Decoder parity with transformers / PyTorch, the KV cache, dtypes and logical axis annotations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax.models import Decoder, KVCache, ModelConfig, forward, from_pretrained, init_cache
from tropd_jax.models.attention import target_backend

# The parity tests' reference: the CPU build of PyTorch (README, Tests); skipped without it.
torch = pytest.importorskip('torch')

# One case per architecture, each exercising what the published checkpoints of that family use:
# Qwen2 (q/k/v biases, untied), Qwen3 (q/k norms, tied embeddings), Llama 3 (llama3 RoPE scaling, and biases on
# q/k/v/o to cover that path).
ARCHITECTURES = {
    'qwen2': dict(architecture='qwen2', tie_word_embeddings=False),
    'qwen3': dict(architecture='qwen3', tie_word_embeddings=True),
    'llama': dict(
        architecture='llama',
        attention_bias=True,
        rope_parameters={
            'rope_type': 'llama3',
            'rope_theta': 500000.0,
            'factor': 8.0,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
            'original_max_position_embeddings': 64,
        },
    ),
}

_forward = jax.jit(forward, static_argnums=(0, 6))


def padded_batch(vocab_size, lengths, total, seed=0):
    """Left-padded tokens [B, total], mask and positions (`max(cumsum(mask) - 1, 0)`) for rows of `lengths`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, (len(lengths), total))
    mask = np.zeros((len(lengths), total), np.int32)
    for row, length in enumerate(lengths):
        mask[row, total - length :] = 1
    tokens = np.where(mask == 1, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()


def run(model, tokens, mask, positions, cache=None, return_hidden=False):
    graphdef, state = nnx.split(model)
    return _forward(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), cache, return_hidden
    )


# Every test uses this batch shape, so each architecture compiles its full forward once.
BATCH_LENGTHS, TOTAL = [10, 7, 2], 10


@pytest.fixture(scope='module', params=list(ARCHITECTURES))
def checkpoint(request, tiny_hf_checkpoint):
    """(architecture, single-file path, sharded path, torch model); both directories hold the same weights."""
    arch = request.param
    path, torch_model = tiny_hf_checkpoint(**ARCHITECTURES[arch])
    sharded_path, _ = tiny_hf_checkpoint(**ARCHITECTURES[arch], max_shard_size='20KB')
    return arch, path, sharded_path, torch_model


@pytest.mark.parametrize('sharded', [False, True], ids=['single_file', 'sharded'])
def test_logits_match_transformers(checkpoint, sharded):
    arch, path, sharded_path, torch_model = checkpoint
    path = sharded_path if sharded else path
    assert os.path.exists(os.path.join(path, 'model.safetensors.index.json')) == sharded
    model, config = from_pretrained(path)
    assert config.architecture == arch

    tokens, mask, positions = padded_batch(config.vocab_size, BATCH_LENGTHS, TOTAL)
    expected = torch_logits(torch_model, tokens, mask, positions)
    logits, cache = run(model, tokens, mask, positions)
    assert cache is None
    assert logits.shape == (3, TOTAL, config.vocab_size) and logits.dtype == jnp.float32
    real = mask.astype(bool)  # padding positions are not compared: their outputs are unspecified
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(logits)).all()


def test_hidden_states_and_lm_head(checkpoint):
    _, path, _, torch_model = checkpoint
    model, config = from_pretrained(path)
    tokens, mask, positions = padded_batch(config.vocab_size, BATCH_LENGTHS, TOTAL)
    hidden, _ = run(model, tokens, mask, positions, return_hidden=True)
    assert hidden.shape == (3, TOTAL, config.hidden_size)
    with torch.no_grad():
        expected = torch_model.model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], expected[real], atol=1e-4, rtol=1e-4)
    head = model.lm_head_weight()
    assert head.shape == (config.hidden_size, config.vocab_size)
    np.testing.assert_array_equal(np.asarray(head), torch_model.lm_head.weight.detach().numpy().T)
    logits, _ = run(model, tokens, mask, positions)
    np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(logits), atol=1e-5)


def test_cached_decode_matches_full_forward(checkpoint):
    """Prefill a left-padded prompt, then feed the rest one token at a time: the logits equal the full forward."""
    arch, path, _, _ = checkpoint
    model, config = from_pretrained(path)
    prompt = 5
    tokens, mask, positions = padded_batch(config.vocab_size, BATCH_LENGTHS, TOTAL, seed=2)
    mask[1, 7] = 0  # a padding hole inside the decoded part must be skipped by later queries too
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full, _ = run(model, tokens, mask, positions)

    real = mask.astype(bool)
    layer_shape = (3, config.num_kv_heads, config.head_dim, TOTAL + 3)  # k is stored slots-last
    cache = init_cache(config, batch_size=3, max_length=TOTAL + 3)
    assert len(cache.k) == config.num_layers and all(k.shape == layer_shape for k in cache.k)
    outs = []
    out, cache = run(model, tokens[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)
    outs.append(out)
    for t in range(prompt, TOTAL):
        out, cache = run(model, tokens[:, t : t + 1], mask[:, t : t + 1], positions[:, t : t + 1], cache)
        outs.append(out)
    assert isinstance(cache, KVCache) and int(cache.index) == TOTAL
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :TOTAL]), real)
    assert not np.asarray(cache.valid[:, TOTAL:]).any()
    decoded = np.concatenate([np.asarray(o) for o in outs], axis=1)
    np.testing.assert_allclose(decoded[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)


def test_cached_decode_inside_while_loop(tiny_hf_checkpoint):
    """The sampler's pattern: `forward` in a `lax.while_loop` body with the cache as the carry."""
    path, _ = tiny_hf_checkpoint(**ARCHITECTURES['qwen3'])
    model, config = from_pretrained(path)
    tokens, mask, positions = padded_batch(config.vocab_size, [8, 5], 8, seed=3)
    full, _ = run(model, tokens, mask, positions)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, tokens, mask, positions):
        cache = init_cache(config, 2, 8)
        _, cache = forward(graphdef, state, tokens[:, :3], positions[:, :3], mask[:, :3], cache)

        def body(carry):
            t, cache, out = carry
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
            logits, cache = forward(graphdef, state, take(tokens), take(positions), take(mask), cache)
            return t + 1, cache, jax.lax.dynamic_update_slice_in_dim(out, logits, t, axis=1)

        out = jnp.zeros((2, 8, config.vocab_size), jnp.float32)
        return jax.lax.while_loop(lambda c: c[0] < 8, body, (3, cache, out))[2]

    out = decode(state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    real = mask.astype(bool)
    real[:, :3] = False
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)


def test_decode_step_concatenates_weights_on_cpu_only(tiny_hf_checkpoint):
    """A one-token step multiplies by concatenated q|k|v and gate|up weights on CPU (fewer, larger matmuls); traced
    for a TPU it does not (XLA would hoist the concatenations out of the decode loop: a second copy of most of each
    layer's weights for the whole loop)."""
    path, _ = tiny_hf_checkpoint(**ARCHITECTURES['qwen3'])
    model, config = from_pretrained(path)
    graphdef, state = nnx.split(model)
    one = jnp.ones((2, 1), jnp.int32)
    weight_sizes = {config.num_heads * config.head_dim + 2 * config.num_kv_heads * config.head_dim}
    weight_sizes.add(2 * config.intermediate_size)

    def concatenated_weights():
        cache = init_cache(config, 2, 8)
        jaxpr = jax.make_jaxpr(lambda state: forward(graphdef, state, one, one, one, cache))(state)
        found = []
        for eqn in jaxpr.jaxpr.eqns:
            if eqn.primitive.name == 'concatenate' and eqn.outvars[0].aval.shape[-1] in weight_sizes:
                found.append(eqn.outvars[0].aval.shape)
        return found

    assert len(concatenated_weights()) == 2 * config.num_layers  # q|k|v and gate|up of every layer
    with target_backend('tpu'):
        assert concatenated_weights() == []


def test_bfloat16_params_and_compute(tiny_hf_checkpoint):
    path, torch_model = tiny_hf_checkpoint(**ARCHITECTURES['qwen2'])
    model, config = from_pretrained(path, dtype='bfloat16')
    assert config.dtype == config.param_dtype == 'bfloat16'
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.bfloat16 for p in params)
    tokens, mask, positions = padded_batch(config.vocab_size, [6, 3], 6, seed=4)
    logits, _ = run(model, tokens, mask, positions)
    assert logits.dtype == jnp.bfloat16
    expected = torch_logits(torch_model, tokens, mask, positions)
    real = mask.astype(bool)
    # bf16 keeps ~3 significant digits; a wrong layout or mask would be off by O(1).
    np.testing.assert_allclose(np.asarray(logits, np.float32)[real], expected[real], atol=0.25, rtol=0.05)

    model32, _ = from_pretrained(path, dtype='bfloat16', param_dtype='float32')
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model32, nnx.Param)))
    assert run(model32, tokens, mask, positions)[0].dtype == jnp.bfloat16


def test_parameters_carry_logical_axes():
    config = ModelConfig(
        architecture='qwen2',
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        attention_bias=True,
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    axes = {
        '/'.join(map(str, path)): var.get_metadata()['out_sharding']
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert axes['embed'] == ('vocab', 'embed')
    assert axes['lm_head'] == ('embed', 'vocab')
    assert axes['layers/0/attn/q_proj'] == ('embed', 'heads', 'head_dim')
    assert axes['layers/0/attn/k_proj'] == ('embed', 'kv_heads', 'head_dim')
    assert axes['layers/0/attn/o_proj'] == ('heads', 'head_dim', 'embed')
    assert axes['layers/0/attn/q_bias'] == ('heads', 'head_dim')
    assert axes['layers/0/mlp/gate_proj'] == ('embed', 'mlp')
    assert axes['layers/0/mlp/down_proj'] == ('mlp', 'embed')
    assert axes['final_norm'] == ('embed',)
    assert 'layers/0/attn/o_bias' not in axes  # Qwen2 has no o_proj bias
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert len(var.get_metadata()['out_sharding']) == var.get_value().ndim, path


def test_config_validation_errors():
    base = dict(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4
    )
    with pytest.raises(ValueError, match="'gpt2'"):
        ModelConfig(architecture='gpt2', **base)
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        ModelConfig(architecture='llama', param_dtype='float16', **base)
    with pytest.raises(ValueError, match='num_kv_heads=3'):
        ModelConfig(architecture='llama', **{**base, 'num_kv_heads': 3})
    with pytest.raises(ValueError, match="'yarn'"):
        ModelConfig(architecture='llama', rope_scaling={'rope_type': 'yarn', 'factor': 4.0}, **base)


def _with_runtime(model, **fields):
    """The same weights run with other `ModelConfig` runtime fields (attention kernel, rematerialisation)."""
    model.config = model.config.replace(**fields)
    return model


@pytest.mark.parametrize(
    'remat',
    ['none', *(pytest.param(r, marks=pytest.mark.slow) for r in ('full', 'save_dots', 'full+scan', 'none+mlp_chunks'))],
)
def test_blockwise_attention_and_remat_match_transformers(checkpoint, remat):
    """Several key / query blocks (block 8 over 20 columns, rows of different lengths, a padding hole), then the
    prefill of a cache through the same kernel: both equal transformers; remat, scanning the layers and running the
    MLP 8 positions at a time (8 + 8 + 4) change no logit."""
    arch, path, _, torch_model = checkpoint
    model, config = from_pretrained(path)
    remat, scan, chunks = remat.split('+')[0], remat.endswith('+scan'), remat.endswith('+mlp_chunks')
    _with_runtime(
        model,
        attention='blockwise',
        attention_block_size=8,
        remat=remat,
        scan_layers=scan,
        mlp_chunk_size=8 if chunks else 0,
    )
    tokens, mask, positions = padded_batch(config.vocab_size, [20, 13, 5], 20, seed=5)
    mask[0, 9] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = torch_logits(torch_model, tokens, mask, positions)
    real = mask.astype(bool)
    logits, _ = run(model, tokens, mask, positions)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-4, rtol=1e-4)
    if remat == 'none':
        cache = init_cache(config, batch_size=3, max_length=24)
        prefill, cache = run(model, tokens, mask, positions, cache)
        np.testing.assert_allclose(np.asarray(prefill)[real], expected[real], atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(cache.valid[:, :20]), real)


@pytest.mark.slow
def test_remat_leaves_gradients_unchanged(tiny_hf_checkpoint):
    """d(sum of weighted logits at real positions)/d(params) is the same with every rematerialisation policy, with
    the blockwise kernel (whose backward is its own custom VJP) and with the layers scanned (each layer's gradient
    reaches its own parameters through the stack), and with the MLP run a chunk of positions at a time (its own custom
    VJP; 5 + 5 + 5 + 3 positions)."""
    path, _ = tiny_hf_checkpoint(**ARCHITECTURES['qwen2'], num_hidden_layers=3)
    tokens, mask, positions = padded_batch(128, [18, 11, 4], 18, seed=6)
    weights = np.random.default_rng(7).normal(size=(3, 18, 128)) * mask[:, :, None]

    def grads(**fields):
        model, _ = from_pretrained(path)
        graphdef, state = nnx.split(_with_runtime(model, **fields))

        def loss(state):
            logits, _ = forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
            return jnp.sum(logits * weights)

        return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    reference = grads(attention='naive', remat='none')
    for fields in (
        dict(attention='naive', remat='full'),
        dict(attention='naive', remat='save_dots'),
        dict(attention='naive', remat='offload'),
        dict(attention='blockwise', attention_block_size=8, remat='full'),
        dict(attention='naive', remat='none', scan_layers=True),
        dict(attention='blockwise', attention_block_size=8, remat='full', scan_layers=True),
        dict(attention='blockwise', attention_block_size=8, remat='offload', scan_layers=True),
        dict(attention='naive', remat='none', mlp_chunk_size=5),
        dict(attention='blockwise', attention_block_size=8, remat='full', scan_layers=True, mlp_chunk_size=5),
    ):
        for got, want in zip(grads(**fields), reference):
            # float32 sums in another order: differences relative to the largest entry of each gradient
            scale = float(jnp.abs(want).max())
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=1e-5, err_msg=str(fields)
            )
    assert max(float(jnp.abs(g).max()) for g in reference) > 1e-2  # the gradients are not trivially zero
