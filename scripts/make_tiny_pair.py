"""Builds the shipped tiny demo pair: tokenizer, arithmetic data, a Qwen3 teacher and a weaker Qwen3 student.

    python scripts/make_tiny_pair.py [--out tropd_jax/assets/tiny] [--seed 0]

Both models are trained from scratch with supervised learning on worked solutions (`worked_solution`): the prompt
goes through the chat template, the response is the solution followed by EOS, and the loss covers only the
response tokens. The teacher is bigger and trained longer; the student is smaller and stops early, so its
distribution differs from the teacher's and distillation has room to help. The teacher's vocabulary is padded to
128 rows and the student's to 112 (the tokenizer has 105 tokens), like real teacher / student pairs whose
embedding tables are padded differently. Everything is seeded: the same command writes the same files.

The defaults made the shipped pair (about 35 minutes on 2 CPU cores): teacher avg@8 0.999, student avg@8 0.224 on
the 256 held-out problems. The teacher must be close to perfect: a first teacher at avg@2 0.81 taught its
confident mistakes along with its answers, and SFT on its samples lowered a 0.63 student (docs/benchmarks.md).
The student stops at step 375 of a constant learning rate (after warm-up), just before its accuracy climbs
(continued, SFT takes it to about 0.45 in 120 steps; docs/benchmarks.md): a student whose SFT had decayed its
learning rate into a plateau barely moved under any distillation setting the CPU demo can afford. The student
trains independently of the teacher, so `--student-only` with the same flags rewrites the same student.
"""

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tropd_jax import evaluate as evaluation
from tropd_jax import scoring
from tropd_jax.models import Decoder, ModelConfig, forward, save_pretrained
from tropd_jax.tasks import arithmetic

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), '..', 'tropd_jax', 'assets', 'tiny')

# Problems with 2 or 3 operations on one-digit operands, every intermediate value in [0, 9]: a 0.8M-parameter model
# learns them in a few minutes of CPU time. (Larger values mean many more arithmetic facts to memorise, and one-op
# problems are too few, about a hundred, to give both splits a fair share.)
TASK = dict(ops=(2, 3), digits=1, max_value=9)
NUM_TRAIN, NUM_EVAL = 20_000, 256
TEACHER = dict(
    vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32
)
STUDENT = dict(
    vocab_size=112, hidden_size=96, intermediate_size=288, num_layers=3, num_heads=3, num_kv_heads=1, head_dim=32
)


def model_config(tokenizer, **sizes) -> ModelConfig:
    return ModelConfig(
        architecture='qwen3',
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def encode(
    tokenizer, records: list[dict], solution=arithmetic.worked_solution
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chat-templated prompt + `solution(problem)` + EOS, right-padded: tokens, input_mask, loss_mask, all [N, T].

    T is the longest sequence rounded up to a multiple of 16; loss_mask is 1 on the response tokens (EOS included).
    """
    sequences = []
    for record in records:
        prompt = evaluation.prompt_ids(tokenizer, record['problem'])
        response = tokenizer.encode(solution(record['problem']), add_special_tokens=False)
        sequences.append((prompt, response + [tokenizer.eos_token_id]))
    length = -(-max(len(p) + len(r) for p, r in sequences) // 16) * 16
    tokens = np.full((len(records), length), tokenizer.pad_token_id, np.int32)
    input_mask = np.zeros((len(records), length), np.int32)
    loss_mask = np.zeros((len(records), length), np.int32)
    for row, (prompt, response) in enumerate(sequences):
        tokens[row, : len(prompt) + len(response)] = prompt + response
        input_mask[row, : len(prompt) + len(response)] = 1
        loss_mask[row, len(prompt) : len(prompt) + len(response)] = 1
    return tokens, input_mask, loss_mask


def sft_loss(graphdef, params, tokens, input_mask, loss_mask):
    """Mean next-token NLL over response tokens. tokens, input_mask, loss_mask: [B, T]."""
    positions = scoring.positions(input_mask)
    logits, _ = forward(graphdef, params, tokens[:, :-1], positions[:, :-1], input_mask[:, :-1])
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T - 1]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def train(
    config: ModelConfig,
    data,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    name: str,
    final_lr_fraction: float = 0.1,
    probe=None,
    probe_every: int = 100,
) -> Decoder:
    """AdamW (linear warm-up, cosine decay to `final_lr_fraction` of the peak, global-norm clip 1) on random batches
    of `data`; returns the model.

    `probe(model, step) -> bool`, if given, runs every `probe_every` steps; training stops early when it returns True.
    """
    tokens, input_mask, loss_mask = data
    model = Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(100, steps // 10), steps, end_value=learning_rate * final_lr_fraction
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(sft_loss, graphdef))(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Batches are drawn from one length bucket at a time (multiples of 16 tokens), so short problems are not padded
    # to the longest one; the buckets are drawn in proportion to their sizes. One compiled step per bucket.
    buckets = -(-input_mask.sum(axis=1) // 16) * 16
    lengths = np.unique(buckets)
    rows_of = {int(length): np.flatnonzero(buckets == length) for length in lengths}
    weights = np.array([len(rows_of[int(length)]) for length in lengths]) / len(tokens)
    print(
        f'[{name}] {num_params:,} parameters, {steps} steps of {batch_size} sequences, lengths '
        f'{dict(zip(lengths.tolist(), np.round(weights, 3).tolist()))}, peak lr {learning_rate}',
        flush=True,
    )
    rng = np.random.default_rng(seed)
    start, losses = time.time(), []
    for i in range(steps):
        length = int(rng.choice(lengths, p=weights))
        rows = rng.choice(rows_of[length], batch_size)
        batch = (tokens[rows, :length], input_mask[rows, :length], loss_mask[rows, :length])
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
        if (i + 1) % 100 == 0 or i + 1 == steps:
            print(
                f'[{name}] step {i + 1}/{steps}: loss {np.mean(jax.device_get(losses)):.4f} '
                f'({time.time() - start:.0f} s)',
                flush=True,
            )
            losses = []
        if probe is not None and (i + 1) % probe_every == 0 and (i + 1) < steps:
            if probe(nnx.merge(graphdef, params), i + 1):
                break
    return nnx.merge(graphdef, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help='directory for tokenizer/, teacher/, student/, data/')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--teacher-steps', type=int, default=4000)
    parser.add_argument('--student-steps', type=int, default=375)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument(
        '--student-final-lr-fraction',
        type=float,
        default=1.0,
        help="the student's learning rate at its last step, as a fraction of the peak 3e-3 "
        '(1.0: constant after warm-up)',
    )
    parser.add_argument(
        '--student-only',
        action='store_true',
        help='retrain only the student; reuse the data, tokenizer and teacher already in --out',
    )
    parser.add_argument('--eval-samples', type=int, default=8, help='K of the avg@K reported at the end')
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    start = time.time()

    train_records, eval_records = arithmetic.make_splits(args.seed, NUM_TRAIN, NUM_EVAL, **TASK)
    tokenizer = arithmetic.build_tokenizer()
    if not args.student_only:
        os.makedirs(os.path.join(out, 'data'), exist_ok=True)
        arithmetic.write_jsonl(os.path.join(out, 'data', 'train.jsonl'), train_records)
        arithmetic.write_jsonl(os.path.join(out, 'data', 'eval.jsonl'), eval_records)
        arithmetic.save_tokenizer(tokenizer, os.path.join(out, 'tokenizer'))
    elif not os.path.isdir(os.path.join(out, 'teacher')):
        raise SystemExit(f'--student-only needs a teacher in {out}/teacher; run without it first')
    print(f'data: {len(train_records)} train / {len(eval_records)} eval problems, {TASK}, seed {args.seed}')
    print(f'tokenizer: {len(tokenizer)} tokens, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}')
    data = encode(tokenizer, train_records)

    results = {}
    runs = [
        ('teacher', TEACHER, args.teacher_steps, args.seed, 0.1),
        ('student', STUDENT, args.student_steps, args.seed + 1, args.student_final_lr_fraction),
    ]
    for name, sizes, steps, seed, final_fraction in runs[1:] if args.student_only else runs:
        model = train(
            model_config(tokenizer, **sizes),
            data,
            steps=steps,
            batch_size=args.batch_size,
            learning_rate=3e-3,
            seed=seed,
            name=name,
            final_lr_fraction=final_fraction,
        )
        path = os.path.join(out, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        save_pretrained(model, path)
        arithmetic.save_tokenizer(tokenizer, path)
        result = evaluation.evaluate(
            model,
            tokenizer,
            eval_records,
            samples=args.eval_samples,
            key=jax.random.key(args.seed),
            max_new_tokens=96,
            batch_size=256,
        )
        results[name] = result['avg_at_k']
        print(
            f'[{name}] saved to {path}; held-out avg@{args.eval_samples} {result["avg_at_k"]:.4f}, '
            f'pass@{args.eval_samples} {result["pass_at_k"]:.4f} (sampler seed {args.seed}, temperature 1)',
            flush=True,
        )
    print(json.dumps({f'{name}_avg_at_{args.eval_samples}': value for name, value in results.items()}))
    print(f'done in {time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
