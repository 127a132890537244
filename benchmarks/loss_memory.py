"""Memory (and CPU time) of the distillation loss + gradient: fused (`tropd_jax.fused_loss`) against the naive loss.

Naive: full student logits `hidden @ head` [n, V] and the teacher's full logits passed in (bf16), then
`losses.distillation_loss`. Fused: `fused_distillation_loss` from the same hidden states and head, with the teacher's
targets passed in: O(k) numbers per token for `tropd` (K1 on trust-region tokens, top-k FKL on outliers, prefix
term); for the exact full-vocabulary divergences (`jsd`, `full_fkl`, `full_rkl`) also the teacher's hidden states,
LM head and log-normaliser, from which each chunk's teacher logits are recomputed. Both differentiate w.r.t. the
student hidden states and LM head.

Memory is XLA's compile-time analysis (`jax.jit(f).lower(...).compile().memory_analysis()`) on `ShapeDtypeStruct`
inputs, so nothing is allocated; "temp" is the scratch memory of the whole step (inputs and outputs excluded). One JSON
line per size, then one line with the per-token slope of the fused temporaries against the O(k) bound (teacher top-k
ids + log-probs, 8k bytes per token). `--time_tokens N` also times both on real arrays at N tokens (CPU).

  python benchmarks/loss_memory.py                       # hidden 1536, V 151,936, k 64, 8k / 32k tokens, tropd + jsd
  python benchmarks/loss_memory.py --methods jsd --tokens 4096 16384 32768
  python benchmarks/loss_memory.py --time_tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tropd_jax import fused_loss, losses


def inputs(tokens: int, hidden: int, vocab: int, k: int, dtype, teacher: str, full_vocabulary: bool = False):
    """ShapeDtypeStructs of one response of `tokens` tokens (B = 1): student side, masks, and the teacher's part
    (`teacher='logits'`: full bf16 logits; `'targets'`: `TeacherTargets`, with `full_vocabulary` the teacher's
    hidden states, head and log-normaliser too; the teacher has the student's shapes)."""
    s = jax.ShapeDtypeStruct
    student = (s((1, tokens, hidden), dtype), s((hidden, vocab), dtype))
    rest = (s((1, tokens), jnp.int32), s((1, tokens), jnp.float32), s((1, tokens), jnp.float32))
    if teacher == 'logits':
        return student, s((1, tokens, vocab), dtype), rest
    per_token, topk = s((1, tokens), jnp.float32), s((1, tokens, k), jnp.float32)
    targets = fused_loss.TeacherTargets(per_token, s((1, tokens, k), jnp.int32), topk, per_token)
    if full_vocabulary:
        targets = targets._replace(log_normalizer=per_token, hidden=student[0], lm_head=student[1])
    return student, targets, rest


def naive_step(hidden, head, teacher_logits, tokens, response_mask, prefix_mask, *, method, k):
    def loss(hidden, head):
        logits = hidden @ head
        return losses.distillation_loss(
            method, logits, teacher_logits, tokens, response_mask, prefix_mask, jax.random.key(0), k=k
        )[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)


def fused_step(hidden, head, targets, tokens, response_mask, prefix_mask, *, method, k, chunk_size):
    def loss(hidden, head):
        return fused_loss.fused_distillation_loss(
            method,
            hidden,
            head,
            targets,
            tokens,
            response_mask,
            prefix_mask,
            jax.random.key(0),
            vocab_size=head.shape[1],
            chunk_size=chunk_size,
            k=k,
        )[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)


def teacher_step(hidden, head, tokens, *, k, chunk_size, full_vocabulary=False):
    return fused_loss.teacher_pass(
        hidden, head, tokens, k=k, vocab_size=head.shape[1], chunk_size=chunk_size, full_vocabulary=full_vocabulary
    )


def memory(step, *args, **static):
    compiled = jax.jit(lambda *a: step(*a, **static)).lower(*args).compile()
    analysis = compiled.memory_analysis()
    return dict(
        temp=int(analysis.temp_size_in_bytes),
        args=int(analysis.argument_size_in_bytes),
        out=int(analysis.output_size_in_bytes),
    )


def measure(method: str, tokens: int, hidden: int, vocab: int, k: int, chunk_size: int, dtype) -> dict:
    full = method in losses.FULL_VOCABULARY_METHODS
    (h, w), logits, rest = inputs(tokens, hidden, vocab, k, dtype, 'logits')
    naive = memory(naive_step, h, w, logits, *rest, method=method, k=k)
    _, targets, _ = inputs(tokens, hidden, vocab, k, dtype, 'targets', full)
    fused = memory(fused_step, h, w, targets, *rest, method=method, k=k, chunk_size=chunk_size)
    teacher = memory(teacher_step, h, w, rest[0], k=k, chunk_size=chunk_size, full_vocabulary=full)
    return dict(
        method=method,
        tokens=tokens,
        hidden=hidden,
        vocab=vocab,
        k=k,
        chunk_size=chunk_size,
        dtype=jnp.dtype(dtype).name,
        naive_temp_bytes=naive['temp'],
        fused_temp_bytes=fused['temp'],
        fused_over_naive=round(fused['temp'] / naive['temp'], 4),
        naive_over_fused=round(naive['temp'] / fused['temp'], 1),
        naive_teacher_input_bytes=np.prod(logits.shape).item() * jnp.dtype(dtype).itemsize,
        fused_teacher_input_bytes=sum(np.prod(x.shape).item() * x.dtype.itemsize for x in targets if x is not None),
        teacher_pass_temp_bytes=teacher['temp'],
    )


def time_steps(tokens: int, hidden: int, vocab: int, k: int, chunk_size: int, dtype, repeats: int) -> dict:
    """Seconds per loss + gradient step of both, on real arrays (the first call compiles and is not counted)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(1, tokens, hidden)), dtype)
    w = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden), dtype)
    tok = jnp.asarray(rng.integers(0, vocab, (1, tokens)), jnp.int32)
    response = jnp.ones((1, tokens), jnp.float32)
    prefix = jnp.asarray(np.arange(tokens)[None] < tokens // 4, jnp.float32)
    teacher_h = jnp.asarray(rng.normal(size=(1, tokens, hidden)), dtype)
    targets = jax.jit(lambda th: teacher_step(th, w, tok, k=k, chunk_size=chunk_size))(teacher_h)
    result = dict(tokens=tokens, repeats=repeats, dtype=jnp.dtype(dtype).name, chunk_size=chunk_size)
    fused = jax.jit(
        lambda h, w, t: fused_step(h, w, t, tok, response, prefix, method='tropd', k=k, chunk_size=chunk_size)
    )
    result['fused_s'] = _seconds(functools.partial(fused, h, w, targets), repeats)
    del targets
    teacher_logits = (teacher_h @ w).astype(dtype)
    naive = jax.jit(lambda h, w, t: naive_step(h, w, t, tok, response, prefix, method='tropd', k=k))
    result['naive_s'] = _seconds(lambda: naive(h, w, teacher_logits), repeats)
    return result


def _seconds(f, repeats: int) -> dict:
    """Wall and process CPU seconds (all threads) per call; CPU time is the steadier number on a shared machine."""
    jax.block_until_ready(f())
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(f())
        wall.append(round(time.perf_counter() - start, 2))
        cpu.append(round(time.process_time() - start_cpu, 2))
    return dict(wall=wall, cpu=cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tokens', type=int, nargs='+', default=[8192, 32768])
    parser.add_argument('--methods', nargs='+', default=['tropd', 'jsd'], choices=losses.METHODS)
    parser.add_argument('--hidden', type=int, default=1536)
    parser.add_argument('--vocab', type=int, default=151_936)
    parser.add_argument('--k', type=int, default=64)
    parser.add_argument('--chunk_size', type=int, default=fused_loss.DEFAULT_CHUNK_SIZE)
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--time_tokens', type=int, default=0, help='also time both steps at this many tokens')
    parser.add_argument('--time_vocab', type=int, default=None, help='vocabulary of the timing run (default --vocab)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    for method in args.methods:
        rows = []
        for tokens in args.tokens:
            rows.append(measure(method, tokens, args.hidden, args.vocab, args.k, args.chunk_size, dtype))
            print(json.dumps(rows[-1]), flush=True)
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            slope = (last['fused_temp_bytes'] - first['fused_temp_bytes']) / (last['tokens'] - first['tokens'])
            naive_slope = (last['naive_temp_bytes'] - first['naive_temp_bytes']) / (last['tokens'] - first['tokens'])
            print(
                json.dumps(
                    dict(
                        method=method,
                        fused_temp_bytes_per_token=round(slope, 1),
                        naive_temp_bytes_per_token=round(naive_slope, 1),
                        topk_bound_bytes_per_token=8 * args.k,  # int32 id + float32 log-prob per teacher top-k entry
                        hidden_bytes_per_token=args.hidden * dtype.itemsize,
                        fused_intercept_bytes=round(first['fused_temp_bytes'] - slope * first['tokens']),
                    )
                ),
                flush=True,
            )
    if args.time_tokens:
        vocab = args.time_vocab or args.vocab
        print(
            json.dumps(
                time_steps(args.time_tokens, args.hidden, vocab, args.k, args.chunk_size, dtype, args.repeats)
                | dict(vocab=vocab)
            ),
            flush=True,
        )


if __name__ == '__main__':
    main()
