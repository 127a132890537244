"""Rollout throughput: static batches (today's `rollout.batch_size` calls) against continuous batching.

    python benchmarks/continuous_batching.py  # tiny Qwen3 shape, 256 rollouts, 32 rows at a time, 256-token budget

Rollout lengths are long-tailed, as reasoning rollouts are: 90% of them stop within the first quarter of the budget
(uniform in [1, N / 4]), the rest anywhere up to the budget (uniform in (N / 4, N]); each rollout's length is set
through its per-row budget (`max_lengths`, no EOS), so both sides generate exactly the same tokens. The static side
generates the rollouts `--slots` rows per `generate` call, each call decoding until its longest row stops; the
continuous side makes one call over all rollouts with `decode_slots=--slots` (a stopped row's slot takes the next
pending rollout). Same key, so the two return the same rollouts (checked).

After one warm-up call each (compiles), the two sides alternate for `--repeats` rounds and the median round of each
is reported. Prints one JSON line: `static_tokens_per_s`, `continuous_tokens_per_s`, their `ratio` (and
`ratio_cpu_time`, the same by process CPU time, which a shared host's load distorts far less), the tokens
generated, and the decode steps each side runs (`static_steps`: the sum over calls of the longest row;
`continuous_steps`: the slot schedule replayed on the host, refilled in groups of slots / 8 as the sampler does;
above generated tokens / slots because of the long rollouts that start last).
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tropd_jax import sampling  # noqa: E402
from tropd_jax.models import ModelConfig, init_decoder  # noqa: E402

TINY_QWEN3 = ModelConfig(
    architecture='qwen3',
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qk_norm=True,
    tie_word_embeddings=True,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rollouts', type=int, default=256)
    parser.add_argument('--slots', type=int, default=32, help='rows decoded at once, on both sides')
    parser.add_argument('--prompt', type=int, default=32, help='prompt bucket; prompts are 8 to this many tokens')
    parser.add_argument('--new_tokens', type=int, default=256, help='the budget N')
    parser.add_argument('--short_fraction', type=float, default=0.9, help='rollouts that stop within N / 4')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def long_tailed_lengths(rng, count, budget, short_fraction):
    """[count] lengths: a `short_fraction` uniform in [1, budget / 4], the rest uniform in (budget / 4, budget]."""
    quarter = budget // 4
    short = rng.random(count) < short_fraction
    return np.where(short, rng.integers(1, quarter + 1, count), rng.integers(quarter + 1, budget + 1, count))


def continuous_steps(lengths, slots):
    """Decode steps of continuous batching over rollouts of these lengths (refills in groups of slots / 8)."""
    group, remaining, pending, steps = max(1, slots // 8), np.zeros(slots, np.int64), 0, 0
    remaining[:] = lengths[:slots] - 1
    pending = min(slots, len(lengths))
    while True:
        free = np.flatnonzero(remaining <= 0)
        while pending < len(lengths) and len(free) >= min(group, len(lengths) - pending):
            take = free[: min(group, len(lengths) - pending)]
            remaining[take] = lengths[pending : pending + len(take)] - 1
            pending += len(take)
            free = np.flatnonzero(remaining <= 0)
        if (remaining <= 0).all():
            return steps
        steps += 1
        remaining -= 1


def main():
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    model = init_decoder(TINY_QWEN3, seed=args.seed)
    prompts = [
        list(rng.integers(4, TINY_QWEN3.vocab_size, rng.integers(8, args.prompt + 1))) for _ in range(args.rollouts)
    ]
    tokens, mask = sampling.pad_prompts(prompts, (args.prompt,))
    lengths = long_tailed_lengths(rng, args.rollouts, args.new_tokens, args.short_fraction)
    key = jax.random.key(args.seed)
    settings = dict(max_new_tokens=args.new_tokens)

    def static():
        parts = []
        for start in range(0, args.rollouts, args.slots):
            rows = slice(start, start + args.slots)
            parts.append(
                sampling.generate(
                    model,
                    tokens[rows],
                    mask[rows],
                    jax.random.fold_in(key, start),
                    max_lengths=lengths[rows],
                    **settings,
                )
            )
        jax.block_until_ready(parts)
        return parts

    def continuous():
        # The static side's keys, row by row, would need the same per-row uniforms; the check below compares lengths
        # and token counts, the equality of tokens is the tests' job (tests/test_sampling.py).
        return jax.block_until_ready(
            sampling.generate(model, tokens, mask, key, max_lengths=lengths, decode_slots=args.slots, **settings)
        )

    def timed(fn):
        """(wall seconds, this process's CPU seconds, output)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - start, time.process_time() - start_cpu, out

    load = os.getloadavg()[0]
    *_, static_out = timed(static)
    *_, continuous_out = timed(continuous)
    generated = int(lengths.sum())
    assert sum(int(np.asarray(p.lengths).sum()) for p in static_out) == generated
    np.testing.assert_array_equal(np.asarray(continuous_out.lengths), lengths)
    static_times, continuous_times, static_cpu, continuous_cpu = [], [], [], []
    for _ in range(args.repeats):
        for times, cpu, fn in ((static_times, static_cpu, static), (continuous_times, continuous_cpu, continuous)):
            wall_s, cpu_s, _ = timed(fn)
            times.append(wall_s)
            cpu.append(cpu_s)
    static_rate = generated / statistics.median(static_times)
    continuous_rate = generated / statistics.median(continuous_times)
    static_steps = int(sum(lengths[s : s + args.slots].max() for s in range(0, args.rollouts, args.slots)))
    slot_steps = continuous_steps(lengths, args.slots)
    print(
        json.dumps(
            {
                'static_tokens_per_s': round(static_rate, 1),
                'continuous_tokens_per_s': round(continuous_rate, 1),
                'ratio': round(continuous_rate / static_rate, 3),
                # The same ratio by process CPU time: on a shared host, wall clock measures the load as much as the
                # code. A continuous step costs at least a static one, so neither ratio can honestly exceed
                # step_ratio (static decode steps / continuous decode steps).
                'ratio_cpu_time': round(statistics.median(static_cpu) / statistics.median(continuous_cpu), 3),
                'step_ratio': round(static_steps / slot_steps, 3),
                'static_seconds': [round(t, 3) for t in static_times],
                'continuous_seconds': [round(t, 3) for t in continuous_times],
                'generated_tokens': generated,
                'short_fraction': float(np.mean(lengths <= args.new_tokens // 4)),
                'static_steps': static_steps,
                'continuous_steps': slot_steps,
                'rollouts': args.rollouts,
                'slots': args.slots,
                'prompt': args.prompt,
                'new_tokens': args.new_tokens,
                'backend': jax.default_backend(),
                'devices': jax.device_count(),
                'load_average': [round(load, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == '__main__':
    main()
