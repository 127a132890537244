"""Load and export Hugging Face checkpoints (config.json + safetensors) for Qwen2 / Qwen3 / Llama.

The name map is explicit: every HF tensor name maps to one `Decoder` parameter path and a layout change
(HF linear weights are [out, in]; ours are [in, ...] with heads split out). Loading reads one safetensors shard
at a time and one tensor at a time, converts it on the host and hands each device only its slice of the target
sharding (`jax.make_array_from_callback`), so a full model is never gathered on one device.
"""

import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import paths, sharding
from tropd_jax.models.config import ModelConfig, dtype_name
from tropd_jax.models.decoder import Decoder

CONFIG_NAME = 'config.json'
SAFE_WEIGHTS_NAME = 'model.safetensors'
SAFE_WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'

# HF tensors that hold no parameters of ours and are skipped when present (old checkpoints store RoPE buffers).
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


class _Conversion:
    """One HF tensor <-> one parameter: `to_ours(hf_array, config)` and `to_hf(our_array, config)`."""

    def __init__(self, path: tuple, to_ours: Callable, to_hf: Callable):
        self.path, self.to_ours, self.to_hf = path, to_ours, to_hf


def _same(x, c):
    return x


def _transpose(x, c):
    return x.T


def _in_heads(num_heads_attr):
    """HF [heads * D, H] -> ours [H, heads, D] and back."""

    def to_ours(x, c):
        return x.T.reshape(c.hidden_size, getattr(c, num_heads_attr), c.head_dim)

    def to_hf(x, c):
        return x.reshape(c.hidden_size, -1).T

    return to_ours, to_hf


def _bias_heads(num_heads_attr):
    """HF [heads * D] -> ours [heads, D] and back."""

    def to_ours(x, c):
        return x.reshape(getattr(c, num_heads_attr), c.head_dim)

    def to_hf(x, c):
        return x.reshape(-1)

    return to_ours, to_hf


def _out_heads():
    """HF o_proj [H, N * D] -> ours [N, D, H] and back."""

    def to_ours(x, c):
        return x.T.reshape(c.num_heads, c.head_dim, c.hidden_size)

    def to_hf(x, c):
        return x.reshape(-1, c.hidden_size).T

    return to_ours, to_hf


def key_map(config: ModelConfig) -> dict[str, _Conversion]:
    """Every HF tensor name of this architecture -> its parameter path in `Decoder` and the layout conversion."""
    m = {
        'model.embed_tokens.weight': _Conversion(('embed',), _same, _same),
        'model.norm.weight': _Conversion(('final_norm',), _same, _same),
    }
    if not config.tie_word_embeddings:
        m['lm_head.weight'] = _Conversion(('lm_head',), _transpose, _transpose)
    for i in range(config.num_layers):
        hf, ours = f'model.layers.{i}.', ('layers', i)
        m[hf + 'input_layernorm.weight'] = _Conversion(ours + ('input_norm',), _same, _same)
        m[hf + 'post_attention_layernorm.weight'] = _Conversion(ours + ('post_attention_norm',), _same, _same)
        for name, heads in (('q', 'num_heads'), ('k', 'num_kv_heads'), ('v', 'num_kv_heads')):
            m[hf + f'self_attn.{name}_proj.weight'] = _Conversion(ours + ('attn', f'{name}_proj'), *_in_heads(heads))
            if config.attention_bias:
                m[hf + f'self_attn.{name}_proj.bias'] = _Conversion(
                    ours + ('attn', f'{name}_bias'), *_bias_heads(heads)
                )
        m[hf + 'self_attn.o_proj.weight'] = _Conversion(ours + ('attn', 'o_proj'), *_out_heads())
        if config.attention_bias and config.architecture != 'qwen2':
            m[hf + 'self_attn.o_proj.bias'] = _Conversion(ours + ('attn', 'o_bias'), _same, _same)
        if config.qk_norm:
            m[hf + 'self_attn.q_norm.weight'] = _Conversion(ours + ('attn', 'q_norm'), _same, _same)
            m[hf + 'self_attn.k_norm.weight'] = _Conversion(ours + ('attn', 'k_norm'), _same, _same)
        for name in ('gate_proj', 'up_proj', 'down_proj'):
            m[hf + f'mlp.{name}.weight'] = _Conversion(ours + ('mlp', name), _transpose, _transpose)
    return m


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory, from the index when there is one."""
    index_path = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)['weight_map']
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, SAFE_WEIGHTS_NAME)):
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f'No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path!r}.')
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(
                f'Weight file {name!r} listed in {SAFE_WEIGHTS_INDEX_NAME} is missing from {path!r}.'
            )
    return [os.path.join(path, name) for name in files]


def load_config(path: str, *, dtype=None, param_dtype=None) -> ModelConfig:
    """The `ModelConfig` of a local HF checkpoint directory."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f'No {CONFIG_NAME} in {path!r}.')
    with open(config_path) as f:
        return ModelConfig.from_hf(json.load(f), dtype=dtype or 'float32', param_dtype=param_dtype or 'float32')


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def from_pretrained(
    path: str, *, dtype=None, param_dtype=None, mesh: jax.sharding.Mesh | None = None
) -> tuple[Decoder, ModelConfig]:
    """Loads a HF checkpoint directory (local, or a `gs://` URL copied to a local cache) into a `Decoder`.

    Args:
      path: directory with config.json and model.safetensors (or model.safetensors.index.json and its shards).
      dtype: compute dtype, 'float32' or 'bfloat16' by name or as the NumPy / JAX dtype (`jnp.bfloat16`);
        default 'float32'.
      param_dtype: parameter dtype (default: `dtype`, else 'float32').
      mesh: a ('data', 'fsdp', 'tensor') mesh to shard the parameters over; None puts them on the default device.

    Returns:
      (model, config). Missing, unexpected or wrongly shaped tensors raise a ValueError naming the key.
    """
    path = paths.local_copy(path)  # safetensors maps local files: a gs:// checkpoint is copied once
    config = load_config(path, dtype=dtype, param_dtype=param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    conversions = key_map(config)
    param_dtype = jnp.dtype(config.param_dtype)
    loaded = set()

    for file in _weight_files(path):
        with safetensors.safe_open(file, framework='numpy') as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == 'lm_head.weight'):
                    continue  # A tied checkpoint may still store lm_head.weight; the embedding is the LM head.
                if name not in conversions:
                    raise ValueError(
                        f'Unexpected tensor {name!r} in {os.path.basename(file)} for a {config.architecture} '
                        f'model with this config.json.'
                    )
                if name in loaded:
                    raise ValueError(f'Tensor {name!r} appears in more than one weight file.')
                conv = conversions[name]
                target = _get(pure, conv.path)
                hf_shape = tuple(f.get_slice(name).get_shape())
                # A zero-strided stand-in gives the expected HF shape without allocating or reading anything.
                expected = conv.to_hf(np.broadcast_to(np.zeros((), np.uint8), target.shape), config).shape
                if hf_shape != expected:
                    raise ValueError(f'Tensor {name!r} has shape {hf_shape}; this config.json expects {expected}.')
                array = conv.to_ours(f.get_tensor(name), config)
                _set(pure, conv.path, _place(array, param_dtype, mesh, _logical_axes(state, conv.path)))
                loaded.add(name)

    missing = sorted(set(conversions) - loaded)
    if missing:
        raise ValueError(f'Checkpoint {path!r} is missing {len(missing)} tensor(s), e.g. {missing[:3]}.')
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), config


def _set(tree, path, value):
    _get(tree, path[:-1])[path[-1]] = value


def _logical_axes(state, path):
    variable = _get(state, path)
    return variable.get_metadata().get('out_sharding')


def _place(array: np.ndarray, dtype, mesh, logical_axes) -> jax.Array:
    """A host array as a jax.Array of `dtype`; on `mesh`, each device receives only its own slice."""
    if mesh is None:
        return jnp.asarray(array.astype(dtype))
    target = sharding.logical_sharding(logical_axes, array.shape, mesh)
    return jax.make_array_from_callback(
        array.shape, target, lambda index: np.asarray(array[index]).astype(dtype), dtype=dtype
    )  # dtype: a mesh on other processes' devices has no shards here


def _hf_tensor(model: Decoder, conversion: _Conversion, dtype) -> np.ndarray:
    """One parameter of `model` in its HF layout, gathered to the host as `dtype`."""
    value = _get(nnx.state(model, nnx.Param), conversion.path).get_value()
    if not value.is_fully_addressable:  # multi-host: every process takes part in the gather
        value = multihost_utils.process_allgather(value, tiled=True)
    value = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(conversion.to_hf(value, model.config).astype(dtype))


def save_pretrained(model: Decoder, path: str, tokenizer=None, *, max_shard_size: int = 5 * 2**30, dtype=None) -> None:
    """Writes `model` as a HF checkpoint directory that `transformers.AutoModelForCausalLM` loads.

    Args:
      model: a `Decoder` (sharded or not). Tensors are gathered to the host one file at a time, so host memory
        holds at most one file's worth. On multi-host meshes every process must call this; process 0 writes.
      path: output directory (created): local, or a `gs://` URL (`tropd_jax.paths`).
      tokenizer: optional HF tokenizer saved alongside (tokenizer files, chat template).
      max_shard_size: bytes per safetensors file; above it the weights are split into
        model-0000i-of-0000n.safetensors with model.safetensors.index.json.
      dtype: storage dtype of the tensors, 'float32' or 'bfloat16' by name or as the NumPy / JAX dtype (default:
        the config's param_dtype).
    """
    if not paths.is_local(path):  # written to a local directory, then copied (gs://...)
        with paths.local_dir_for(path) as local:
            return save_pretrained(model, local, tokenizer, max_shard_size=max_shard_size, dtype=dtype)
    config = model.config
    dtype = dtype_name(dtype or config.param_dtype, 'save_pretrained dtype')
    np_dtype = ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.dtype(dtype)
    writer = jax.process_index() == 0

    # Plan the files from shapes alone, then gather and write one file at a time.
    conversions = key_map(config)
    state = nnx.state(model, nnx.Param)
    files, current, size = [], [], 0
    for name, conv in conversions.items():
        nbytes = math.prod(_get(state, conv.path).get_value().shape) * np.dtype(np_dtype).itemsize
        if current and size + nbytes > max_shard_size:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    files.append(current)
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(files) == 1
        else [f'model-{i + 1:05d}-of-{len(files):05d}.safetensors' for i in range(len(files))]
    )

    if writer:
        os.makedirs(path, exist_ok=True)
        for stale in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
            if os.path.exists(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))
        with open(os.path.join(path, CONFIG_NAME), 'w') as f:
            json.dump(config.replace(param_dtype=dtype).to_hf(), f, indent=2)
        _write_generation_config(config, path)
    weight_map, total = {}, 0
    for file_name, keys in zip(names, files):
        tensors = {key: _hf_tensor(model, conversions[key], np_dtype) for key in keys}
        total += sum(a.nbytes for a in tensors.values())
        weight_map.update({key: file_name for key in keys})
        if writer:
            safetensors.numpy.save_file(tensors, os.path.join(path, file_name), metadata={'format': 'pt'})
        del tensors
    if writer and len(files) > 1:
        with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), 'w') as f:
            json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    if writer and tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_pretrained_state(graphdef, state, mesh, path: str, tokenizer=None) -> None:
    """`save_pretrained` of the model `nnx.merge(graphdef, state)` (the trainer's `(graphdef, params)`), called by
    every process: on several processes the state is first replicated over `mesh`, so that process 0, which writes,
    holds every weight."""
    if jax.process_count() > 1:  # every process must see every shard before one of them writes
        replicated = NamedSharding(mesh, PartitionSpec())
        state = jax.jit(lambda x: x, out_shardings=jax.tree.map(lambda _: replicated, state))(state)
    if jax.process_index() == 0:
        save_pretrained(nnx.merge(graphdef, state), path, tokenizer)


def _write_generation_config(config: ModelConfig, path: str) -> None:
    """generation_config.json with the special token ids, so serving stacks stop at EOS."""
    generation = {
        'bos_token_id': config.bos_token_id,
        'pad_token_id': config.pad_token_id,
        'eos_token_id': list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
    }
    generation = {k: v for k, v in generation.items() if v is not None}
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
        json.dump(generation, f, indent=2)
