"""Hugging Face checkpoint load / export: transformers reload, lossless round trips, config.json, error paths."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

from tropd_jax.models import ModelConfig, forward, from_pretrained, save_pretrained
from tropd_jax.models.hf import key_map

# The parity tests' reference: the CPU build of PyTorch (README, Tests); skipped without it.
torch = pytest.importorskip('torch')

_forward = jax.jit(forward, static_argnums=(0, 6))


def batch(vocab_size):
    tokens = np.random.default_rng(0).integers(3, vocab_size, (2, 6))
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int32)
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def jax_logits(model):
    tokens, mask, positions = batch(model.config.vocab_size)
    graphdef, state = nnx.split(model)
    logits, _ = _forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), None, False)
    return np.asarray(logits, np.float32), mask.astype(bool)


def hf_logits(path, vocab_size):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, mask, positions = batch(vocab_size)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


def params(model):
    return {'/'.join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope='module')
def llama3(tiny_hf_checkpoint):
    """Llama 3 with its RoPE scaling and several EOS ids, as in the published config.json."""
    return tiny_hf_checkpoint(
        'llama',
        eos_token_id=[2, 5],
        rope_parameters={
            'rope_type': 'llama3',
            'rope_theta': 500000.0,
            'factor': 8.0,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
            'original_max_position_embeddings': 64,
        },
    )


@pytest.mark.parametrize('arch,sharded', [('qwen2', False), ('qwen3', True), ('llama', False)])
def test_export_reloads_in_transformers(tiny_hf_checkpoint, tmp_path, arch, sharded, llama3):
    path, _ = llama3 if arch == 'llama' else tiny_hf_checkpoint(arch, tie_word_embeddings=arch == 'qwen3')
    model, config = from_pretrained(path)
    out = str(tmp_path / 'export')
    save_pretrained(model, out, max_shard_size=20_000 if sharded else 5 * 2**30)
    index = os.path.join(out, 'model.safetensors.index.json')
    assert os.path.exists(index) == sharded
    assert os.path.exists(os.path.join(out, 'model.safetensors')) != sharded
    if sharded:
        weight_map = json.load(open(index))['weight_map']
        assert len(set(weight_map.values())) > 1 and set(weight_map) == set(key_map(config))

    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.model_type == arch and hf_config.tie_word_embeddings == config.tie_word_embeddings
    logits, real = jax_logits(model)
    np.testing.assert_allclose(hf_logits(out, config.vocab_size)[real], logits[real], atol=1e-4, rtol=1e-4)
    assert ModelConfig.from_hf(json.load(open(os.path.join(out, 'config.json')))) == config


@pytest.mark.parametrize('storage', ['float32', 'bfloat16'])
def test_load_export_load_is_lossless(tiny_hf_checkpoint, tmp_path, storage):
    path, _ = tiny_hf_checkpoint('qwen2')
    model, config = from_pretrained(path, param_dtype=storage)
    save_pretrained(model, str(tmp_path / 'a'), max_shard_size=30_000)
    again, config_again = from_pretrained(str(tmp_path / 'a'), param_dtype=storage)
    assert config_again == config
    first, second = params(model), params(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype == jnp.dtype(storage), name
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # The exported tensors equal the original checkpoint's, bit for bit in float32.
    if storage == 'float32':
        original = safetensors.numpy.load_file(os.path.join(path, 'model.safetensors'))
        exported = {}
        for file in os.listdir(tmp_path / 'a'):
            if file.endswith('.safetensors'):
                exported.update(safetensors.numpy.load_file(str(tmp_path / 'a' / file)))
        assert exported.keys() == original.keys()
        for name in original:
            np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


def test_export_writes_tokenizer_and_generation_config(tiny_hf_checkpoint, tmp_path, llama3):
    path, _ = llama3
    model, _ = from_pretrained(path)
    tokenizer = _tiny_tokenizer()
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.chat_template == tokenizer.chat_template
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert generation.eos_token_id == [2, 5]


def _tiny_tokenizer():
    import tokenizers

    vocab = {f't{i}': i for i in range(128)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='t0'))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token='t2',
        pad_token='t0',
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )


def test_config_from_hf_v4_layout():
    """Published Qwen2.5 / Llama 3 config.json files use the v4 rope_theta / rope_scaling fields."""
    hf = {
        'model_type': 'llama',
        'vocab_size': 128256,
        'hidden_size': 2048,
        'intermediate_size': 8192,
        'num_hidden_layers': 16,
        'num_attention_heads': 32,
        'num_key_value_heads': 8,
        'rope_theta': 500000.0,
        'rope_scaling': {
            'rope_type': 'llama3',
            'factor': 32.0,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
            'original_max_position_embeddings': 8192,
        },
        'rms_norm_eps': 1e-5,
        'tie_word_embeddings': True,
        'eos_token_id': [128001, 128008, 128009],
    }
    config = ModelConfig.from_hf(hf)
    assert config.head_dim == 64 and config.rope_theta == 500000.0 and config.rope_scaling['factor'] == 32.0
    assert config.eos_token_ids == (128001, 128008, 128009) and not config.qk_norm and not config.attention_bias
    qwen2 = ModelConfig.from_hf(
        {
            'model_type': 'qwen2',
            'vocab_size': 151936,
            'hidden_size': 1536,
            'intermediate_size': 8960,
            'num_hidden_layers': 28,
            'num_attention_heads': 12,
            'num_key_value_heads': 2,
            'rope_theta': 10000,
            'rope_scaling': None,
        }
    )
    assert qwen2.attention_bias and qwen2.rope_scaling is None and qwen2.head_dim == 128
    assert ModelConfig.from_hf(qwen2.to_hf()) == qwen2
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    'change,message',
    [
        ({'model_type': 'mistral'}, "model_type='mistral'"),
        ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
        ({'use_sliding_window': True}, 'use_sliding_window'),
        ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}}, "'yarn'"),
    ],
)
def test_bad_config_errors(tiny_hf_checkpoint, change, message):
    path, _ = tiny_hf_checkpoint('qwen3')
    config = json.load(open(os.path.join(path, 'config.json')))
    config.update(change)
    json.dump(config, open(os.path.join(path, 'config.json'), 'w'))
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


def _edit_weights(path, edit):
    file = os.path.join(path, 'model.safetensors')
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={'format': 'pt'})


def test_missing_tensor_error(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint('qwen2')
    _edit_weights(path, lambda t: t.pop('model.layers.1.self_attn.k_proj.bias'))
    with pytest.raises(ValueError, match=r'missing 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.bias'):
        from_pretrained(path)


def test_unexpected_tensor_error(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint('qwen3')
    _edit_weights(path, lambda t: t.update({'model.layers.0.self_attn.extra.weight': np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"Unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        from_pretrained(path)


def test_wrong_shape_error(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint('llama')
    _edit_weights(path, lambda t: t.update({'model.layers.0.mlp.up_proj.weight': np.zeros((64, 31), np.float32)}))
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(64, 31\); "
        r'this config.json expects \(64, 32\)',
    ):
        from_pretrained(path)


def test_missing_files_errors(tiny_hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        from_pretrained(str(tmp_path))
    path, _ = tiny_hf_checkpoint('qwen2', max_shard_size='20KB')
    weight_map = json.load(open(os.path.join(path, 'model.safetensors.index.json')))['weight_map']
    lost = sorted(set(weight_map.values()))[-1]
    os.remove(os.path.join(path, lost))
    with pytest.raises(FileNotFoundError, match=lost):
        from_pretrained(path)
    os.remove(os.path.join(path, 'model.safetensors.index.json'))
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        from_pretrained(path)


def test_save_pretrained_rejects_unknown_dtype(tiny_hf_checkpoint, tmp_path):
    path, _ = tiny_hf_checkpoint('qwen2')
    model, _ = from_pretrained(path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        save_pretrained(model, str(tmp_path), dtype='float16')


@pytest.mark.parametrize(
    'dtype, name',
    [
        (jnp.float32, 'float32'),
        (jnp.bfloat16, 'bfloat16'),
        (np.float32, 'float32'),
        (np.dtype('float32'), 'float32'),
        (jnp.dtype('bfloat16'), 'bfloat16'),
        (ml_dtypes.bfloat16, 'bfloat16'),
        ('bfloat16', 'bfloat16'),
    ],
)
def test_dtypes_are_taken_as_jax_or_numpy_dtypes_or_names(tiny_hf_checkpoint, tmp_path, dtype, name):
    path, _ = tiny_hf_checkpoint('qwen2')
    model, config = from_pretrained(path, dtype=dtype)
    assert config.dtype == config.param_dtype == name  # stored by name: hashable, written to config.json as is
    assert all(p.dtype == jnp.dtype(name) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    hash(config)
    assert config.replace(dtype=dtype) == config
    save_pretrained(model, str(tmp_path), dtype=dtype)
    assert json.load(open(os.path.join(tmp_path, 'config.json')))['dtype'] == name
    assert {a.dtype for a in safetensors.numpy.load_file(str(tmp_path / 'model.safetensors')).values()} == {
        np.dtype(ml_dtypes.bfloat16 if name == 'bfloat16' else name)
    }


def test_unsupported_dtype_objects_are_refused_by_value(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint('qwen2')
    with pytest.raises(ValueError, match=r"dtype=<class 'jax.numpy.float16'> is not one of \('float32', 'bfloat16'\)"):
        from_pretrained(path, dtype=jnp.float16)
    with pytest.raises(ValueError, match=r'param_dtype=None is not one of'):
        ModelConfig.from_hf(
            {
                'model_type': 'qwen3',
                'vocab_size': 8,
                'hidden_size': 8,
                'intermediate_size': 8,
                'num_hidden_layers': 1,
                'num_attention_heads': 2,
            },
            param_dtype=None,
        )
