"""Qwen2 / Qwen3 / Llama decoders in Flax NNX, Hugging Face checkpoint load / export, tokenizers."""

from tropd_jax.models.config import ModelConfig
from tropd_jax.models.decoder import Decoder, KVCache, forward, init_cache, init_decoder
from tropd_jax.models.hf import from_pretrained, save_pretrained
from tropd_jax.models.tokenizer import check_tokenizers_compatible, load_tokenizer

__all__ = [
    'ModelConfig',
    'Decoder',
    'KVCache',
    'forward',
    'init_cache',
    'init_decoder',
    'from_pretrained',
    'save_pretrained',
    'load_tokenizer',
    'check_tokenizers_compatible',
]
