"""How far an int8 teacher's log-probs are from the bfloat16 teacher's, on the shipped tiny teacher.

    python benchmarks/teacher_int8.py [--prompts=64] [--new=64]

The teacher samples responses (temperature 1) to held-out arithmetic problems; the same tokens are then scored by
the teacher in float32, in bfloat16, and in bfloat16 with int8 weights (`model.teacher_quantization=int8`). Prints one
JSON line: per response token, the mean and largest |log-prob difference| of the chosen token, the mean KL between
the full distributions, and how often the top-1 token agrees, for bfloat16 vs float32 (the rounding the recipe
already accepts) and int8 vs bfloat16.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from tropd_jax import data, sampling, scoring
from tropd_jax.models import from_pretrained, load_tokenizer
from tropd_jax.models.quantize import quantize_int8
from tropd_jax.tasks.arithmetic import tiny_assets


def compare(a_logits, b_logits, tokens, mask, vocab):
    a = jax.nn.log_softmax(a_logits[..., :vocab].astype(jnp.float32))
    b = jax.nn.log_softmax(b_logits[..., :vocab].astype(jnp.float32))
    chosen = lambda x: jnp.take_along_axis(x, tokens[..., None], axis=-1)[..., 0]
    diff = np.abs(np.asarray(chosen(a) - chosen(b)))[mask]
    kl = np.asarray((jnp.exp(b) * (b - a)).sum(-1))[mask]
    top1 = np.asarray(a.argmax(-1) == b.argmax(-1))[mask]
    return {
        'mean_abs_logprob_diff': float(diff.mean()),
        'max_abs_logprob_diff': float(diff.max()),
        'mean_kl': float(kl.mean()),
        'top1_agreement': float(top1.mean()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--prompts', type=int, default=64)
    parser.add_argument('--new', type=int, default=64)
    args = parser.parse_args()
    assets = tiny_assets()
    tokenizer = load_tokenizer(assets.tokenizer)
    records, _ = data.load_prompts(assets.eval_data, tokenizer, max_prompt_length=96)
    records = records[: args.prompts]
    f32, config = from_pretrained(assets.teacher, dtype='float32')
    bf16, _ = from_pretrained(assets.teacher, dtype='bfloat16')
    int8 = quantize_int8(bf16)
    tokens, mask = sampling.pad_prompts([r['prompt_tokens'] for r in records])
    rollout = sampling.generate(
        f32,
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=args.new,
        eos_ids=sampling.eos_ids(tokenizer, config),
        vocab_size=config.vocab_size,
    )
    p = rollout.prompt_length
    logits = {
        name: scoring.response_logits(m, rollout.tokens, rollout.input_mask, p)
        for name, m in (('float32', f32), ('bfloat16', bf16), ('int8', int8))
    }
    response = rollout.tokens[:, p:]
    real = np.asarray(rollout.response_mask[:, p:]).astype(bool)
    out = {
        'prompts': len(records),
        'response_tokens': int(real.sum()),
        'bfloat16_vs_float32': compare(logits['bfloat16'], logits['float32'], response, real, config.vocab_size),
        'int8_vs_bfloat16': compare(logits['int8'], logits['bfloat16'], response, real, config.vocab_size),
    }
    print(json.dumps(out))


if __name__ == '__main__':
    main()
