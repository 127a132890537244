"""benchmarks/vs_trl.py without TRL: its arguments, the figures it derives from step timings, the JSON line's schema,
and that every override it gives our trainer is a config field of the right type."""

import importlib.util
import pathlib

import pytest

from tropd_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('vs_trl', ROOT / 'benchmarks' / 'vs_trl.py')
vs_trl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_trl)


def test_defaults_and_bad_arguments():
    args = vs_trl.parse_args([])
    assert (args.loss, args.steps, args.prompts, args.max_new_tokens, args.runs) == ('jsd', 20, 64, 64, 3)
    assert args.torch_threads == 2 and args.eval_samples == 8 and args.side == 'both'
    for bad in (['--steps=1'], ['--prompts=0'], ['--learning_rate=0'], ['--loss=fkl'], ['--runs=0']):
        with pytest.raises(SystemExit):
            vs_trl.parse_args(bad)


def test_step_figures_leave_out_the_first_step():
    steps = [
        {'step_s': 10.0, 'rollout_s': 8.0, 'teacher_s': 0.5, 'tokens': 100},  # compiles
        {'step_s': 2.0, 'rollout_s': 1.0, 'teacher_s': 0.2, 'tokens': 100},
        {'step_s': 4.0, 'rollout_s': 1.0, 'teacher_s': 0.4, 'tokens': 120},
        {'step_s': 3.0, 'rollout_s': 2.0, 'teacher_s': 0.3, 'tokens': 90},
    ]
    f = vs_trl.step_figures(steps)
    assert f['step_s'] == 3.0 and f['rollout_s'] == 1.0 and f['teacher_s'] == 0.3
    assert f['train_s'] == 1.0  # median of 1, 3, 1
    assert f['gen_tokens_per_s'] == 100.0  # median of 100, 120, 45
    assert f['train_tokens_per_s'] == 30.0  # median of 50, 30, 30
    assert f['first_step_extra_s'] == 7.0
    assert 'teacher_s' not in vs_trl.step_figures([{k: v for k, v in s.items() if k != 'teacher_s'} for s in steps])


def test_summary_schema_and_ratios():
    args = vs_trl.parse_args(['--runs=3'])
    side = lambda step, tokens_per_s: {
        'step_s': step,
        'rollout_s': step / 2,
        'train_s': step / 2,
        'gen_tokens_per_s': 2 * tokens_per_s,
        'train_tokens_per_s': tokens_per_s,
        'avg_at_8': 0.25,
    }
    runs = [
        {'seed': i, 'first': 'trl', 'trl': side(trl, 100 / trl), 'ours': side(ours, 100 / ours)}
        for i, (trl, ours) in enumerate([(30.0, 2.0), (20.0, 2.0), (40.0, 2.5)])
    ]
    out = vs_trl.summarize(runs, args, {'trl_version': '1.16.0'})
    for key in (
        'trl_step_s',
        'ours_step_s',
        'ratio',
        'ratio_tokens_per_s',
        'trl_gen_tokens_per_s',
        'ours_train_tokens_per_s',
        'trl_avg_at_8',
        'ours_avg_at_8',
        'runs',
        'setting',
        'trl_version',
    ):
        assert key in out, key
    assert out['trl_step_s'] == 30.0 and out['ours_step_s'] == 2.0
    assert out['ratio'] == 15.0  # the median of the per-run ratios 15, 10, 16
    assert out['ratio_tokens_per_s'] == 15.0
    assert len(out['runs']) == 3 and out['runs'][1]['trl_step_s'] == 20.0


@pytest.mark.parametrize('loss', sorted(vs_trl.LOSSES))
def test_our_overrides_are_config_fields_and_validate(loss):
    args = vs_trl.parse_args([f'--loss={loss}'])
    config = config_lib.default_config()
    for override in vs_trl.our_overrides(args, seed=1, vocab=105):
        path, value = override.removeprefix('--config.').split('=', 1)
        section, name = path.split('.')
        assert name in config[section], override
        default = config[section][name]
        parsed = {'True': True, 'False': False}.get(value, value)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            parsed = type(default)(float(value)) if isinstance(default, float) else int(value)
        config[section][name] = parsed
    config.model.student_path = str(ROOT / 'tropd_jax' / 'assets' / 'tiny' / 'student')
    config.model.teacher_path = str(ROOT / 'tropd_jax' / 'assets' / 'tiny' / 'teacher')
    config.data.train_path = str(ROOT / 'tropd_jax' / 'assets' / 'tiny' / 'data' / 'train.jsonl')
    config_lib.validate_config(config, num_devices=1)
    assert config.loss.method == vs_trl.LOSSES[loss][0] and config.prefix.enabled is False
