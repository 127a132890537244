"""Sampler throughput: `tropd_jax.sampling.generate` against `transformers` `generate`, in one run on this machine.

    python benchmarks/sampler.py  # tiny Qwen3, batch 16, prompt 64, 256 sampled tokens
    python benchmarks/sampler.py --model=qwen2-1.5b --batch=64 --dtype=bfloat16  # on a GPU

Both sides sample at temperature 1 with no top-k / top-p and no EOS, so every row generates all new tokens. A
random tiny Qwen3 is built with transformers (torch.manual_seed), saved, and loaded into JAX with `from_pretrained`.
After one warm-up call each (our compile, torch's first-call overheads), the two sides alternate for `--repeats`
rounds, so both see the same load on a shared machine, and the best round of each is reported (`ratio`; the ratio
of the two sides' median rounds is reported too, `ratio_of_medians`). Prints one JSON line (with the 1-minute load
average at the start and the end, since other work on the machine skews both sides).

torch runs with its own OpenMP settings (`--omp_wait_policy=DEFAULT`: libgomp's worker threads spin briefly after
each parallel region, then sleep). `ACTIVE` makes them spin for good, also through our rounds: on two cores that
takes a core from our side and halved its throughput in the runs of docs/benchmarks.md while making torch at most
10% faster, so its ratio is not a fair one; `PASSIVE` makes them sleep at once, which slows torch by about 20%.

On a CPU our side splits the batch over as many XLA CPU devices as torch has threads (`--torch_threads`, default 2;
`--cpu_devices` overrides): a data mesh in which each shard decodes on its own (see `sampling.generate`), the JAX
counterpart of torch's intra-op threads. `--cpu_devices=1` is the single-device figure.

The 1.5B shape (DeepSeek-R1-Distill-Qwen-1.5B: Qwen2, hidden 1536, 28 layers, 12 / 2 heads, MLP 8960,
vocab 151,936) is built with random weights directly in JAX, and in transformers on the GPU torch sees
(`--skip_transformers` leaves that side out). Its report adds the fraction of the memory-bandwidth bound reached,
at the copy rate measured in the same run (`copy_bandwidth`; `--bandwidth_gbs` sets a figure instead): each decode
step must read every weight (the untied input embedding excepted: a step gathers B of its rows) and the filled part
of the KV cache once, so tokens/s <= batch * bandwidth / (weight bytes + mean KV-cache bytes per step).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='tiny-qwen3', choices=['tiny-qwen3', 'qwen2-1.5b'])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--prompt', type=int, default=64)
    parser.add_argument('--new_tokens', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--segment_length', type=int, default=None)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--torch_threads', type=int, default=2)
    parser.add_argument(
        '--cpu_devices',
        type=int,
        default=None,
        help='XLA CPU devices the batch is split over (default: --torch_threads)',
    )
    parser.add_argument(
        '--omp_wait_policy',
        default='DEFAULT',
        choices=['DEFAULT', 'ACTIVE', 'PASSIVE'],
        help="OMP_WAIT_POLICY for torch's OpenMP threads; DEFAULT unsets it (libgomp's own brief "
        'spinning); ACTIVE spins through our rounds too, PASSIVE slows torch (see above)',
    )
    parser.add_argument('--skip_transformers', action='store_true')
    parser.add_argument(
        '--bandwidth_gbs',
        type=float,
        default=None,
        help='memory bandwidth for the bound (default: measured in the run, see copy_bandwidth)',
    )
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu_devices is None:
    ARGS.cpu_devices = ARGS.torch_threads
# Read when torch starts its thread pool, so set (or unset) before torch is imported.
if ARGS.omp_wait_policy == 'DEFAULT':
    os.environ.pop('OMP_WAIT_POLICY', None)
else:
    os.environ['OMP_WAIT_POLICY'] = ARGS.omp_wait_policy
if ARGS.cpu_devices > 1:  # must be set before jax is imported
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={ARGS.cpu_devices}'
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tropd_jax import sampling, sharding  # noqa: E402
from tropd_jax.models import ModelConfig, from_pretrained, init_decoder  # noqa: E402

TINY_QWEN3 = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)
QWEN2_1P5B = ModelConfig(
    architecture='qwen2',
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    attention_bias=True,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


def build_tiny(path, seed=0):
    """A random tiny Qwen3 saved by transformers; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**TINY_QWEN3)).eval()
    model.save_pretrained(path)
    return model


def build_torch_1p5b(dtype, seed=0):
    """The same 1.5B shape as a random transformers Qwen2, built directly on the GPU when torch sees one."""
    import torch
    import transformers

    torch.manual_seed(seed)
    c = QWEN2_1P5B
    hf_config = transformers.Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
        max_position_embeddings=4096,
    )
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype)).eval()


def time_ours(model, tokens, mask, args, seed):
    start = time.perf_counter()
    rollout = sampling.generate(
        model, tokens, mask, jax.random.key(seed), max_new_tokens=args.new_tokens, segment_length=args.segment_length
    )
    rollout.tokens.block_until_ready()
    elapsed = time.perf_counter() - start
    assert int(np.asarray(rollout.lengths).min()) == args.new_tokens
    return elapsed


def time_transformers(torch_model, tokens, mask, args):
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        device = torch_model.device
        out = torch_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long, device=device),
            attention_mask=torch.tensor(mask, device=device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=0,
        ).cpu()  # .cpu() waits for a GPU
    elapsed = time.perf_counter() - start
    assert out.shape[1] == tokens.shape[1] + args.new_tokens
    return elapsed


def copy_bandwidth() -> float:
    """GB/s of the fastest device copy measured here, counting bytes read and written: a 1 GiB float32 elementwise
    kernel in JAX, and `torch.clone` of the same size when torch sees a GPU (on an H200, 3.4 against 4.2 TB/s: the
    higher figure makes the stricter bound)."""

    def best_of(fn, arg, sync=lambda out: out.block_until_ready()):
        sync(fn(arg))
        best = float('inf')
        for _ in range(10):
            start = time.perf_counter()
            sync(fn(arg))
            best = min(best, time.perf_counter() - start)
        return best

    x = jnp.ones((1 << 28,), jnp.float32)
    rates = [2 * x.nbytes / best_of(jax.jit(lambda x: x * 2.0), x) / 1e9]
    del x
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        y = torch.ones(1 << 28, device='cuda')
        rates.append(2 * y.numel() * 4 / best_of(torch.clone, y, sync=lambda out: torch.cuda.synchronize()) / 1e9)
    return max(rates)


def bandwidth_bound(config: ModelConfig, state, args, bandwidth_gbs: float) -> float:
    """Tokens/s if every decode step only read the weights and the filled KV cache once at `bandwidth_gbs`."""
    # An untied input embedding is a gather of B rows per step, not a full read.
    skip = () if config.tie_word_embeddings else ('embed',)
    weight_bytes = sum(
        x.size * x.dtype.itemsize
        for path, x in jax.tree_util.tree_leaves_with_path(state)
        if getattr(path[0], 'key', None) not in skip
    )
    kv_item = jnp.dtype(config.dtype).itemsize
    mean_filled = args.prompt + args.new_tokens / 2
    kv_bytes = 2 * config.num_layers * args.batch * config.num_kv_heads * config.head_dim * mean_filled * kv_item
    return args.batch * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)


def cpu_model():
    """The host CPU's model name (Linux `/proc/cpuinfo`, else `platform.processor()`): runs on different hosts of
    one machine kind differ, and the ratio with them."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    args = ARGS
    rng = np.random.default_rng(0)
    result = dict(
        benchmark='sampler',
        model=args.model,
        batch=args.batch,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        dtype=args.dtype,
        device=str(jax.devices()[0].device_kind),
        jax_devices=jax.device_count(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        cpu_model=cpu_model(),
        load_average_1min=round(os.getloadavg()[0], 2),
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch_model = None
        if args.model == 'tiny-qwen3':
            torch_model = build_tiny(tmp)
            model, config = from_pretrained(tmp, dtype=args.dtype)
        else:
            config = QWEN2_1P5B.replace(dtype=args.dtype, param_dtype=args.dtype)
            model = init_decoder(config, seed=0)
            if not args.skip_transformers:
                torch_model = build_torch_1p5b(args.dtype)
        tokens = rng.integers(3, config.vocab_size, (args.batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(tokens)
        if jax.device_count() > 1:  # data parallel: the batch split over the devices, the weights replicated
            mesh = sharding.make_mesh(data=jax.device_count(), fsdp=1)
            sharding.shard_model(model, mesh)
            jax.set_mesh(mesh)

        start = time.perf_counter()
        time_ours(model, tokens, mask, args, seed=0)
        result['ours_first_call_s'] = round(time.perf_counter() - start, 2)
        run_torch = torch_model is not None and not args.skip_transformers
        if run_torch:
            import torch

            torch.set_num_threads(args.torch_threads)
            time_transformers(torch_model, tokens, mask, args)

        ours, theirs = [], []
        for i in range(args.repeats):
            ours.append(time_ours(model, tokens, mask, args, seed=i + 1))
            if run_torch:
                theirs.append(time_transformers(torch_model, tokens, mask, args))

    generated = args.batch * args.new_tokens
    result['ours_tokens_per_s'] = round(generated / min(ours), 1)
    result['ours_seconds'] = [round(t, 3) for t in ours]
    if run_torch:
        result['transformers_tokens_per_s'] = round(generated / min(theirs), 1)
        result['transformers_seconds'] = [round(t, 3) for t in theirs]
        result['ratio'] = round(min(theirs) / min(ours), 2)
        result['ratio_of_medians'] = round(float(np.median(theirs) / np.median(ours)), 2)
        result['transformers_device'] = str(torch_model.device)
        result['torch_threads'] = args.torch_threads
        result['omp_wait_policy'] = args.omp_wait_policy
    if args.model != 'tiny-qwen3':
        bandwidth = args.bandwidth_gbs
        if bandwidth is None:
            bandwidth = result['copy_bandwidth_gbs'] = round(copy_bandwidth(), 1)
        bound = bandwidth_bound(config, nnx.split(model)[1], args, bandwidth)
        result['bandwidth_bound_tokens_per_s'] = round(bound, 1)
        result['fraction_of_bandwidth_bound'] = round(result['ours_tokens_per_s'] / bound, 3)
    result['load_average_1min_end'] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
