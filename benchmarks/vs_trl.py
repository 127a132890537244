"""Head to head with TRL: the same on-policy distillation run by TRL's `DistillationTrainer` and by tropd_jax.

    pip install -e ".[peer]"   # TRL, pinned; never a dependency of the package or its tests
    python benchmarks/vs_trl.py                       # generalised JSD (beta 0.5), 20 steps of 64 prompts, 3 runs
    python benchmarks/vs_trl.py --loss=reverse_kl     # TRL's reverse KL (beta 1) against our K1 `opd`

Both sides distil the shipped tiny teacher into the shipped tiny student (tropd_jax/assets/tiny) on the same
prompts (`data/train.jsonl`, one user turn through the tokenizer's chat template, checked token for token), one
on-policy rollout per prompt, the same response budget, temperature 1, AdamW (b1 0.9, b2 0.98, eps 1e-8, no weight
decay) at a constant learning rate, global-norm clipping at 1, float32, no rematerialisation / gradient
checkpointing, the same number of steps and prompts per step, and a token-mean loss over the whole batch (TRL
divides by `num_items_in_batch`, the completion tokens of the batch; ours is `aggregation='token_mean'`). TRL runs
in its own process with `torch.set_num_threads(--torch_threads)`; ours is `python -m tropd_jax.main
--config=configs/tiny.py` with overrides (one XLA CPU device, no in-run evaluation or checkpoints). The runs go back
to back, the side that goes first alternating, and the figures are medians over `--runs` runs (train seeds
`--seed`, `--seed + 1`, ...): the machine may be shared, so compare the ratios of one invocation.

Per side: the median step over the steps after the first (`*_step_s`; the first step's excess over it, compilation
for us and first-call overheads for torch, is `*_first_step_extra_s`), its stages (rollout: generation with the
student; train: the teacher's scoring, the student's forward / backward and the optimizer update; TRL's teacher
forward is timed apart as `trl_teacher_s`, ours runs inside the one compiled train step), generated tokens per
second of the rollout stage and trained (response) tokens per second of the whole step. `ratio` is TRL's median
step time over ours; `ratio_tokens_per_s` the same for tokens per second, which allows for the two students writing
responses of different lengths. Each trained student is then graded by our evaluator (`python -m
tropd_jax.evaluate`, avg@`--eval_samples` on the first `--eval_problems` held-out problems, sampler seed 0, the
same for both). Prints one JSON line.

Fairness: what could not be aligned.
- Generation backend. TRL samples with `transformers` `generate` (eager PyTorch, a dynamic KV cache, each step a
  Python loop over the layers); ours with `tropd_jax.sampling` (one compiled XLA program). That is the point of the
  comparison, but it means the rollout stage compares two samplers as much as two trainers. TRL's fast path (vLLM)
  needs a GPU.
- Vocabulary. The shipped pair pads its LM heads differently (student 112 rows, teacher 128) beyond the tokenizer's
  105 real tokens. TRL requires equal `vocab_size` and would sample and score padding rows; ours slices both to the
  shared real vocabulary and never samples beyond it. TRL therefore gets copies of both models with their (tied)
  embedding cut to the real vocabulary: the same distributions ours uses, and its saved student is graded as such.
- The loss is the same divergence, computed differently: TRL's chunked kernel over the full vocabulary; ours the
  fused loss with k = the whole real vocabulary (top-k plus tail equals the exact JSD when k covers the
  vocabulary). TRL offers no sampled-token reverse KL: its `beta=1` is the exact full-distribution reverse KL,
  while our `opd` is the K1 policy-gradient estimate on the sampled tokens (the same divergence in expectation, a
  different gradient per batch).
- Batching. TRL trains the batch as one padded micro-batch; ours packs rollouts into rows (`train.packing`, the
  tiny recipe's micro-batches of 32 rows). Each side runs the layout it ships.
- Prompt order and random draws differ (TRL's sampler and torch's RNG against grain and JAX keys); the train
  seeds only make each side repeatable.
- Threads. torch uses `--torch_threads` intra-op threads; XLA CPU its own thread pool over the same cores.

Where the time goes (2026-12-04, 2-core CPU shared with other work, load average 16-25; `--steps=10`, medians of 3
runs): TRL's step 29.1 s against our 1.62 s (13.8x; per run 21.3x, 12.6x, 13.8x). Its rollout (`generate`, about
22 tokens per response, 64 rows) takes 14.5 s against our 0.22 s (46x): eager decoding pays Python and kernel-launch
overhead per token and layer that a compiled sampler does not. Its teacher forward takes 2.5 s and the rest of its
train step (student forward / backward, chunked JSD, AdamW) 5.3 s; our whole train step, teacher included, 1.43 s
(5.4x). The two students end within each other's seed spread (avg@8 TRL 0.285 / 0.284 / 0.293, ours 0.304 / 0.275
/ 0.294; the shipped student's is 0.224, docs/benchmarks.md). Our first step adds 75 s of compilation that TRL
does not pay: about 2.7 TRL steps' worth here, so on this pair a run of fewer than 3 steps is faster with TRL.
`--loss=reverse_kl` (one run, same setting): 25.6 s against 1.82 s a step (14.1x), but avg@8 TRL 0.295, ours
(`opd`) 0.217: at this learning rate the K1 estimate on sampled tokens is too noisy where TRL's exact reverse KL
over the vocabulary is not (docs/benchmarks.md has `opd` at lr 1e-3 falling to 0.209 over 120 steps too).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
TINY = os.path.join(ROOT, 'tropd_jax', 'assets', 'tiny')
TRL_VERSION = '1.16.0'  # the `peer` extra's pin
# Our method and TRL's `beta` for each loss both sides have.
LOSSES = {'jsd': ('jsd', 0.5), 'reverse_kl': ('opd', 1.0)}
ADAM_B2 = 0.98  # the tiny recipe's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--loss', default='jsd', choices=sorted(LOSSES))
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--prompts', type=int, default=64, help='prompts per step (one rollout each)')
    parser.add_argument('--max_new_tokens', type=int, default=64, help='response budget')
    parser.add_argument('--learning_rate', type=float, default=1e-3, help='constant (high enough to move in 20 steps)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0, help='train seed of the first run (then +1, +2, ...)')
    parser.add_argument('--torch_threads', type=int, default=2)
    parser.add_argument('--eval_samples', type=int, default=8)
    parser.add_argument('--eval_problems', type=int, default=256)
    parser.add_argument('--skip_eval', action='store_true', help='timings only')
    parser.add_argument('--eval_shipped', action='store_true', help='also grade the shipped student before training')
    parser.add_argument('--workdir', default=None, help='keep the runs here (default: a temporary directory)')
    parser.add_argument('--side', default='both', choices=['both', 'trl', 'ours'], help=argparse.SUPPRESS)
    parser.add_argument('--out', default=None, help=argparse.SUPPRESS)  # where a one-side child writes its JSON
    args = parser.parse_args(argv)
    for name in ('steps', 'prompts', 'max_new_tokens', 'runs', 'torch_threads', 'eval_samples', 'eval_problems'):
        if getattr(args, name) < 1:
            parser.error(f'--{name}={getattr(args, name)} must be >= 1')
    if args.steps < 2:
        parser.error(f'--steps={args.steps} must be >= 2: the first step compiles and is reported apart')
    if not args.learning_rate > 0:
        parser.error(f'--learning_rate={args.learning_rate} must be > 0')
    return args


def real_vocab_size(tokenizer) -> int:
    """The ids the tokenizer can produce: 0 .. largest + 1 (as `tropd_jax.models.tokenizer` counts them)."""
    return max(tokenizer.get_vocab().values()) + 1


def step_figures(steps: list[dict]) -> dict:
    """Medians over steps 2.. of per-step `{'step_s', 'rollout_s', 'teacher_s'?, 'tokens'}` rows, and the first
    step's excess over the median step (compilation / first-call overheads)."""
    timed = steps[1:]
    med = lambda f: statistics.median(f(s) for s in timed)
    out = {
        'step_s': med(lambda s: s['step_s']),
        'rollout_s': med(lambda s: s['rollout_s']),
        'train_s': med(lambda s: s['step_s'] - s['rollout_s']),
        'gen_tokens_per_s': med(lambda s: s['tokens'] / s['rollout_s']),
        'train_tokens_per_s': med(lambda s: s['tokens'] / s['step_s']),
        'response_tokens': med(lambda s: s['tokens']),
    }
    if all('teacher_s' in s for s in timed):
        out['teacher_s'] = med(lambda s: s['teacher_s'])
    out['first_step_extra_s'] = steps[0]['step_s'] - out['step_s']
    return out


def summarize(runs: list[dict], args: argparse.Namespace, versions: dict) -> dict:
    """The one JSON line: medians over runs of each side's figures (`trl_*`, `ours_*`), their ratios, per-run
    figures, and the setting."""
    out = {'benchmark': 'vs_trl', 'loss': args.loss, **versions}
    keys = sorted({k for r in runs for side in ('trl', 'ours') for k in r[side]})
    for side in ('trl', 'ours'):
        for key in keys:
            values = [r[side][key] for r in runs if r[side].get(key) is not None]
            if values:
                out[f'{side}_{key}'] = round(statistics.median(values), 4)
    out['ratio'] = round(statistics.median(r['trl']['step_s'] / r['ours']['step_s'] for r in runs), 3)
    out['ratio_tokens_per_s'] = round(
        statistics.median(r['ours']['train_tokens_per_s'] / r['trl']['train_tokens_per_s'] for r in runs), 3
    )
    out['ratio_rollout'] = round(statistics.median(r['trl']['rollout_s'] / r['ours']['rollout_s'] for r in runs), 3)
    out['ratio_train'] = round(statistics.median(r['trl']['train_s'] / r['ours']['train_s'] for r in runs), 3)
    out['runs'] = [
        {
            'seed': r['seed'],
            'first': r['first'],
            **{f'{s}_{k}': round(v, 4) for s in ('trl', 'ours') for k, v in r[s].items()},
        }
        for r in runs
    ]
    out['setting'] = {
        'pair': 'tropd_jax/assets/tiny',
        'steps': args.steps,
        'prompts_per_step': args.prompts,
        'rollouts_per_prompt': 1,
        'max_new_tokens': args.max_new_tokens,
        'temperature': 1.0,
        'learning_rate': args.learning_rate,
        'adam_b2': ADAM_B2,
        'our_method': LOSSES[args.loss][0],
        'trl_beta': LOSSES[args.loss][1],
        'torch_threads': args.torch_threads,
        'eval': f'avg@{args.eval_samples} on {args.eval_problems} held-out problems (tropd_jax.evaluate, seed 0)',
        'runs': args.runs,
    }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# TRL's side (its own process: torch's threads and XLA's do not share one).


def cut_to_vocabulary(src: str, dst: str, vocab: int) -> None:
    """Copies the HF checkpoint `src` to `dst` with its (tied) embedding cut to the first `vocab` rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(vocab)
    model.save_pretrained(dst)


def run_trl(args: argparse.Namespace, seed: int, workdir: str) -> dict:
    """Trains with TRL's DistillationTrainer; returns per-step timings and the saved student's directory."""
    import torch

    torch.set_num_threads(args.torch_threads)
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from tropd_jax import data

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(TINY, 'tokenizer'), padding_side='left')
    vocab = real_vocab_size(tokenizer)
    models = {}
    for name in ('student', 'teacher'):
        models[name] = os.path.join(workdir, f'{name}_cut')
        cut_to_vocabulary(os.path.join(TINY, name), models[name], vocab)

    records = [json.loads(line) for line in open(os.path.join(TINY, 'data', 'train.jsonl'), encoding='utf-8')]
    prompts = [[{'role': 'user', 'content': r['problem']}] for r in records]
    # The same tokens as our trainer's prompts (`tropd_jax.data`): the template rendered, then encoded bare.
    for messages in prompts[:32]:
        ours = tokenizer.encode(data.prompt_text(messages, tokenizer), add_special_tokens=False)
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(theirs['input_ids']) != list(ours):
            raise RuntimeError(f'prompt tokens differ for {messages!r}: ours {ours}, TRL {theirs["input_ids"]}')
    dataset = datasets.Dataset.from_list([{'prompt': p} for p in prompts])

    beta = LOSSES[args.loss][1]
    config = trl.DistillationConfig(
        output_dir=os.path.join(workdir, 'trl'),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type='constant',
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=ADAM_B2,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=beta,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        save_strategy='no',
        report_to='none',
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DistillationTrainer(
        model=models['student'],
        teacher_model=models['teacher'],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    # Stage timers: the rollout (tokenize, generate, pad) and the teacher's forward, inside the step.
    clock = {'rollout': 0.0, 'teacher': 0.0, 'tokens': 0}
    generate_and_score = trainer._generate_and_score_completions
    hidden_state = trainer._get_last_hidden_state

    def timed_generate(inputs):
        t = time.perf_counter()
        out = generate_and_score(inputs)
        clock['rollout'] += time.perf_counter() - t
        clock['tokens'] += int(out['completion_mask'].sum())
        return out

    def timed_hidden_state(model, *a, **kw):
        if model is not trainer.accelerator.unwrap_model(trainer.teacher_model):
            return hidden_state(model, *a, **kw)
        t = time.perf_counter()
        out = hidden_state(model, *a, **kw)
        clock['teacher'] += time.perf_counter() - t
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer._get_last_hidden_state = timed_hidden_state
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.update(start=time.perf_counter(), rollout=0.0, teacher=0.0, tokens=0)

        def on_step_end(self, *_, **__):
            steps.append(
                {
                    'step_s': time.perf_counter() - clock['start'],
                    'rollout_s': clock['rollout'],
                    'teacher_s': clock['teacher'],
                    'tokens': clock['tokens'],
                }
            )

    trainer.add_callback(StepTimer())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    student = os.path.join(workdir, 'trl_student')
    trainer.save_model(student)
    tokenizer.save_pretrained(student)
    if len(steps) != args.steps:
        raise RuntimeError(f'TRL ran {len(steps)} timed steps, expected {args.steps}')
    return {'steps': steps, 'train_wall_s': wall, 'student': student, 'trl_version': trl.__version__}


# ---------------------------------------------------------------------------------------------------------------------
# Our side: the trainer's CLI, as a user runs it.


def our_overrides(args: argparse.Namespace, seed: int, vocab: int) -> list[str]:
    method = LOSSES[args.loss][0]
    overrides = {
        'loss.method': method,
        'loss.jsd_beta': 0.5,
        'loss.k': vocab,  # the whole real vocabulary: the fused top-k + tail JSD is then the exact one
        'loss.aggregation': 'token_mean',
        'prefix.enabled': False,
        'rollout.num_rollouts': 1,
        'rollout.max_new_tokens': args.max_new_tokens,
        'rollout.temperature': 1.0,
        'optim.learning_rate': args.learning_rate,
        'optim.schedule': 'constant',
        'optim.warmup_steps': 0,
        'optim.b1': 0.9,
        'optim.b2': ADAM_B2,
        'optim.eps': 1e-8,
        'optim.weight_decay': 0.0,
        'optim.clip_norm': 1.0,
        'train.steps': args.steps,
        'train.prompts_per_step': args.prompts,
        'train.micro_batch_size': min(32, args.prompts),
        'train.seed': seed,
        'data.seed': seed,
        'eval.path': '',
        'checkpoint.every_steps': 0,
        'log.progress_bar': False,
        'log.tensorboard': False,
    }
    return [f'--config.{k}={v}' for k, v in overrides.items()]


def run_ours(args: argparse.Namespace, seed: int, workdir: str, vocab: int) -> dict:
    from tropd_jax import metrics

    run_dir = os.path.join(workdir, 'ours')
    command = [
        sys.executable,
        '-m',
        'tropd_jax.main',
        f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
        f'--workdir={run_dir}',
        *our_overrides(args, seed, vocab),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [r for r in metrics.read_metrics(os.path.join(run_dir, 'metrics.jsonl')) if 'rollout_time' in r]
    steps = [
        {
            'step_s': r['rollout_time'] + r['train_time'],
            'rollout_s': r['rollout_time'],
            'tokens': r['response_tokens'],
        }
        for r in rows
    ]
    if len(steps) != args.steps:
        raise RuntimeError(f'our trainer logged {len(steps)} steps, expected {args.steps}')
    return {'steps': steps, 'process_wall_s': wall, 'student': os.path.join(run_dir, 'hf')}


# ---------------------------------------------------------------------------------------------------------------------


def child_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return env


def evaluate(args: argparse.Namespace, model_dir: str) -> float:
    """avg@K of a saved student by our evaluator, on the held-out file."""
    command = [
        sys.executable,
        '-m',
        'tropd_jax.evaluate',
        f'--model={model_dir}',
        f'--tokenizer={os.path.join(TINY, "tokenizer")}',
        f'--data={os.path.join(TINY, "data", "eval.jsonl")}',
        f'--samples={args.eval_samples}',
        f'--limit={args.eval_problems}',
        f'--max_new_tokens={args.max_new_tokens}',
        '--seed=0',
        '--show=0',
    ]
    result = subprocess.run(command, check=True, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])['avg_at_k'])


def run_side(side: str, args: argparse.Namespace, seed: int, workdir: str) -> dict:
    """One side of one run, in a child process (so each side has the cores' threads to itself)."""
    out = os.path.join(workdir, f'{side}.json')
    command = [sys.executable, os.path.abspath(__file__), f'--side={side}', f'--seed={seed}', f'--out={out}']
    for name in ('loss', 'steps', 'prompts', 'max_new_tokens', 'learning_rate', 'torch_threads'):
        command.append(f'--{name}={getattr(args, name)}')
    command.append(f'--workdir={workdir}')
    subprocess.run(command, check=True, cwd=ROOT, env=child_env())
    with open(out, encoding='utf-8') as f:
        return json.load(f)


def one_side_main(args: argparse.Namespace) -> None:
    os.makedirs(args.workdir, exist_ok=True)
    if args.side == 'trl':
        result = run_trl(args, args.seed, args.workdir)
    else:
        from transformers import AutoTokenizer

        vocab = real_vocab_size(AutoTokenizer.from_pretrained(os.path.join(TINY, 'tokenizer')))
        result = run_ours(args, args.seed, args.workdir, vocab)
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(result, f)


def main() -> None:
    args = parse_args()
    if args.side != 'both':
        return one_side_main(args)
    import jax
    import torch

    try:
        import trl
    except ImportError:
        sys.exit('TRL is not installed: pip install -e ".[peer]"')
    versions = {
        'trl_version': trl.__version__,
        'torch_version': torch.__version__,
        'jax_version': jax.__version__,
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
        'load_avg_start': round(os.getloadavg()[0], 2),
    }
    root = args.workdir or tempfile.mkdtemp(prefix='vs_trl_')
    if args.eval_shipped and not args.skip_eval:  # the shipped student before training, graded the same way
        versions[f'student_avg_at_{args.eval_samples}'] = evaluate(args, os.path.join(TINY, 'student'))
    runs = []
    for i in range(args.runs):
        seed = args.seed + i
        order = ('trl', 'ours') if i % 2 == 0 else ('ours', 'trl')
        run = {'seed': seed, 'first': order[0]}
        for side in order:
            workdir = os.path.join(root, f'run{i}_{side}')
            result = run_side(side, args, seed, workdir)
            figures = step_figures(result['steps'])
            if not args.skip_eval:
                figures[f'avg_at_{args.eval_samples}'] = evaluate(args, result['student'])
            run[side] = figures
            print(f'run {i} {side}: ' + json.dumps({k: round(v, 4) for k, v in figures.items()}), file=sys.stderr)
        runs.append(run)
    versions['load_avg_end'] = round(os.getloadavg()[0], 2)
    print(json.dumps(summarize(runs, args, versions)))


if __name__ == '__main__':
    main()
