"""Reproduce the paper's comparisons on a tiny teacher/student pair: every method, same budget, several seeds.

    # configs/tiny.py is tuned for its JSD demo (lr 2e-3, 200 steps): the study of record uses TrOPD's recipe.
    python benchmarks/reproduce.py --jobs 2 --steps 150 --set optim.learning_rate=3e-4
    python benchmarks/reproduce.py --config configs/OTHER.py    # any tiny config (its own task, report and figures)
    python benchmarks/reproduce.py --methods opd tropd --seeds 1 --steps 4   # a smoke run
    python benchmarks/reproduce.py --report_only                # rebuild the report from finished runs

Each run is `train.train_and_evaluate` on the config with one method and one seed, in `WORKDIR/METHOD/seed_S` (its
`metrics.jsonl`, checkpoints, the exported student `hf/`, `eval.json` and `summary.json`), as a subprocess of its
own whose output goes to `WORKDIR/logs/METHOD_seed_S.log`; `--jobs N` runs N of them at once (each in its own
directory; on one GPU the processes share it, so none preallocates its memory). Keep N well under the host's
cores: on a 16-core host with one H200, 44 runs at once (two studies of 22) drove the load average to ~590 and no run
got past its first training step in five minutes (2026-12-04); each process compiles and drives its own programs
from the CPU, and the tiny models leave the GPU nearly idle (1% utilisation). The study is resumable: a run with a
`summary.json` is skipped, and an interrupted run resumes from its last checkpoint. Seeds set both the data order and
the rollout / trust-region keys, so for a given seed every method sees the same prompts in the same order.

Every trained student, and the initial student and the teacher (`baselines.json`), is evaluated on the same held-out
problems with the same key: greedy, and `--eval_samples` samples per problem at temperature 1 (avg@k and pass@k).

The report (tables over seeds, the paper's claims judged against the seed spread, figures) is written into a
generated section of `--doc` (by default `docs/results_TASK.md`, TASK = the config file's name), between
`<!-- BEGIN GENERATED ... -->` / `<!-- END GENERATED ... -->` markers: the section is replaced on a rerun, and text
outside it is never changed. Figures go to `docs/figures/TASK/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tropd_jax import losses, plotting  # noqa: E402  (importing jax does not start a backend)

# The study: the paper's main baselines, TrOPD and its clipped variant, and the exact generalised JSD.
DEFAULT_METHODS = ('opd', 'tropd', 'tropd_clip', 'fkl_outlier', 'clip_outlier', 'reopold', 'jsd')
# The paper's Figure 3 compares TrOPD with OPD and Clip Outlier; more lines than this make the figure unreadable.
FIGURE3_METHODS = ('opd', 'clip_outlier', 'tropd')
TAIL = 0.2  # "at the end of training" = the mean over the last 20% of steps (single steps are noisy)


def load_config(path: str, overrides: dict):
    """`get_config()` of a config file, with dotted-name overrides (`{"train.steps": 40}`)."""
    spec = importlib.util.spec_from_file_location('reproduce_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for name, value in overrides.items():
        *parents, leaf = name.split('.')
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f'unknown config field {name!r}')
        node[leaf] = value
    return config


def resolve_defaults(args) -> None:
    """Fills the flags left at None from the config: its steps, evaluation samples and problems."""
    config = load_config(args.config, {})
    if args.steps is None:
        args.steps = int(config.train.steps)
    if args.eval_samples is None:
        args.eval_samples = int(config.eval.samples)
    if args.eval_problems is None:
        args.eval_problems = int(config.eval.num_problems)
    if not config.eval.path:
        raise SystemExit(f'{args.config} has no eval.path: the study needs held-out problems')


def run_config(args, method: str, seed: int):
    overrides = {
        'loss.method': method,
        'train.seed': seed,
        'data.seed': seed,
        'train.steps': args.steps,
        'eval.samples': args.eval_samples,
        'eval.num_problems': args.eval_problems,
        # The study evaluates the exported student itself (greedy and sampled, `evaluate_run`).
        'eval.at_start': False,
        'eval.at_end': False,
        'eval.every_steps': 0,
        'checkpoint.every_steps': max(1, args.steps // 4),
        'checkpoint.export_hf_at_end': True,
        'log.progress_bar': False,
        'log.tensorboard': False,
        **args.set,
    }
    return load_config(args.config, overrides)  # validate_config clamps the recipe's warm-up to a short run


def tail_mean(steps: np.ndarray, values: np.ndarray) -> float:
    """Mean of the values over the last TAIL fraction of steps (at least one)."""
    if len(values) == 0:
        return float('nan')
    n = max(1, int(round(TAIL * len(values))))
    return float(np.mean(values[-n:]))


def summarize(records: list[dict]) -> dict:
    """The training numbers of one run from its metrics records."""
    out = {}
    for key in (
        'grad_norm',
        'update_norm',
        'student_entropy',
        'trust_fraction',
        'outlier_fraction',
        'logprob_mismatch',
        'logprob_mismatch_max',
    ):
        steps, values = plotting.series(records, key)
        out[f'final_{key}'] = tail_mean(steps, values)
        out[f'mean_{key}'] = float(np.mean(values)) if len(values) else float('nan')
        out[f'max_{key}'] = float(np.max(values)) if len(values) else float('nan')
    # Prefix entropy only where the step had prefix tokens (the metric is 0 on steps without).
    with_prefix = [r for r in records if r.get('prefix_fraction', 0) > 0]
    steps, values = plotting.series(with_prefix, 'prefix_student_entropy')
    out['mean_prefix_student_entropy'] = float(np.mean(values)) if len(values) else float('nan')
    steps, _ = plotting.series(records, 'loss')
    out['steps'] = int(steps[-1]) if len(steps) else 0
    return out


def evaluate_model(args, model_dir: str, config) -> dict:
    """Greedy and sampled accuracy of a checkpoint directory on the study's held-out problems, with the study's key."""
    import jax

    from tropd_jax import evaluate
    from tropd_jax.models import from_pretrained, load_tokenizer

    tokenizer = load_tokenizer(config.model.tokenizer_path or model_dir)
    model, _ = from_pretrained(model_dir)
    max_new = config.eval.max_new_tokens if config.eval.max_new_tokens > 0 else config.rollout.max_new_tokens
    return evaluate.greedy_and_sampled(
        model,
        tokenizer,
        evaluate.config_records(config),
        samples=args.eval_samples,
        key=jax.random.key(args.eval_seed),
        max_new_tokens=max_new,
        batch_size=config.eval.batch_size,
        temperature=config.eval.temperature,
        prompt_template=config.data.prompt_template,
        chat_template=config.data.chat_template,
    )


def run_dir(args, method: str, seed: int) -> str:
    return os.path.join(args.workdir, method, f'seed_{seed}')


def run_one(args, method: str, seed: int) -> dict:
    """Trains (or resumes, or skips) one run, evaluates its student; returns its summary."""
    import jax

    from tropd_jax import train

    workdir = run_dir(args, method, seed)
    summary_path = os.path.join(workdir, 'summary.json')
    if os.path.exists(summary_path):
        return _read_json(summary_path)
    start = time.time()
    config = run_config(args, method, seed)
    # A resumed run that had finished training only re-exports its last checkpoint to hf/.
    train.train_and_evaluate(config, workdir)
    result = evaluate_model(args, os.path.join(workdir, 'hf'), config)
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
        json.dump(result, f, indent=1)
    summary = {
        'method': method,
        'seed': seed,
        'wall_seconds': time.time() - start,
        'backend': _backend(jax),
        **{name: result[name] for name in ('greedy', 'avg_at_k', 'pass_at_k')},
        **summarize(plotting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))),
    }
    with open(summary_path, 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def baselines(args) -> dict:
    """Greedy and sampled accuracy of the initial student and of the teacher (cached in `baselines.json`)."""
    path = os.path.join(args.workdir, 'baselines.json')
    if os.path.exists(path):
        return _read_json(path)
    config = run_config(args, 'tropd', 0)
    out = {name: evaluate_model(args, getattr(config.model, f'{name}_path'), config) for name in ('student', 'teacher')}
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running the study: one subprocess per run, `--jobs` at a time.


def child_env() -> dict:
    env = dict(os.environ)
    # Several processes share one GPU: none may take most of its memory up front (harmless on CPU).
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    # The tiny models' float32 matmuls in float32, not TF32 / bfloat16 passes (the CPU computes them so anyway).
    env.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
    env['PYTHONPATH'] = str(ROOT) + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return env


def run_all(args, jobs: list[str]) -> list[str]:
    """Runs the jobs (`baselines` or `METHOD:SEED`), at most `args.jobs` at once; returns the jobs that failed.

    Each job slot has its own XLA compilation cache: the slot's later runs reuse its compiled programs, and no two
    processes write one cache file at the same time.
    """
    logs = os.path.join(args.workdir, 'logs')
    os.makedirs(logs, exist_ok=True)
    pending, running, failed = list(jobs), {}, []
    free_slots = list(range(args.jobs))
    try:
        while pending or running:
            while pending and free_slots:
                job, slot = pending.pop(0), free_slots.pop(0)
                log_path = os.path.join(logs, job.replace(':', '_seed_') + '.log')
                command = [
                    sys.executable,
                    str(pathlib.Path(__file__).resolve()),
                    *args.argv,
                    # Absolute paths: the subprocess must not depend on where the study was started from.
                    '--config',
                    os.path.abspath(args.config),
                    '--workdir',
                    os.path.abspath(args.workdir),
                    '--job',
                    job,
                    '--cache_dir',
                    os.path.join(args.workdir, 'jax_cache', f'slot_{slot}'),
                ]
                with open(log_path, 'a') as log:
                    log.write(f'\n$ {" ".join(command)}\n')
                    log.flush()
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
                running[process] = (job, slot, log_path, time.time())
            time.sleep(1.0)
            for process in [p for p in running if p.poll() is not None]:
                job, slot, log_path, started = running.pop(process)
                free_slots.append(slot)
                if process.returncode:
                    failed.append(job)
                    print(f'{job} FAILED (exit {process.returncode}); see {log_path}', flush=True)
                else:
                    print(f'{job} done in {time.time() - started:.0f} s: {_describe(args, job)}', flush=True)
    except KeyboardInterrupt:
        for process in running:
            process.terminate()  # SIGTERM: each run saves its step's checkpoint and resumes next time
        for process in running:
            process.wait()
        raise
    return failed


def _describe(args, job: str) -> str:
    if job == 'baselines':
        base = _read_json(os.path.join(args.workdir, 'baselines.json'))
        return ', '.join(f'{n} {_accuracy_line(args, r)}' for n, r in base.items())
    method, seed = job.split(':')
    return _accuracy_line(args, _read_json(os.path.join(run_dir(args, method, int(seed)), 'summary.json')))


def _accuracy_line(args, r: dict) -> str:
    k = args.eval_samples
    return f'greedy {r["greedy"]:.3f}, avg@{k} {r["avg_at_k"]:.3f}, pass@{k} {r["pass_at_k"]:.3f}'


def run_job(args) -> None:
    """The body of one subprocess: `--job baselines` or `--job METHOD:SEED`."""
    import jax

    # The slot's programs persist across its runs (and a resumed study): most compilation is skipped after the first.
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    if args.job == 'baselines':
        baselines(args)
        return
    method, _, seed = args.job.partition(':')
    summary = run_one(args, method, int(seed))
    print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# The report.


def _stat(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if len(values) == 0:
        return float('nan'), float('nan')
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt(values, digits=3, kind='f') -> str:
    """`mean ± std` of `values` (`kind='e'`: in scientific notation, for quantities near zero)."""
    mean, std = _stat(values)
    return f'{mean:.{digits}{kind}} ± {std:.{digits}{kind}}' if np.isfinite(mean) else '–'


def claims(by_method: dict[str, list[dict]], base: dict, k: int) -> list[str]:
    """The paper's claims, each checked against the study's numbers, as Markdown bullet points."""

    def mean(method, key):
        return _stat([s.get(key, np.nan) for s in by_method.get(method, [])])

    def compare(a, b, key, higher, what):
        (ma, sa), (mb, sb) = mean(a, key), mean(b, key)
        if not (np.isfinite(ma) and np.isfinite(mb)):
            return None
        held = ma > mb if higher else ma < mb
        if min(len(by_method[a]), len(by_method[b])) < 2:
            verdict = ('held' if held else 'did not hold') + ' (one seed: no spread to judge it by)'
        elif abs(ma - mb) > sa + sb:
            verdict = '**held**' if held else '**did not hold**'
        else:
            verdict = ('held' if held else 'did not hold') + ', within seed spread'
        return f'{what}: {a} {ma:.3g} ± {sa:.2g} vs {b} {mb:.3g} ± {sb:.2g}: {verdict}.'

    lines = []
    for key, name in (('greedy', 'greedy accuracy'), ('avg_at_k', f'avg@{k}'), ('pass_at_k', f'pass@{k}')):
        for other in ('opd', 'reopold', 'clip_outlier'):
            lines.append(compare('tropd', other, key, True, f'TrOPD above {other} (held-out {name})'))
    lines += [
        compare('tropd', 'opd', 'mean_grad_norm', False, 'Lower gradient norm than OPD (mean over training)'),
        compare('tropd', 'clip_outlier', 'mean_grad_norm', False, 'Lower gradient norm than Clip Outlier'),
        # Under Adam with clipping a smaller gradient need not mean a smaller step: judge stability on the update.
        compare(
            'tropd', 'opd', 'mean_update_norm', False, 'Smaller updates than OPD (update norm, mean over training)'
        ),
        compare('tropd', 'opd', 'max_update_norm', False, 'Smaller largest update than OPD (update norm, max)'),
        compare('tropd', 'clip_outlier', 'mean_update_norm', False, 'Smaller updates than Clip Outlier (mean)'),
        compare('tropd', 'opd', 'final_student_entropy', True, 'Higher entropy than OPD (end of training)'),
        compare('tropd', 'clip_outlier', 'final_student_entropy', True, 'Higher entropy than Clip Outlier'),
        compare(
            'tropd', 'fkl_outlier', 'avg_at_k', True, 'Off-policy guidance helps (TrOPD = FKL Outlier + teacher prefix)'
        ),
    ]
    fkl, _ = mean('topk_fkl', 'avg_at_k')
    if np.isfinite(fkl) and 'student' in base:
        start = base['student']['avg_at_k']
        lines.append(
            f"Top-k FKL alone collapses: topk_fkl ends at avg@{k} {fkl:.3g} against the initial student's "
            f'{start:.3g}: {"**held** (below the starting point)" if fkl < start else "**did not hold**"}.'
        )
    return [f'- {line}' for line in lines if line]


def report_text(args, summaries: list[dict], base: dict) -> str:
    """The generated section: tables, claims and figure links (the figures are written too)."""
    by_method: dict[str, list[dict]] = {}
    for s in summaries:
        by_method.setdefault(s['method'], []).append(s)
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    runs = {
        m: [os.path.join(run_dir(args, m, s['seed']), 'metrics.jsonl') for s in group] for m, group in by_method.items()
    }
    shown = {m: runs[m] for m in FIGURE3_METHODS if m in runs} or runs
    plotting.plot_runs(
        shown,
        str(figures / 'figure3.png'),
        smoothing=0.6,
        title='student entropy and gradient norm (mean over seeds, min-max band)',
    )
    plotting.plot_runs(
        runs,
        str(figures / 'all_methods.png'),
        smoothing=0.6,
        metrics=('student_entropy', 'grad_norm', 'update_norm', 'trust_fraction'),
    )
    _accuracy_figure(by_method, base, str(figures / 'accuracy.png'), args.eval_samples)

    k = args.eval_samples
    made_by = _read_json(os.path.join(args.workdir, 'command.json')) or args.argv
    total = sum(s.get('wall_seconds', 0.0) for s in summaries)
    backends = sorted({s.get('backend', '?') for s in summaries})
    rel = os.path.relpath(figures, pathlib.Path(args.doc).parent)
    methods = [m for m in losses.METHODS if m in by_method]
    student, teacher = base.get('student', {}), base.get('teacher', {})

    def gap(values):
        # The fraction of the teacher-student avg@k gap that the run closed.
        span = teacher.get('avg_at_k', np.nan) - student.get('avg_at_k', np.nan)
        return [(v - student.get('avg_at_k', np.nan)) / span for v in values]

    def accuracy_row(name, r):
        cells = ' | '.join(f'{r[key]:.3f}' if key in r else '–' for key in ('greedy', 'avg_at_k', 'pass_at_k'))
        return f'| {name} | – | {cells} | |'

    lines = [
        f'## Results: `{_shown_path(args.config)}`',
        '',
        f'Written on {time.strftime("%Y-%m-%d", time.gmtime())} (UTC) by '
        f'`{" ".join(["python benchmarks/reproduce.py", *made_by])}`; rerun it to refresh this section. Each method '
        f"trained from the config's student with its teacher, {args.steps} steps, seeds "
        f'{sorted({s["seed"] for s in summaries})}; evaluated on {args.eval_problems or "all"} held-out problems '
        f'(sampler seed {args.eval_seed} for every model): greedy, and {k} samples per problem at temperature 1. '
        f'Training time: {total / 60:.0f} min summed over runs ({", ".join(backends)}; {os.cpu_count()} CPU cores).',
        '',
        *([f'Overrides of every run: `{" ".join(f"{n}={v}" for n, v in args.set.items())}`.', ''] if args.set else []),
        'Mean ± standard deviation over seeds. Gap closed = (avg@k − student) / (teacher − student).',
        '',
        f'| model | seeds | greedy | avg@{k} (T=1) | pass@{k} (T=1) | gap closed (avg@{k}) |',
        '|---|---|---|---|---|---|',
        *([accuracy_row('initial student', student)] if student else []),
        *([accuracy_row('teacher', teacher)] if teacher else []),
    ]
    for method in methods:
        group = by_method[method]
        lines.append(
            f'| `{method}` | {len(group)} | {_fmt([s.get("greedy", np.nan) for s in group])} '
            f'| {_fmt([s["avg_at_k"] for s in group])} | {_fmt([s.get("pass_at_k", np.nan) for s in group])} '
            f'| {_fmt(gap([s["avg_at_k"] for s in group]), 2)} |'
        )
    lines += [
        '',
        'Training dynamics. Gradient norm: global norm before clipping. Update norm: the global norm of the step',
        'applied to the weights (after clipping and AdamW). "End" = mean over the last 20% of steps. Entropies are',
        "the student's over its own (on-policy) tokens; prefix: over teacher-written prefix tokens (– where a method",
        'has none). Trust fraction: mean M_t on on-policy tokens (1 without a trust region). |log ρ| = |log π_sampler',
        '− log π_learner| on on-policy tokens, per-step mean averaged over training (ρ should be 1).',
        '',
        '| method | grad norm (mean) | grad norm (max) | update norm (mean) | update norm (max) '
        '| entropy, on-policy (end) | entropy, prefix (mean) | trust fraction | \\|log ρ\\| |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for method in methods:
        group = by_method[method]

        def col(key, *fmt, group=group):
            return _fmt([s.get(key, np.nan) for s in group], *fmt)

        lines.append(
            f'| `{method}` | {col("mean_grad_norm", 4)} | {col("max_grad_norm", 4)} '
            f'| {col("mean_update_norm", 2, "e")} | {col("max_update_norm", 2, "e")} '
            f'| {col("final_student_entropy")} | {col("mean_prefix_student_entropy")} '
            f'| {col("mean_trust_fraction")} | {col("mean_logprob_mismatch", 1, "e")} |'
        )
    lines += [
        '',
        "### The paper's claims, here",
        '',
        *claims(by_method, base, k),
        '',
        '"Within seed spread": the two means differ by less than the sum of their standard deviations.',
        '',
        f'![entropy and gradient norm]({rel}/figure3.png)',
        '',
        f'![accuracy per method]({rel}/accuracy.png)',
        '',
        f'![every method]({rel}/all_methods.png)',
    ]
    return '\n'.join(lines)


def write_generated(path, name: str, text: str) -> None:
    """Puts `text` between the markers of section `name` in the file at `path`: replaces that section when the file
    has it, appends it otherwise (creating the file). Text outside the markers is never changed."""
    begin = f'<!-- BEGIN GENERATED by benchmarks/reproduce.py: {name} (edits inside are overwritten) -->'
    end = f'<!-- END GENERATED: {name} -->'
    path = pathlib.Path(path)
    old = path.read_text() if path.exists() else ''
    section = f'{begin}\n{text.strip()}\n{end}'
    if begin in old:
        head, _, rest = old.partition(begin)
        if end not in rest:
            raise SystemExit(f'{path}: {begin!r} has no matching {end!r}; fix the file by hand')
        new = head + section + rest.partition(end)[2]
    else:
        new = old.rstrip('\n') + ('\n\n' if old.strip() else '') + section + '\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def _accuracy_figure(by_method, base, path, k) -> None:
    from matplotlib.figure import Figure

    methods = [m for m in losses.METHODS if m in by_method]
    fig = Figure(figsize=(3 * max(2.5, 0.45 * len(methods) + 1), 3.6), layout='constrained')
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(
        axes, ('greedy', 'avg_at_k', 'pass_at_k'), ('greedy', f'avg@{k} (T=1)', f'pass@{k} (T=1)'), strict=True
    ):
        for i, m in enumerate(methods):
            values = [s.get(key, np.nan) for s in by_method[m]]
            mean, std = _stat(values)
            color = 'tab:green' if m.startswith('tropd') else 'tab:blue'
            ax.bar(i, mean, yerr=std, color=color, alpha=0.8, capsize=3)
            ax.plot([i] * len(values), values, 'k.', ms=4)
        for name, label, style in (('student', 'initial student', '--'), ('teacher', 'teacher', ':')):
            if key in base.get(name, {}):
                ax.axhline(base[name][key], color='k', ls=style, lw=1, label=label)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha='right', fontsize=8)
        ax.set_title(f'held-out {title}', fontsize=9)
        ax.set_ylim(bottom=0.0)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=str(ROOT / 'configs' / 'tiny.py'))
    parser.add_argument('--workdir', default=None, help='default: runs/reproduce/TASK')
    parser.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS), choices=losses.METHODS)
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=None, help="default: the config's train.steps")
    parser.add_argument('--eval_samples', type=int, default=None, help="k of avg@k (default: the config's)")
    parser.add_argument('--eval_problems', type=int, default=None, help="held-out problems, 0 = all (the config's)")
    parser.add_argument('--eval_seed', type=int, default=0, help='PRNG seed of every evaluation sampler')
    parser.add_argument('--jobs', type=int, default=1, help='runs at once, each a subprocess')
    parser.add_argument('--doc', default=None, help='file of the generated section (default: docs/results_TASK.md)')
    parser.add_argument('--figures', default=None, help='default: docs/figures/TASK')
    parser.add_argument('--report_only', action='store_true', help='only rebuild the report from finished runs')
    parser.add_argument(
        '--set',
        nargs='*',
        default=[],
        metavar='NAME=VALUE',
        help='config overrides for every run, e.g. optim.learning_rate=1.5e-3 (another regime: '
        'give it its own --workdir)',
    )
    parser.add_argument('--job', help=argparse.SUPPRESS)  # internal: the one run of a subprocess
    parser.add_argument('--cache_dir', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.set = dict(_parse_override(item) for item in args.set)
    task = pathlib.Path(args.config).stem
    args.workdir = args.workdir or str(ROOT / 'runs' / 'reproduce' / task)
    args.doc = args.doc or str(ROOT / 'docs' / f'results_{task}.md')
    args.figures = args.figures or str(ROOT / 'docs' / 'figures' / task)
    if args.seeds < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit(f'--seeds={args.seeds}, --jobs={args.jobs} and --steps={args.steps} must be >= 1')
    resolve_defaults(args)
    if args.job:
        run_job(args)
        return

    # Seed-major: an interrupted study still has every method at the lower seeds.
    jobs = [f'{method}:{seed}' for seed in range(args.seeds) for method in args.methods]
    failed = []
    if not args.report_only:
        todo = [j for j in jobs if not os.path.exists(os.path.join(run_dir(args, *_split(j)), 'summary.json'))]
        print(f'{len(jobs) - len(todo)} of {len(jobs)} runs done; {len(todo)} to run, {args.jobs} at once', flush=True)
        if not os.path.exists(os.path.join(args.workdir, 'baselines.json')):
            todo.insert(0, 'baselines')
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, 'command.json'), 'w') as f:
            json.dump(args.argv, f)  # what --report_only quotes as the command that made the runs
        failed = run_all(args, todo)
        if failed:
            print(f'{len(failed)} failed: {" ".join(failed)}; the report covers the finished runs', flush=True)
    base = _read_json(os.path.join(args.workdir, 'baselines.json'))
    # A study written before greedy evaluation kept only avg@k per model.
    base = {n: r if isinstance(r, dict) else {'avg_at_k': r} for n, r in base.items()}
    summaries = [_read_json(os.path.join(run_dir(args, *_split(j)), 'summary.json')) for j in jobs]
    summaries = [s for s in summaries if s]
    if not summaries:
        raise SystemExit(f'no finished runs under {args.workdir}')
    write_generated(args.doc, task, report_text(args, summaries, base))
    print(f'wrote the {task!r} section of {args.doc} and {args.figures}/*.png', flush=True)
    if failed:
        raise SystemExit(1)


def _split(job: str) -> tuple[str, int]:
    method, _, seed = job.partition(':')
    return method, int(seed)


def _parse_override(item: str) -> tuple[str, object]:
    """`NAME=VALUE` -> (NAME, VALUE as int, float, bool or str)."""
    name, sep, text = item.partition('=')
    if not sep:
        raise SystemExit(f'--set {item!r}: expected NAME=VALUE')
    for parse in (int, float):
        try:
            return name, parse(text)
        except ValueError:
            pass
    return name, {'true': True, 'false': False}.get(text.lower(), text)


def _backend(jax) -> str:
    return f'JAX {jax.default_backend()}, {jax.device_count()} device(s)'


def _shown_path(path: str) -> str:
    """`path` relative to the repository when it is inside it (no machine-specific prefix in the report)."""
    path = pathlib.Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


if __name__ == '__main__':
    main()
