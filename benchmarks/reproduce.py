"""Reproduce the paper's comparisons on the shipped tiny teacher/student pair: every method, same budget, several seeds.

    python benchmarks/reproduce.py                      # the full study (about an hour on a 2-core CPU)
    python benchmarks/reproduce.py --methods opd tropd --seeds 1 --steps 4   # a smoke run
    python benchmarks/reproduce.py --report_only        # rebuild docs/results.md from finished runs

Each run is `train.train_and_evaluate` on `configs/tiny.py` with one method and one seed, in
`WORKDIR/METHOD/seed_S` (its `metrics.jsonl`, checkpoints and `summary.json`). The study is resumable: a run with a
`summary.json` is skipped, and an interrupted run resumes from its last checkpoint. Seeds set both the data order and
the rollout / trust-region keys, so for a given seed every method sees the same prompts in the same order.

At the end it writes `docs/results.md` (a table per method: held-out avg@k mean ± standard deviation over seeds, the
gradient norm and student entropy at the end of training, the trust fraction) with the paper's claims checked
against these numbers, and the figures under `docs/figures/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tropd_jax import losses, plotting  # noqa: E402

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


def run_config(args, method: str, seed: int):
    overrides = {
        'loss.method': method,
        'train.seed': seed,
        'data.seed': seed,
        'train.steps': args.steps,
        'eval.samples': args.eval_samples,
        'eval.num_problems': args.eval_problems,
        'eval.at_start': False,  # the initial student is evaluated once, in baselines.json
        'eval.at_end': True,
        'eval.every_steps': 0,
        'checkpoint.every_steps': max(1, args.steps // 4),
        'checkpoint.export_hf_at_end': False,
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
    """The numbers of one run from its metrics records."""
    out = {}
    for name, key in (
        ('grad_norm', 'grad_norm'),
        ('student_entropy', 'student_entropy'),
        ('trust_fraction', 'trust_fraction'),
        ('outlier_fraction', 'outlier_fraction'),
        ('logprob_mismatch', 'logprob_mismatch'),
        ('logprob_mismatch_max', 'logprob_mismatch_max'),
    ):
        steps, values = plotting.series(records, key)
        out[f'final_{name}'] = tail_mean(steps, values)
        out[f'mean_{name}'] = float(np.mean(values)) if len(values) else float('nan')
    # Prefix entropy only where the step had prefix tokens (the metric is 0 on steps without).
    with_prefix = [r for r in records if r.get('prefix_fraction', 0) > 0]
    steps, values = plotting.series(with_prefix, 'prefix_student_entropy')
    out['mean_prefix_student_entropy'] = float(np.mean(values)) if len(values) else float('nan')
    steps, grad = plotting.series(records, 'grad_norm')
    out['max_grad_norm'] = float(np.max(grad)) if len(grad) else float('nan')
    steps, accuracy = plotting.series(records, 'eval_avg_at_k')
    out['avg_at_k'] = float(accuracy[-1]) if len(accuracy) else float('nan')
    out['steps'] = int(steps[-1]) if len(steps) else 0
    return out


def run_one(args, method: str, seed: int) -> dict:
    """Trains (or resumes, or skips) one run; returns its summary."""
    from tropd_jax import train

    workdir = os.path.join(args.workdir, method, f'seed_{seed}')
    summary_path = os.path.join(workdir, 'summary.json')
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    start = time.time()
    train.train_and_evaluate(run_config(args, method, seed), workdir)
    summary = {
        'method': method,
        'seed': seed,
        'wall_seconds': time.time() - start,
        **summarize(plotting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))),
    }
    if not np.isfinite(summary['avg_at_k']):
        # Killed between the last checkpoint and the final evaluation: the resumed trainer has no step left to run.
        print(f'warning: {workdir} has no final evaluation; delete it and rerun to redo this run', flush=True)
    with open(summary_path, 'w') as f:
        json.dump(summary, f, indent=1)
    print(
        f'{method} seed {seed}: avg@{args.eval_samples} {summary["avg_at_k"]:.3f}, '
        f'grad norm {summary["final_grad_norm"]:.3g}, entropy {summary["final_student_entropy"]:.3f} '
        f'({summary["wall_seconds"]:.0f} s)',
        flush=True,
    )
    return summary


def baselines(args) -> dict:
    """avg@k of the initial student and of the teacher on the same held-out problems (cached)."""
    import jax

    from tropd_jax import evaluate
    from tropd_jax.models import from_pretrained, load_tokenizer

    path = os.path.join(args.workdir, 'baselines.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    config = run_config(args, 'tropd', 0)
    tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.student_path)
    records = evaluate.config_records(config)
    max_new = config.eval.max_new_tokens if config.eval.max_new_tokens > 0 else config.rollout.max_new_tokens
    out = {}
    for name in ('student', 'teacher'):
        model, _ = from_pretrained(getattr(config.model, f'{name}_path'))
        result = evaluate.evaluate(
            model,
            tokenizer,
            records,
            samples=args.eval_samples,
            key=jax.random.key(0),
            max_new_tokens=max_new,
            batch_size=config.eval.batch_size,
            temperature=config.eval.temperature,
        )
        out[name] = result['avg_at_k']
    os.makedirs(args.workdir, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(out, f)
    return out


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


def claims(by_method: dict[str, list[dict]], base: dict) -> list[str]:
    """The paper's claims, each checked against the study's numbers, as Markdown bullet points."""

    def mean(method, key):
        return _stat([s[key] for s in by_method.get(method, [])])

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

    lines = [
        compare('tropd', 'opd', 'avg_at_k', True, 'TrOPD above OPD (held-out avg@k)'),
        compare('tropd', 'opd', 'mean_grad_norm', False, 'Lower gradient norm than OPD (mean over training)'),
        compare('tropd', 'clip_outlier', 'mean_grad_norm', False, 'Lower gradient norm than Clip Outlier'),
        compare('tropd', 'opd', 'final_student_entropy', True, 'Higher entropy than OPD (end of training)'),
        compare('tropd', 'clip_outlier', 'final_student_entropy', True, 'Higher entropy than Clip Outlier'),
        compare(
            'tropd', 'fkl_outlier', 'avg_at_k', True, 'Off-policy guidance helps (TrOPD = FKL Outlier + teacher prefix)'
        ),
    ]
    fkl, _ = mean('topk_fkl', 'avg_at_k')
    if np.isfinite(fkl) and 'student' in base:
        collapsed = fkl < base['student']
        lines.append(
            f"Top-k FKL alone collapses: topk_fkl ends at avg@k {fkl:.3g} against the initial student's "
            f'{base["student"]:.3g}: {"**held** (below the starting point)" if collapsed else "**did not hold**"}.'
        )
    return [f'- {line}' for line in lines if line]


def write_report(args, summaries: list[dict], base: dict) -> None:
    by_method: dict[str, list[dict]] = {}
    for s in summaries:
        by_method.setdefault(s['method'], []).append(s)
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    runs = {
        m: [os.path.join(args.workdir, m, f'seed_{s["seed"]}', 'metrics.jsonl') for s in group]
        for m, group in by_method.items()
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
        metrics=('student_entropy', 'grad_norm', 'trust_fraction'),
    )
    _accuracy_figure(by_method, base, str(figures / 'accuracy.png'), args.eval_samples)

    k = args.eval_samples
    total = sum(s.get('wall_seconds', 0.0) for s in summaries)
    doc = pathlib.Path(args.doc)
    rel = os.path.relpath(figures, doc.parent)
    lines = [
        '# Results on the tiny task',
        '',
        f'Written on {time.strftime("%Y-%m-%d", time.gmtime())} (UTC) by '
        f'`{" ".join(["python benchmarks/reproduce.py", *args.argv])}`; rerun it to refresh. Every method',
        f'of [methods.md](methods.md) trained from the shipped tiny student with the shipped tiny teacher '
        f'(`{_shown_path(args.config)}`), {args.steps} steps each, seeds '
        f'{sorted({s["seed"] for s in summaries})}; held-out avg@{k} on {args.eval_problems or "all"} evaluation '
        f'problems. Wall time: {total / 60:.0f} min in total on {os.cpu_count()} CPU cores'
        f' ({_backend()} backend).',
        '',
        f'Before training: student avg@{k} = {base.get("student", float("nan")):.3f}, '
        f'teacher avg@{k} = {base.get("teacher", float("nan")):.3f}.',
        '',
        *([f'Overrides of every run: `{" ".join(f"{k}={v}" for k, v in args.set.items())}`.', ''] if args.set else []),
        'Numbers are mean ± standard deviation over seeds. "End" = the mean over the last 20% of steps; the',
        'gradient norm is the global norm before clipping. Trust fraction = mean M_t on on-policy tokens over training',
        "(1 for methods without a trust region). Entropies are over the student's own (on-policy) tokens; the prefix",
        'column is over teacher-written prefix tokens (– where a method has none). |log ρ| = |log π_sampler − log',
        'π_learner| on on-policy tokens, the per-step mean and max averaged over training (one update per batch: ρ',
        'should be 1).',
        '',
        f'| method | seeds | avg@{k} | grad norm (end) | grad norm (max) | student entropy, on-policy (end) '
        '| student entropy, prefix (mean) | trust fraction | \\|log ρ\\| mean | \\|log ρ\\| max |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for method in [m for m in losses.METHODS if m in by_method]:
        group = by_method[method]
        lines.append(
            f'| `{method}` | {len(group)} | {_fmt([s["avg_at_k"] for s in group])} '
            f'| {_fmt([s["final_grad_norm"] for s in group], 4)} | {_fmt([s["max_grad_norm"] for s in group], 4)} '
            f'| {_fmt([s["final_student_entropy"] for s in group])} '
            f'| {_fmt([s.get("mean_prefix_student_entropy", np.nan) for s in group])} '
            f'| {_fmt([s["mean_trust_fraction"] for s in group])} '
            f'| {_fmt([s.get("mean_logprob_mismatch", np.nan) for s in group], 1, "e")} '
            f'| {_fmt([s.get("mean_logprob_mismatch_max", np.nan) for s in group], 1, "e")} |'
        )
    lines += [
        '',
        "## The paper's claims, here",
        '',
        *claims(by_method, base),
        '',
        '"Within seed spread" means the two means differ by less than the sum of their standard deviations.',
        '',
        '## Figures',
        '',
        f'![entropy and gradient norm]({rel}/figure3.png)',
        '',
        f'![accuracy per method]({rel}/accuracy.png)',
        '',
        f'![every method]({rel}/all_methods.png)',
        '',
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text('\n'.join(lines))
    print(f'wrote {doc} and {figures}/*.png')


def _accuracy_figure(by_method, base, path, k) -> None:
    from matplotlib.figure import Figure

    methods = [m for m in losses.METHODS if m in by_method]
    fig = Figure(figsize=(max(5.0, 0.6 * len(methods) + 2), 3.6), layout='constrained')
    ax = fig.subplots()
    for i, m in enumerate(methods):
        values = [s['avg_at_k'] for s in by_method[m]]
        mean, std = _stat(values)
        ax.bar(i, mean, yerr=std, color='tab:green' if m.startswith('tropd') else 'tab:blue', alpha=0.8, capsize=3)
        ax.plot([i] * len(values), values, 'k.', ms=4)
    for name, style in (('student', '--'), ('teacher', ':')):
        if name in base:
            ax.axhline(base[name], color='k', ls=style, lw=1, label=f'{name} before training')
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha='right', fontsize=8)
    ax.set_ylabel(f'held-out avg@{k}')
    ax.set_ylim(bottom=0.0)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', default=str(ROOT / 'runs' / 'reproduce'))
    parser.add_argument('--config', default=str(ROOT / 'configs' / 'tiny.py'))
    parser.add_argument('--methods', nargs='+', default=list(losses.METHODS), choices=losses.METHODS)
    parser.add_argument('--seeds', type=int, default=3)
    # 14 methods x 3 seeds x 60 steps of configs/tiny.py (64 prompts each): about an hour on 2 CPU cores (a run is
    # ~0.8 s per step + ~15 s of evaluation; later runs reuse XLA's persistent cache for most compilation).
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--eval_samples', type=int, default=8, help='k of avg@k')
    parser.add_argument('--eval_problems', type=int, default=256, help='held-out problems (0 = all)')
    parser.add_argument('--doc', default=str(ROOT / 'docs' / 'results.md'))
    parser.add_argument('--figures', default=str(ROOT / 'docs' / 'figures'))
    parser.add_argument('--report_only', action='store_true', help='only rebuild the report from finished runs')
    parser.add_argument(
        '--set',
        nargs='*',
        default=[],
        metavar='NAME=VALUE',
        help='config overrides for every run, e.g. optim.learning_rate=1.5e-3 (another regime: '
        'give it its own --workdir)',
    )
    args = parser.parse_args(argv)
    args.set = dict(_parse_override(item) for item in args.set)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seeds < 1 or args.steps < 1:
        raise SystemExit(f'--seeds={args.seeds} and --steps={args.steps} must be >= 1')

    if not args.report_only:
        import jax

        # Every run compiles the same sampler and nearly the same train step: XLA's persistent cache makes the
        # second and later runs (and a resumed study) skip most compilation.
        jax.config.update('jax_compilation_cache_dir', os.path.join(args.workdir, 'jax_cache'))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    base = baselines(args) if not args.report_only else _read_json(os.path.join(args.workdir, 'baselines.json'))
    summaries = []
    for seed in range(args.seeds):  # seed-major: an interrupted study still has every method at the lower seeds
        for method in args.methods:
            path = os.path.join(args.workdir, method, f'seed_{seed}', 'summary.json')
            if args.report_only:
                if os.path.exists(path):
                    summaries.append(_read_json(path))
            else:
                summaries.append(run_one(args, method, seed))
    if not summaries:
        raise SystemExit(f'no finished runs under {args.workdir}')
    write_report(args, summaries, base)


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


def _backend() -> str:
    import jax

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
