"""One accelerator check: the train step and the sampler at the 1.5B student's shape, as one JSON line.

    python benchmarks/device_check.py --out=device_check.json       # one GPU (an H200: about 3-5 minutes)
    python benchmarks/device_check.py --tiny                         # the same code path at tiny shapes, on a CPU

Random weights throughout (configs/models/DeepSeek-R1-Distill-Qwen-1.5B/config.json; `--tiny`: the shipped tiny
student's config), so no checkpoint is needed.

train  The math recipe's train step (configs/math.py: the fused TrOPD loss with k = 64, AdamW, bf16 compute with
       float32 master weights, scanned layers, full rematerialisation) on one micro-batch of `--train_rows` rows of
       `--train_length` tokens (default 2 x 4,096 = 8,192 tokens): the student's forward, backward and optimizer
       update. The student scores `--train_length - 1` positions (each predicts the next token), an odd number that
       the cuDNN path pads by one column (cuDNN's training kernel rejects odd lengths). The teacher's top-k targets
       are random and precomputed (the step as it runs with `model.teacher_placement=separate`), so the teacher's own
       scoring is not in the time. Variants:
         cudnn      full rows (every token real), `model.attention=cudnn` (GPU only; skipped elsewhere);
         blockwise  the same rows, `model.attention=blockwise` (the pure-JAX flash kernel);
         packed     rollouts of random prompt and response lengths packed into the same rows and columns
                    (`train.packing`; segment ids, so attention is blockwise: cuDNN takes no segment ids).
       Each reports the median step time over `--repeats` timed calls after a compile call and a warm-up call,
       tokens/s (real tokens), and MFU: model FLOPs / (step time x `--peak_tflops`), counting 6 x N x real tokens
       (N the parameters without the input embedding, a gather) plus causal attention, 6 x layers x heads x head_dim
       x sum of squared sequence lengths (the recomputation of `remat=full` is not counted: model FLOPs, not
       hardware FLOPs).
sampler  `sampling.generate` at batch `--sampler_batch` (64), `--sampler_prompt` (256) prompt tokens and
       `--sampler_new` (512) new tokens, bf16 weights, temperature 1, no EOS (every row generates every token):
       the median of `--repeats` calls after a compile call, prefill included; tokens/s and the fraction of the
       memory-bandwidth bound: each decode step reads every weight once (the untied input embedding excepted: a
       gather of B rows) and the filled KV cache, so tokens/s <= B x bandwidth / (weight bytes + mean KV-cache bytes),
       at `--bandwidth_gbs` (4,300: the copy rate measured on an H200).

Each variant runs in its own try/except, so one failure still reports the others with `error` set to its text.
The JSON (also written to `--out` after every section, so a run cut short keeps what it finished) holds the date,
device, JAX version and the wall time of the whole check.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from tropd_jax import sampling, sharding  # noqa: E402
from tropd_jax.models import ModelConfig, init_decoder  # noqa: E402

STUDENT_CONFIG = os.path.join(ROOT, 'configs', 'models', 'DeepSeek-R1-Distill-Qwen-1.5B', 'config.json')
TINY_CONFIG = os.path.join(ROOT, 'tropd_jax', 'assets', 'tiny', 'student', 'config.json')
TINY_SHAPES = dict(
    train_rows=2, train_length=64, train_prompt=16, sampler_batch=4, sampler_prompt=16, sampler_new=16, repeats=2
)
VARIANTS = ('cudnn', 'blockwise', 'packed')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true', help='tiny shapes (the shipped tiny student), for a CPU')
    parser.add_argument('--out', default='', help='also write the JSON here')
    parser.add_argument('--sections', default='train,sampler')
    parser.add_argument('--variants', default=','.join(VARIANTS), help=f'train variants, from {VARIANTS}')
    parser.add_argument('--train_rows', type=int, default=2)
    parser.add_argument('--train_length', type=int, default=4096, help='columns per row (prompt + response)')
    parser.add_argument('--train_prompt', type=int, default=256, help='prompt columns of the full rows')
    parser.add_argument('--sampler_batch', type=int, default=64)
    parser.add_argument('--sampler_prompt', type=int, default=256)
    parser.add_argument('--sampler_new', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per measurement (median)')
    parser.add_argument('--peak_tflops', type=float, default=989.0, help='dense bf16 peak (H200 SXM: 989)')
    parser.add_argument('--bandwidth_gbs', type=float, default=4300.0, help='memory bandwidth (H200: 4,300 measured)')
    args = parser.parse_args(argv)
    if args.tiny:  # tiny shapes unless given explicitly
        given = {a.split('=')[0].lstrip('-') for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in TINY_SHAPES.items():
            if name not in given:
                setattr(args, name, value)
    return args


def significant(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (MFU on a CPU is tiny but must stay positive)."""
    return float(f'{x:.{digits}g}')


def timed(fn, repeats: int) -> dict:
    """Seconds of `fn()` (which blocks until its results are ready): the first call (compile), one untimed warm-up
    call, then the median of `repeats` calls."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        'first_call_s': round(first, 3),
        'seconds': [significant(t, 5) for t in times],
        'median_s': float(np.median(times)),
    }


def load_model_config(args, **runtime) -> ModelConfig:
    with open(TINY_CONFIG if args.tiny else STUDENT_CONFIG) as f:
        hf = json.load(f)
    return ModelConfig.from_hf(hf).replace(**runtime)


def model_flops(c: ModelConfig, lengths) -> float:
    """Training FLOPs of sequences of `lengths` tokens: 6 x N x tokens (N without the input embedding) plus causal
    attention, 3 x (2 x 2 x heads x head_dim x L^2 / 2) per layer and sequence."""
    layer = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    n = c.num_layers * layer + c.vocab_size * c.hidden_size  # the LM head (tied or not) is a matmul
    lengths = np.asarray(lengths, np.float64)
    return 6.0 * n * lengths.sum() + 6.0 * c.num_layers * c.num_heads * c.head_dim * float((lengths**2).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Train step.


def recipe_config():
    spec = importlib.util.spec_from_file_location('recipe_math', os.path.join(ROOT, 'configs', 'math.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def full_rows(rng, rows: int, length: int, prompt: int, vocab: int) -> dict:
    """`[rows, length]` rollouts whose every column is real: `prompt` prompt tokens, then the response."""
    response = np.zeros((rows, length), np.int32)
    response[:, prompt:] = 1
    return dict(
        tokens=rng.integers(3, vocab, (rows, length)).astype(np.int32),
        input_mask=np.ones((rows, length), np.int32),
        response_mask=response,
        prefix_mask=np.zeros((rows, length), np.int32),
        logprobs=np.where(response, -rng.exponential(1.0, (rows, length)), 0.0).astype(np.float32),
        finish_reason=np.full((rows,), sampling.FINISH_LENGTH, np.int32),
    )


def packed_rows(rng, rows: int, length: int, prompt: int, vocab: int) -> tuple[dict, np.ndarray]:
    """As many rollouts (prompt `prompt / 4`..`prompt` tokens, response `length / 8`..`length - prompt`, left-padded
    prompts in `prompt` columns) as first-fit packing puts in `rows` rows of `length` columns, packed as the trainer
    packs them (`rollouts.pack_rollouts`). Returns (packed arrays, each rollout's length)."""
    from tropd_jax import packing
    from tropd_jax import rollouts as rollouts_lib

    def rollouts(n):
        p = rng.integers(max(1, prompt // 4), prompt + 1, n)
        r = rng.integers(max(1, length // 8), length - prompt + 1, n)
        cols = np.arange(length)[None]
        input_mask = ((cols >= prompt - p[:, None]) & (cols < prompt + r[:, None])).astype(np.int32)
        response = ((cols >= prompt) & (cols < prompt + r[:, None])).astype(np.int32)
        return dict(
            tokens=np.where(input_mask, rng.integers(3, vocab, (n, length)), 0).astype(np.int32),
            input_mask=input_mask,
            response_mask=response,
            prefix_mask=np.zeros((n, length), np.int32),
            logprobs=np.where(response, -rng.exponential(1.0, (n, length)), 0.0).astype(np.float32),
            finish_reason=np.full((n,), sampling.FINISH_LENGTH, np.int32),
        )

    pool = rollouts(16 * rows)
    n = 1
    while n < len(pool['tokens']) and packing.plan(pool['input_mask'][: n + 1], length).num_rows <= rows:
        n += 1
    chosen = {k: v[:n] for k, v in pool.items()}
    packed = rollouts_lib.pack_rollouts(types.SimpleNamespace(**chosen), rows, 4)
    return packed, chosen['input_mask'].sum(axis=1)


def random_targets(key, shape: tuple, k: int, vocab: int, mesh):
    """Teacher targets (`fused_loss.TeacherTargets`) of the right shapes and value ranges: distinct top-k ids,
    top-k log-probs decreasing and normalisable, [n, m, T] / [n, m, T, k]."""
    from tropd_jax import fused_loss

    k1, k2, k3, k4 = jax.random.split(key, 4)
    logits = 3.0 * jax.random.normal(k1, shape + (k + 1,))
    topk = -jnp.sort(-jax.nn.log_softmax(logits, axis=-1), axis=-1)[..., :k]
    base = jax.random.randint(k2, shape + (1,), 0, vocab)
    ids = (base + jnp.arange(k) * max(1, vocab // k)) % vocab  # distinct within a token
    targets = fused_loss.TeacherTargets(
        teacher_logprobs=-jax.random.exponential(k3, shape),
        topk_ids=ids.astype(jnp.int32),
        topk_logprobs=topk.astype(jnp.float32),
        teacher_entropy=jax.random.uniform(k4, shape, minval=0.5, maxval=3.0),
    )
    return jax.device_put(targets, NamedSharding(mesh, PartitionSpec(None, ('data', 'fsdp'))))


def train_variant(args, variant: str, mesh) -> dict:
    from tropd_jax import config as config_lib
    from tropd_jax import losses
    from tropd_jax import step as step_lib

    if variant == 'cudnn' and jax.default_backend() not in ('gpu', 'cuda'):
        return {'skipped': f'needs an NVIDIA GPU; the backend is {jax.default_backend()!r}'}
    config = recipe_config()
    attention = 'cudnn' if variant == 'cudnn' else 'blockwise'
    with config.unlocked():
        config.model.attention = attention
        config.model.teacher_placement = 'separate'  # the step takes precomputed targets
        config.train.micro_batch_size = args.train_rows
        config.train.packing = variant == 'packed'
    c = load_model_config(
        args,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        **config_lib.model_runtime_fields(config.model),
    )
    rng = np.random.default_rng(0)
    rows, length = args.train_rows, args.train_length
    if variant == 'packed':
        arrays, lengths = packed_rows(rng, rows, length, args.train_prompt, c.vocab_size)
        prompt_length = 1
    else:
        arrays = full_rows(rng, rows, length, args.train_prompt, c.vocab_size)
        lengths, prompt_length = np.full(rows, length), args.train_prompt
    settings = step_lib.step_settings(config, c.vocab_size, prompt_length)
    k = losses.topk_size(settings.method, dict(settings.hyperparameters))
    result = {
        'attention': attention,
        'rows': int(arrays['tokens'].shape[0]),
        'columns': length,
        'rollouts': len(lengths),
        'real_tokens': int(lengths.sum()),
        'padding_fraction': round(1.0 - float(lengths.sum()) / arrays['tokens'].size, 4),
        'k': k,
    }

    graphdef, params = nnx.split(init_decoder(c, seed=0, mesh=mesh))
    with jax.set_mesh(mesh):
        optimizer = step_lib.make_optimizer(settings.optimizer)
        targets = random_targets(
            jax.random.key(1), (1, arrays['tokens'].shape[0], length - prompt_length), k, c.vocab_size, mesh
        )
        step, batch_shardings, _, opt_shardings = step_lib.jit_train_step(
            mesh,
            params,
            jax.eval_shape(optimizer.init, params),
            targets,
            step_lib.batch_keys(settings),
            settings,
            graphdef,
            None,
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        batch = {name: jax.device_put(arrays[name], batch_shardings[name]) for name in step_lib.batch_keys(settings)}
        state = {'params': params, 'opt_state': opt_state, 'metrics': None}
        key = jax.random.key(2)

        def call():  # params and opt_state are donated: carry them from call to call
            state['params'], state['opt_state'], state['metrics'] = step(
                state['params'], state['opt_state'], targets, batch, key, settings
            )
            jax.block_until_ready(state['metrics'])

        times = timed(call, args.repeats)
    metrics = {name: float(v) for name, v in jax.device_get(state['metrics']).items()}
    seconds = times['median_s']
    flops = model_flops(c, lengths)
    result.update(
        compile_s=times['first_call_s'],
        step_seconds=times['seconds'],
        step_time_s=significant(seconds, 5),
        tokens_per_s=round(float(lengths.sum()) / seconds, 1),
        model_tflops_per_step=significant(flops / 1e12),
        mfu=significant(flops / seconds / (args.peak_tflops * 1e12)),
        loss=significant(metrics['loss']),
        skipped=metrics['skipped'],
    )
    return result


def train_section(args, mesh, out: dict, write) -> dict:
    """Fills `out` variant by variant, calling `write()` after each."""
    out.update(tokens_per_step=args.train_rows * args.train_length, peak_tflops=args.peak_tflops)
    for variant in args.variants.split(','):
        if variant not in VARIANTS:
            raise ValueError(f'unknown train variant {variant!r}; expected some of {", ".join(VARIANTS)}')
        out[variant] = guarded(lambda variant=variant: train_variant(args, variant, mesh), f'train.{variant}')
        write()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Sampler.


def bandwidth_bound(c: ModelConfig, state, batch: int, prompt: int, new: int, bandwidth_gbs: float) -> float:
    """Tokens/s if every decode step only read the weights and the filled KV cache once at `bandwidth_gbs`."""
    skip = () if c.tie_word_embeddings else ('embed',)  # an untied input embedding is a gather of B rows per step
    weight_bytes = sum(
        x.size * x.dtype.itemsize
        for path, x in jax.tree_util.tree_leaves_with_path(state)
        if getattr(path[0], 'key', None) not in skip
    )
    mean_filled = prompt + new / 2
    kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * mean_filled * jnp.dtype(c.dtype).itemsize
    return batch * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)


def sampler_section(args, mesh) -> dict:
    c = load_model_config(args, dtype='bfloat16', param_dtype='bfloat16')
    batch, prompt, new = args.sampler_batch, args.sampler_prompt, args.sampler_new
    model = init_decoder(c, seed=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, c.vocab_size, (batch, prompt)), jnp.int32)
    mask = jnp.ones_like(tokens)
    lengths = []

    def call():
        rollout = sampling.generate(model, tokens, mask, jax.random.key(len(lengths)), max_new_tokens=new)
        lengths.append(int(np.asarray(rollout.lengths).min()))

    times = timed(call, args.repeats)
    if min(lengths) != new:
        raise RuntimeError(f'a row stopped early: {min(lengths)} of {new} tokens')
    seconds = times['median_s']
    tokens_per_s = batch * new / seconds
    bound = bandwidth_bound(c, nnx.split(model)[1], batch, prompt, new, args.bandwidth_gbs)
    return {
        'batch': batch,
        'prompt': prompt,
        'new_tokens': new,
        'dtype': c.dtype,
        'compile_s': times['first_call_s'],
        'seconds': times['seconds'],
        'time_s': significant(seconds, 5),
        'tokens_per_s': round(tokens_per_s, 1),
        'bandwidth_gbs': args.bandwidth_gbs,
        'bandwidth_bound_tokens_per_s': round(bound, 1),
        'fraction_of_bandwidth_bound': significant(tokens_per_s / bound),
    }


# ---------------------------------------------------------------------------------------------------------------------


def guarded(fn, name: str) -> dict:
    """fn()'s result, or {'error': its text} (the traceback goes to stderr); the wall time either way."""
    start = time.perf_counter()
    print(f'device_check: {name} ...', file=sys.stderr, flush=True)
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001  (one failure must not hide the other figures)
        traceback.print_exc(limit=-8)  # the innermost frames: the output's tail is what a remote run returns
        out = {'error': f'{type(e).__name__}: {e}'[:2000]}
    out['wall_s'] = round(time.perf_counter() - start, 1)
    print(f'device_check: {name}: {json.dumps(out)}', file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    result = {
        'benchmark': 'device_check',
        'date': datetime.date.today().isoformat(),
        'tiny': args.tiny,
        'backend': jax.default_backend(),
        'device': str(device.device_kind),
        'devices': jax.device_count(),
        'jax': jax.__version__,
        'python': platform.python_version(),
    }

    def write():
        result['wall_s'] = round(time.perf_counter() - start, 1)
        if args.out:
            with open(args.out, 'w') as f:
                f.write(json.dumps(result) + '\n')

    mesh = sharding.make_mesh(1, 1, 1, devices=[device])  # one device: the figures are per chip
    sections = {
        'train': lambda: train_section(args, mesh, result.setdefault('train', {}), write),
        'sampler': lambda: sampler_section(args, mesh),
    }
    names = args.sections.split(',')
    for name in names:
        if name not in sections:
            raise ValueError(f'unknown section {name!r}; expected some of {", ".join(sections)}')
    for name in names:
        result[name] = guarded(sections[name], name)
        write()
    print(json.dumps(result), flush=True)
    return result


if __name__ == '__main__':
    main()
