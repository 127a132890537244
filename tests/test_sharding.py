"""Mesh construction, the logical-axis table, and a sharded model on 8 fake CPU devices (2 x 2 x 2 mesh)."""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from tropd_jax import sharding


def test_logical_to_spec_follows_the_rules():
    assert sharding.logical_to_spec(('vocab', 'embed')) == P('tensor', 'fsdp')
    assert sharding.logical_to_spec(('embed', 'heads', 'head_dim')) == P('fsdp', 'tensor', None)
    assert sharding.logical_to_spec(('batch', 'length', None)) == P(('data', 'fsdp'), None, None)
    # A mesh axis is used at most once per array: 'embed' cannot take 'fsdp' after 'batch' did.
    assert sharding.logical_to_spec(('batch', 'embed')) == P(('data', 'fsdp'), None)


def test_logical_to_spec_errors():
    with pytest.raises(ValueError, match="'hidden'"):
        sharding.logical_to_spec(('hidden',))
    with pytest.raises(ValueError, match=r'shape \(3,\)'):
        sharding.logical_to_spec(('vocab', 'embed'), (3,))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r'needs 8 devices; 1 are available'):
        sharding.make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match='At most one'):
        sharding.make_mesh(-1, -1, 1)
    mesh = sharding.make_mesh(1, -1, 1)
    assert mesh.axis_names == ('data', 'fsdp', 'tensor') and mesh.devices.size == 1


# Runs with 8 fake CPU devices; XLA_FLAGS must be set before jax is imported, hence a separate process.
_SHARDED_CHECK = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tropd_jax import sharding
    from tropd_jax.models import forward, from_pretrained, init_cache, init_decoder, save_pretrained

    path, export = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    single, config = from_pretrained(path)
    model, _ = from_pretrained(path, mesh=mesh)

    expected = {
        'embed': P('tensor', 'fsdp'), 'final_norm': P('fsdp'),
        'layers/0/attn/q_proj': P('fsdp', 'tensor', None), 'layers/0/attn/k_proj': P('fsdp', 'tensor', None),
        'layers/0/attn/o_proj': P('tensor', None, 'fsdp'), 'layers/0/attn/q_bias': P('tensor', None),
        'layers/1/mlp/gate_proj': P('fsdp', 'tensor'), 'layers/1/mlp/down_proj': P('tensor', 'fsdp'),
        'lm_head': P('fsdp', 'tensor'), 'layers/1/input_norm': P('fsdp'),
    }
    flat = {'/'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name, spec in expected.items():
      assert flat[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), flat[name].ndim), name
    # Each device holds only its slice: the [128, 32] embedding is split 2 x 2 over tensor x fsdp.
    assert {s.data.shape for s in flat['embed'].addressable_shards} == {(64, 16)}
    for name, value in flat.items():
      assert len(value.sharding.device_set) == 8, name

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (4, 9))
    mask = np.ones((4, 9), np.int32); mask[1, :4] = 0; mask[3, :8] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    step = jax.jit(forward, static_argnums=(0, 6))

    graphdef, state = nnx.split(single)
    ref, _ = step(graphdef, state, *map(jnp.asarray, (tokens, positions, mask)), None, False)
    graphdef, state = nnx.split(model)
    rows = sharding.logical_sharding(('batch', 'length'), tokens.shape, mesh)
    with jax.set_mesh(mesh):
      out, _ = step(graphdef, state, *(jax.device_put(x, rows) for x in (tokens, positions, mask)), None, False)
      # Cached decode on the mesh, with the cache placed by the logical rules (`sharding.KV_CACHE_AXES`).
      cache = init_cache(config, 4, 12)
      place = lambda x, axes: jax.device_put(x, sharding.logical_sharding(axes, x.shape, mesh))
      cache = cache.replace(k=tuple(place(x, sharding.KV_CACHE_AXES['k']) for x in cache.k),
                            v=tuple(place(x, sharding.KV_CACHE_AXES['v']) for x in cache.v),
                            valid=place(cache.valid, ('batch', 'length')))
      pieces = []
      for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        piece, cache = step(graphdef, state, *(jax.device_put(x[:, lo:hi], rows) for x in (tokens, positions, mask)),
                            cache, False)
        pieces.append(np.asarray(piece))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(pieces, 1)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    assert cache.k[1].sharding.is_equivalent_to(NamedSharding(mesh, P(('data', 'fsdp'), 'tensor')), 4)

    # Export from the sharded model, reload on one device: bit-identical parameters.
    save_pretrained(model, export)
    back, _ = from_pretrained(export)
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single, nnx.Param)),
                              nnx.to_flat_state(nnx.state(back, nnx.Param))):
      np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(k))

    # Random init straight onto the mesh gets the same placements.
    fresh = init_decoder(config, seed=1, mesh=mesh)
    assert fresh.embed.get_value().sharding.is_equivalent_to(NamedSharding(mesh, P('tensor', 'fsdp')), 2)
    # A dimension the mesh axis does not divide stays whole along that axis (3 KV heads, tensor = 2).
    odd = init_decoder(config.replace(num_heads=6, num_kv_heads=3, head_dim=8), mesh=mesh)
    assert odd.layers[0].attn.k_proj.get_value().sharding.is_equivalent_to(NamedSharding(mesh, P('fsdp')), 3)
    print('OK')
""")


@pytest.mark.slow  # eight devices in a subprocess
def test_sharded_model_on_8_fake_devices(tiny_hf_checkpoint, tmp_path):
    path, _ = tiny_hf_checkpoint('qwen2', max_shard_size='20KB')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', _SHARDED_CHECK, path, str(tmp_path / 'export')], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip().endswith('OK'), result.stderr[-4000:]
