"""Shared pytest fixtures."""

import pytest


def pytest_configure(config):
    """On a GPU, float32 matmuls default to TF32 (about 1e-3 relative error); the parity tests compare against
    float32 / float64 references, so they ask for full float32 there. CPU matmuls are full float32 already."""
    import jax

    if jax.default_backend() != 'cpu':
        jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def tiny_hf_checkpoint(tmp_path_factory):
    """Factory: a random tiny HF checkpoint directory built and saved by transformers / PyTorch.

    `tiny_hf_checkpoint(architecture='qwen3', name=None, max_shard_size=None, seed=0, **config_overrides)`
    returns (path, torch_model). Defaults: vocab 128, hidden 32, MLP 64, 2 layers, 4 heads / 2 KV heads, head_dim 16;
    each call writes a new directory (`name` prefixes it).
    `max_shard_size` (e.g. '20KB') makes transformers write a sharded checkpoint with an index file. Weights are
    drawn from N(0, 0.3) (norm weights around 1) so logits are far from uniform and parity tests are meaningful.
    """
    torch = pytest.importorskip('torch')
    import transformers

    classes = {'qwen2': transformers.Qwen2Config, 'qwen3': transformers.Qwen3Config, 'llama': transformers.LlamaConfig}

    def make(architecture='qwen3', name=None, max_shard_size=None, seed=0, **overrides):
        fields = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        fields.update(overrides)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(classes[architecture](**fields)).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if 'norm' in param_name:
                    param.uniform_(0.5, 1.5)
                else:
                    param.normal_(0.0, 0.3)
        path = tmp_path_factory.mktemp(name or f'{architecture}_checkpoint')
        kwargs = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
        model.save_pretrained(path, **kwargs)
        return str(path), model

    return make
