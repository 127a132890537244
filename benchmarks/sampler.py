"""Sampler throughput: `tropd_jax.sampling.generate` against `transformers` `generate`, in one run on this machine.

    python benchmarks/sampler.py                      # tiny Qwen3, batch 16, prompt 64, 256 sampled tokens
    python benchmarks/sampler.py --model=qwen2-1.5b --batch=64 --dtype=bfloat16 --skip_transformers  # on a GPU

Both sides sample at temperature 1 with no top-k / top-p and no EOS, so every row generates all new tokens. A
random tiny Qwen3 is built with transformers (torch.manual_seed), saved, and loaded into JAX with `from_pretrained`.
After one warm-up call each (our compile, torch's first-call overheads), the two sides alternate for `--repeats`
rounds, so both see the same load on a shared machine, and the best round of each is reported. Prints one JSON line
(with the 1-minute load average at the start and the end, since other work on the machine skews both sides; torch
runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise, see --omp_wait_policy).

`--cpu_devices=2` exposes two XLA CPU devices and splits the batch over them (a data mesh; each half decodes on its
own, see `sampling.generate`), the JAX counterpart of torch's two threads.

The 1.5B shape (DeepSeek-R1-Distill-Qwen-1.5B: Qwen2, hidden 1536, 28 layers, 12 / 2 heads, MLP 8960,
vocab 151,936) is built directly in JAX with random weights. Its report adds the fraction of the memory-bandwidth
bound reached: each decode step must read every weight and the filled part of the KV cache once, so
tokens/s <= batch * bandwidth / (weight bytes + mean KV-cache bytes per step).
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
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--segment_length', type=int, default=None)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--torch_threads', type=int, default=2)
  parser.add_argument('--cpu_devices', type=int, default=1, help='XLA CPU devices the batch is split over')
  parser.add_argument('--omp_wait_policy', default='PASSIVE', choices=['PASSIVE', 'ACTIVE'],
                      help="torch's OpenMP threads; ACTIVE (spinning, torch's default) is fastest on an idle machine "
                           'but collapses (tens of times slower) when the cores are shared with other work')
  parser.add_argument('--skip_transformers', action='store_true')
  parser.add_argument('--bandwidth_gbs', type=float, default=3350.0, help='peak memory bandwidth (H100 SXM: 3350)')
  return parser.parse_args()


ARGS = parse_args()
os.environ.setdefault('OMP_WAIT_POLICY', ARGS.omp_wait_policy)  # read when torch starts its thread pool
if ARGS.cpu_devices > 1:  # must be set before jax is imported
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={ARGS.cpu_devices}')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tropd_jax import sampling, sharding  # noqa: E402
from tropd_jax.models import ModelConfig, from_pretrained, init_decoder  # noqa: E402

TINY_QWEN3 = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                  max_position_embeddings=1024)
QWEN2_1P5B = ModelConfig(architecture='qwen2', vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, attention_bias=True,
                         tie_word_embeddings=False, rope_theta=10000.0)


def build_tiny(path, seed=0):
  """A random tiny Qwen3 saved by transformers; returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**TINY_QWEN3)).eval()
  model.save_pretrained(path)
  return model


def time_ours(model, tokens, mask, args, seed):
  start = time.perf_counter()
  rollout = sampling.generate(model, tokens, mask, jax.random.key(seed), max_new_tokens=args.new_tokens,
                              segment_length=args.segment_length)
  rollout.tokens.block_until_ready()
  elapsed = time.perf_counter() - start
  assert int(np.asarray(rollout.lengths).min()) == args.new_tokens
  return elapsed


def time_transformers(torch_model, tokens, mask, args):
  import torch
  start = time.perf_counter()
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, pad_token_id=0)
  elapsed = time.perf_counter() - start
  assert out.shape[1] == tokens.shape[1] + args.new_tokens
  return elapsed


def bandwidth_bound(config: ModelConfig, state, args) -> float:
  """Tokens/s if every decode step only read the weights and the filled KV cache once at `--bandwidth_gbs`."""
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  kv_item = jnp.dtype(config.dtype).itemsize
  mean_filled = args.prompt + args.new_tokens / 2
  kv_bytes = 2 * config.num_layers * args.batch * config.num_kv_heads * config.head_dim * mean_filled * kv_item
  return args.batch * args.bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)


def main():
  args = ARGS
  rng = np.random.default_rng(0)
  result = dict(benchmark='sampler', model=args.model, batch=args.batch, prompt=args.prompt,
                new_tokens=args.new_tokens, dtype=args.dtype, device=str(jax.devices()[0].device_kind),
                jax_devices=jax.device_count(), cpu_count=os.cpu_count(), machine=platform.machine(),
                load_average_1min=round(os.getloadavg()[0], 2))
  with tempfile.TemporaryDirectory() as tmp:
    torch_model = None
    if args.model == 'tiny-qwen3':
      torch_model = build_tiny(tmp)
      model, config = from_pretrained(tmp, dtype=args.dtype)
    else:
      config = QWEN2_1P5B.replace(dtype=args.dtype, param_dtype=args.dtype)
      model = init_decoder(config, seed=0)
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
    result['torch_threads'] = args.torch_threads
    result['omp_wait_policy'] = os.environ['OMP_WAIT_POLICY']
  if args.model != 'tiny-qwen3':
    bound = bandwidth_bound(config, nnx.split(model)[1], args)
    result['bandwidth_bound_tokens_per_s'] = round(bound, 1)
    result['fraction_of_bandwidth_bound'] = round(result['ours_tokens_per_s'] / bound, 3)
  result['load_average_1min_end'] = round(os.getloadavg()[0], 2)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
