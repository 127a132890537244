"""`ModelConfig`: the architecture fields of a Qwen2 / Qwen3 / Llama checkpoint.

Read from and written to a Hugging Face `config.json`. Both the transformers v4 layout (`rope_theta`,
`rope_scaling` at the top level, as in published Qwen2.5 / Llama 3 checkpoints) and the v5 layout
(`rope_parameters`) are understood; `to_hf` writes the v5 layout, which transformers v5, vLLM and SGLang read.
"""

import dataclasses
from typing import Any

import numpy as np

ARCHITECTURES = ('qwen2', 'qwen3', 'llama')
DTYPES = ('float32', 'bfloat16')
ROPE_TYPES = ('default', 'linear', 'llama3')
ATTENTION_IMPLEMENTATIONS = ('auto', 'naive', 'blockwise', 'splash', 'cudnn')
REMAT_POLICIES = ('none', 'full', 'save_dots', 'offload')


def dtype_name(dtype, field: str = 'dtype') -> str:
    """'float32' or 'bfloat16' for a dtype given by name or as a NumPy / JAX dtype or scalar type (`jnp.bfloat16`)."""
    name = dtype
    if not isinstance(dtype, str) and dtype is not None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in DTYPES:
        raise ValueError(f'{field}={dtype!r} is not one of {DTYPES} (by name or as the NumPy / JAX dtype).')
    return name


# The `architectures` entry of config.json for each model_type.
_HF_CLASS = {'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'llama': 'LlamaForCausalLM'}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model.

    `dtype` is the compute (activation) dtype and `param_dtype` the storage dtype of the weights; both are
    'float32' or 'bfloat16' (given by name or as the NumPy / JAX dtype, stored by name). `rope_scaling` is None or a
    dict with a 'rope_type' of 'linear' or 'llama3' (plus that type's fields: 'factor', and for llama3
    'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'). `attention_bias` puts biases on q/k/v
    (and on o for Llama / Qwen3; Qwen2 never has an o bias). `qk_norm` is Qwen3's per-head RMSNorm on queries and keys.

    `attention`, `attention_block_size` and `remat` say how to run the model, not what it is (they are never read
    from or written to config.json): the attention kernel of multi-token calls (`tropd_jax.models.attention`) and
    the per-layer rematerialisation policy of the backward pass: 'none' keeps every activation, 'full' keeps only
    each layer's input and recomputes the rest, 'save_dots' also keeps the weight matmuls' outputs, 'offload' keeps
    each layer's input in pinned host memory instead of the device's (TPU / GPU; on CPU it is 'full').
    `scan_layers` runs cache-free calls (scoring, the train step) as a `lax.scan` over the layers instead of one
    traced copy per layer: compile time stays flat with depth and the backward pass runs layer after layer, for one
    copy of the layer weights in the compute dtype. `mlp_chunk_size` > 0 runs the MLP of calls over more positions than
    that one chunk of positions at a time, forward and backward (`decoder.chunked_swiglu`): its [B, T, M]
    activations, the largest of a layer, then never exist whole.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = 'float32'
    param_dtype: str = 'float32'
    attention: str = 'auto'
    attention_block_size: int = 512
    remat: str = 'none'
    scan_layers: bool = False
    mlp_chunk_size: int = 0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f'Unknown architecture {self.architecture!r}; supported: {ARCHITECTURES}.')
        for name in ('dtype', 'param_dtype'):  # stored by name, so the config stays hashable and writes to JSON
            object.__setattr__(self, name, dtype_name(getattr(self, name), name))
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f'attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}.')
        if self.attention_block_size < 8:
            raise ValueError(f'attention_block_size={self.attention_block_size} must be >= 8.')
        if not isinstance(self.mlp_chunk_size, int) or self.mlp_chunk_size < 0:
            raise ValueError(f'mlp_chunk_size={self.mlp_chunk_size!r} must be a non-negative integer (0 = no chunks).')
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f'remat={self.remat!r} is not one of {REMAT_POLICIES}.')
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.')
        if self.head_dim % 2:
            raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings.')
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get('rope_type')
            if rope_type not in ROPE_TYPES:
                raise ValueError(f'Unsupported rope_scaling rope_type {rope_type!r}; supported: {ROPE_TYPES}.')
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, 'eos_token_id', tuple(self.eos_token_id))

    def __hash__(self):
        # The config is static metadata of the NNX graph, so it must hash; a dict field does not by default.
        items = dataclasses.astuple(dataclasses.replace(self, rope_scaling=None))
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        return hash((items, scaling))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (a checkpoint may list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> 'ModelConfig':
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, dtype='float32', param_dtype='float32') -> 'ModelConfig':
        """Builds a config from a Hugging Face config.json dict; unsupported features raise naming the field."""
        architecture = hf.get('model_type')
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f'Unknown architecture model_type={architecture!r} in config.json; supported: {ARCHITECTURES}.'
            )
        if hf.get('hidden_act', 'silu') != 'silu':
            raise ValueError(f"Unsupported hidden_act={hf['hidden_act']!r}; only 'silu' is implemented.")
        if hf.get('mlp_bias'):
            raise ValueError('Unsupported mlp_bias=True; MLP biases are not implemented.')
        if hf.get('use_sliding_window'):
            raise ValueError('Unsupported use_sliding_window=True; only full attention is implemented.')
        layer_types = set(hf.get('layer_types') or ['full_attention'])
        if layer_types != {'full_attention'}:
            raise ValueError(f'Unsupported layer_types {sorted(layer_types)}; only full_attention is implemented.')

        # v5 nests theta and scaling in rope_parameters; v4 has rope_theta and rope_scaling at the top level.
        rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
        rope_theta = float(rope.pop('rope_theta', hf.get('rope_theta', 10000.0)))
        rope_type = rope.pop('rope_type', rope.pop('type', 'default'))
        rope_scaling = None if rope_type == 'default' else {'rope_type': rope_type, **rope}

        hidden_size, num_heads = hf['hidden_size'], hf['num_attention_heads']
        return cls(
            architecture=architecture,
            vocab_size=hf['vocab_size'],
            hidden_size=hidden_size,
            intermediate_size=hf['intermediate_size'],
            num_layers=hf['num_hidden_layers'],
            num_heads=num_heads,
            num_kv_heads=hf.get('num_key_value_heads') or num_heads,
            head_dim=hf.get('head_dim') or hidden_size // num_heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
            tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
            # Qwen2 hard-codes q/k/v biases; its config.json has no attention_bias field.
            attention_bias=True if architecture == 'qwen2' else bool(hf.get('attention_bias', False)),
            qk_norm=architecture == 'qwen3',
            max_position_embeddings=hf.get('max_position_embeddings', 32768),
            bos_token_id=hf.get('bos_token_id'),
            eos_token_id=hf.get('eos_token_id'),
            pad_token_id=hf.get('pad_token_id'),
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `transformers.AutoConfig` loads back into the same architecture."""
        if self.architecture == 'qwen2' and not self.attention_bias:
            raise ValueError('Qwen2 checkpoints always have q/k/v biases; attention_bias=False cannot be exported.')
        if self.architecture == 'qwen3' and not self.qk_norm:
            raise ValueError('Qwen3 checkpoints always have q/k norms; qk_norm=False cannot be exported.')
        if self.architecture != 'qwen3' and self.qk_norm:
            raise ValueError(f'qk_norm=True cannot be exported as a {self.architecture!r} checkpoint.')
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf = {
            'architectures': [_HF_CLASS[self.architecture]],
            'model_type': self.architecture,
            'vocab_size': self.vocab_size,
            'hidden_size': self.hidden_size,
            'intermediate_size': self.intermediate_size,
            'num_hidden_layers': self.num_layers,
            'num_attention_heads': self.num_heads,
            'num_key_value_heads': self.num_kv_heads,
            'head_dim': self.head_dim,
            'hidden_act': 'silu',
            'rms_norm_eps': self.rms_norm_eps,
            'rope_theta': self.rope_theta,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': self.rope_theta, **(self.rope_scaling or {})},
            'tie_word_embeddings': self.tie_word_embeddings,
            'max_position_embeddings': self.max_position_embeddings,
            'bos_token_id': self.bos_token_id,
            'eos_token_id': eos,
            'pad_token_id': self.pad_token_id,
            'dtype': self.param_dtype,
            'use_cache': True,
        }
        if self.architecture != 'qwen2':
            hf['attention_bias'] = self.attention_bias
        if self.rope_scaling is not None:
            # v4 readers (vLLM, SGLang) look for rope_scaling at the top level.
            hf['rope_scaling'] = dict(self.rope_scaling)
        return hf
