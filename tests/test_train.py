"""Tests for the trainer (tropd_jax/train.py) on a tiny random teacher / student pair.

Every run shares one config shape, so the compiled rollout and train step are reused (a persistent compilation
cache in a temporary directory carries them across runs and subprocesses). Runs are 3 steps of 4 prompts x 2
rollouts x 8 new tokens.
"""

import io
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from tropd_jax import config as config_lib
from tropd_jax import data, losses, metrics, rollouts, sampling, schedules, sharding, train
from tropd_jax import step as step_lib
from tropd_jax.models import Decoder, ModelConfig, from_pretrained, load_tokenizer, save_pretrained
from tropd_jax.placement import Placement
from tropd_jax.tasks import arithmetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TIMING = ('rollout_time', 'train_time', 'tokens_per_second')
# The metrics SPEC.md requires every step, plus the trainer's own.
SPEC_METRICS = (
    'loss',
    'pg_loss',
    'fkl_loss',
    'prefix_loss',
    'trust_fraction',
    'trust_probability',
    'reward',
    'outlier_fraction',
    'student_entropy',
    'teacher_entropy',
    'prefix_fraction',
    'max_prefix_length',
    'grad_norm',
    'update_norm',
    'response_length',
    'learning_rate',
)
TRAINER_METRICS = (
    'skipped',
    'skipped_steps',
    'rollout_time',
    'train_time',
    'tokens_per_second',
    'prefix_length',
    'truncated_fraction',
    'num_tokens',
    'prefix_student_entropy',
    'prefix_teacher_entropy',
    'logprob_mismatch',
    'logprob_mismatch_max',
    'teacher_topk_mass',
    'student_topk_mass',
    'ratio_truncated_fraction',
)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny pair, its data, and a config.


def make_tiny_pair(root: str) -> dict:
    """Random 1-layer Qwen3 student / teacher sharing the arithmetic character tokenizer, and 24 prompts.

    Both heads have 3 padding rows beyond the tokenizer's vocabulary, as real Qwen checkpoints do.
    """
    tokenizer = arithmetic.build_tokenizer()
    vocab = len(tokenizer) + 3
    paths = {}
    for name, seed, hidden in (('student', 0, 32), ('teacher', 1, 48)):
        config = ModelConfig(
            architecture='qwen3',
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            qk_norm=True,
            tie_word_embeddings=name == 'student',
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model = Decoder(config, rngs=nnx.Rngs(seed))
        # Larger weights than the default init, so the two models disagree and the losses are not all ~0.
        state = nnx.state(model, nnx.Param)
        scaled = jax.tree.map(lambda x: x if x.ndim == 1 else x * 25.0, state)
        nnx.update(model, scaled)
        paths[name] = os.path.join(root, name)
        save_pretrained(model, paths[name], tokenizer)
    rng = np.random.default_rng(0)
    paths['train'] = os.path.join(root, 'train.jsonl')
    with open(paths['train'], 'w') as f:
        for _ in range(24):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({'problem': f'{a}+{b}', 'answer': str(a + b)}) + '\n')
    return paths


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs (and its subprocesses); removed afterwards."""
    directory = str(tmp_path_factory.mktemp('compile_cache'))
    jax.config.update('jax_compilation_cache_dir', directory)
    yield directory
    jax.config.update('jax_compilation_cache_dir', None)
    compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return make_tiny_pair(str(tmp_path_factory.mktemp('pair')))


def make_config(pair, **overrides):
    c = config_lib.default_config()
    c.model.student_path, c.model.teacher_path = pair['student'], pair['teacher']
    c.data.train_path = pair['train']
    c.data.max_prompt_length = 16
    c.rollout.num_rollouts = 2
    c.rollout.max_new_tokens = 8
    c.loss.method = 'tropd'
    c.loss.k = 8
    c.optim.learning_rate = 1e-2
    c.train.steps = STEPS
    c.train.prompts_per_step = 4
    c.train.micro_batch_size = 4
    c.checkpoint.every_steps = 1
    c.log.progress_bar = False
    for name, value in overrides.items():
        section, field = name.split('__')
        c[section][field] = value
    return c


def run_args(pair, workdir, **overrides):
    """The same config as `make_config`, as `tropd_jax.main` flags."""
    config = make_config(pair, **overrides)
    flags = [f'--workdir={workdir}', f'--config={os.path.join(ROOT, "configs", "tiny.py")}']
    for section in config.keys():
        for field, value in config[section].items():
            if value is not None and not isinstance(value, dict):
                flags.append(f'--config.{section}.{field}={value}')
    return flags


@pytest.fixture(scope='module')
def reference_run(pair, compile_cache, tmp_path_factory):
    """An uninterrupted 3-step run on one device; returns its workdir."""
    if jax.device_count() != 1:
        pytest.skip('the reference run needs a single-device process')
    workdir = str(tmp_path_factory.mktemp('reference'))
    train.train_and_evaluate(make_config(pair), workdir)
    return workdir


def curve(workdir):
    return [
        {k: v for k, v in row.items() if k not in TIMING}
        for row in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
        if 'loss' in row
    ]


def params_of(path):
    model, _ = from_pretrained(path)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and metric writers.


@pytest.mark.parametrize('total, length', [(200, 8096), (3, 8), (7, 100)])
def test_cosine_prefix_schedule(total, length):
    for step in range(total + 1):
        expected = math.floor(length * 0.5 * (1 + math.cos(math.pi * step / total)) + 1e-9)
        assert schedules.max_prefix_length(step, total, length) == expected
    assert schedules.max_prefix_length(0, total, length) == length
    assert schedules.max_prefix_length(total, total, length) == 0
    assert schedules.max_prefix_length(total // 2, total, length, 'constant') == length


def test_prefix_lengths_are_uniform_up_to_the_maximum():
    draws = np.asarray(schedules.sample_prefix_lengths(jax.random.key(0), 5, 60_000))
    assert draws.min() == 0 and draws.max() == 5
    np.testing.assert_allclose(np.bincount(draws) / draws.size, np.full(6, 1 / 6), atol=0.01)
    assert not np.asarray(schedules.sample_prefix_lengths(jax.random.key(0), 0, 10)).any()


def test_learning_rate_schedules():
    constant = schedules.learning_rate_schedule(5e-6, 200)
    assert all(float(constant(s)) == pytest.approx(5e-6) for s in (0, 100, 199))
    warm = schedules.learning_rate_schedule(1.0, 10, schedule='cosine', warmup_steps=2)
    assert float(warm(0)) == 0.0 and float(warm(1)) == pytest.approx(0.5) and float(warm(2)) == pytest.approx(1.0)
    assert float(warm(6)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write(1, {'loss': np.float32(0.5), 'note': 'x', 'bad': float('nan')})
    writer.write(2, {'loss': 0.25})
    writer.write(1, {'eval_avg_at_k': 0.75})  # joins step 1
    writer.close()
    rows = metrics.read_metrics(str(tmp_path / 'metrics.jsonl'))
    assert rows == [
        {'step': 1, 'loss': 0.5, 'note': 'x', 'bad': 'nan', 'eval_avg_at_k': 0.75},
        {'step': 2, 'loss': 0.25},
    ]
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
    stream = io.StringIO()
    bar = metrics.ProgressBar(10, 2, file=stream)
    bar.update({'loss': 0.5, 'rollout_time': 1.25, 'train_time': 0.5, 'tokens_per_second': 1234.0})
    bar.write('during')
    bar.close()
    bar.write('after')  # e.g. the final evaluation
    shown = stream.getvalue()
    assert 'during' in shown and shown.rstrip().endswith('after')
    assert '3/10' in shown and 'rollout=1.2' in shown and 'train=0.5' in shown and 'tok/s=1234' in shown
    silent = metrics.MetricsWriter(str(tmp_path / 'other'), enabled=False)
    silent.write(1, {'loss': 1.0})
    assert not os.path.exists(tmp_path / 'other')


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs.


@pytest.mark.slow
def test_run_logs_every_metric_and_exports_the_student(reference_run, pair):
    rows = metrics.read_metrics(os.path.join(reference_run, 'metrics.jsonl'))
    assert rows[0]['step'] == 0 and rows[0]['data_records'] == 24 and rows[0]['data_kept'] == 24
    steps = [r for r in rows if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3]
    for row in steps:
        for name in SPEC_METRICS + TRAINER_METRICS:
            assert name in row and math.isfinite(row[name]), (name, row.get(name))
        assert row['learning_rate'] == pytest.approx(1e-2)
        assert 0 <= row['trust_fraction'] <= 1 and 0 < row['trust_probability'] <= 1
        assert 0 <= row['prefix_length'] <= row['max_prefix_length']
        assert row['skipped'] == 0 and row['skipped_steps'] == 0
        # One update per batch: the sampler's log-probs are the learner's up to rounding (float32 on both sides).
        assert 0 <= row['logprob_mismatch'] <= row['logprob_mismatch_max'] < 1e-3, row
    # L_max(step) = 8 * (1 + cos(pi * step / 3)) / 2 for steps 0, 1, 2.
    assert [r['max_prefix_length'] for r in steps] == [8, 6, 2]
    assert steps[0]['prefix_fraction'] > 0
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(reference_run, 'tensorboard')))
    assert sorted(os.listdir(os.path.join(reference_run, 'checkpoints'))) == ['1', '2', '3']
    exported, initial = params_of(os.path.join(reference_run, 'hf')), params_of(pair['student'])
    assert any(not np.array_equal(a, b) for a, b in zip(exported, initial))  # training changed the student
    assert os.path.exists(os.path.join(reference_run, 'hf', 'tokenizer.json'))


def crash_at(monkeypatch, step_index):
    """Makes the run die when it reaches `step_index` (0-based), after the previous step's checkpoint."""
    original = rollouts.make_rollouts

    def make_rollouts(*args, **kwargs):
        if args[4] == step_index:
            raise KeyboardInterrupt('simulated kill')
        return original(*args, **kwargs)

    monkeypatch.setattr(train, 'make_rollouts', make_rollouts)


def crashed_run(pair, tmp_path, monkeypatch, *, at_step: int) -> str:
    """A run of `make_config(pair)` in `tmp_path` killed (KeyboardInterrupt) during step `at_step`; its workdir."""
    workdir = str(tmp_path)
    with monkeypatch.context() as m:
        crash_at(m, at_step)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(make_config(pair), workdir)
    return workdir


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(reference_run, pair, tmp_path, monkeypatch):
    workdir = crashed_run(pair, tmp_path, monkeypatch, at_step=2)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
    # Export on request, without training: the student of checkpoint 2.
    assert train.train_and_evaluate(make_config(pair), workdir, export_only=True) == {'step': 2}
    at_step_2 = params_of(os.path.join(workdir, 'hf'))
    assert any(not np.array_equal(a, b) for a, b in zip(at_step_2, params_of(pair['student'])))
    resumed_steps = []
    original = rollouts.make_rollouts
    monkeypatch.setattr(train, 'make_rollouts', lambda *a, **k: resumed_steps.append(a[4]) or original(*a, **k))
    train.train_and_evaluate(make_config(pair), workdir)
    assert resumed_steps == [2]  # only the missing step ran again
    # Same data order, RNG and optimizer moments: metrics and parameters are bit-identical.
    assert curve(workdir) == curve(reference_run)
    for a, b in zip(params_of(os.path.join(workdir, 'hf')), params_of(os.path.join(reference_run, 'hf'))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_reproduces_the_uninterrupted_run(
    reference_run, pair, tmp_path, monkeypatch
):
    # Checkpoints only at the end: the checkpoint of step 2 can only come from the SIGTERM.
    workdir = str(tmp_path)
    original = rollouts.make_rollouts

    def make_rollouts(*args, **kwargs):
        if args[4] == 1:  # during step 2, as a preemption notice arrives at any time
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train, 'make_rollouts', make_rollouts)
        result = train.train_and_evaluate(make_config(pair, checkpoint__every_steps=0), workdir)
    assert result['preempted'] and result['loss'] == curve(reference_run)[1]['loss']
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
    assert not os.path.exists(os.path.join(workdir, 'hf'))  # no export of an unfinished run
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    resumed_steps = []
    monkeypatch.setattr(train, 'make_rollouts', lambda *a, **k: resumed_steps.append(a[4]) or original(*a, **k))
    train.train_and_evaluate(make_config(pair, checkpoint__every_steps=0), workdir)
    assert resumed_steps == [2]
    assert curve(workdir) == curve(reference_run)
    for a, b in zip(params_of(os.path.join(workdir, 'hf')), params_of(os.path.join(reference_run, 'hf'))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupted_latest_checkpoint_falls_back_and_still_matches(reference_run, pair, tmp_path, monkeypatch):
    workdir = crashed_run(pair, tmp_path, monkeypatch, at_step=2)
    # Truncate every data file of the latest checkpoint (a disk that filled up mid-copy).
    for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '2', 'state')):
        for name in files:
            if os.path.basename(root) == 'd':
                path = os.path.join(root, name)
                with open(path, 'r+b') as f:
                    f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(RuntimeWarning, match='checkpoint step 2 .* unreadable .* resuming from .* step 1'):
        train.train_and_evaluate(make_config(pair), workdir)
    assert curve(workdir) == curve(reference_run)
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2.corrupt'))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_counted(pair, compile_cache, tmp_path):
    if jax.device_count() != 1:
        pytest.skip('needs a single-device process')
    teacher, _ = from_pretrained(pair['teacher'])
    teacher.final_norm[...] = jnp.full_like(teacher.final_norm[...], jnp.nan)  # every teacher logit is NaN
    nan_teacher = str(tmp_path / 'nan_teacher')
    save_pretrained(teacher, nan_teacher, arithmetic.build_tokenizer())
    config = make_config(pair)
    config.model.teacher_path = nan_teacher
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    steps = curve(str(tmp_path / 'run'))
    assert [r['skipped'] for r in steps] == [1, 1, 1] and [r['skipped_steps'] for r in steps] == [1, 2, 3]
    assert all(math.isnan(r['loss']) if isinstance(r['loss'], float) else r['loss'] == 'nan' for r in steps)
    # No update was applied: the exported student is the initial one, bit for bit.
    for a, b in zip(params_of(str(tmp_path / 'run' / 'hf')), params_of(pair['student'])):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_mismatch_is_a_clear_error(pair, tmp_path):
    teacher, _ = from_pretrained(pair['teacher'])
    other = arithmetic.build_tokenizer()
    other.add_tokens(['<extra>'])  # one more token: ids no longer agree with the student's tokenizer
    save_pretrained(teacher, str(tmp_path / 'teacher'), other)
    config = make_config(pair)
    config.model.teacher_path = str(tmp_path / 'teacher')
    with pytest.raises(ValueError, match='Teacher and student tokenizers map tokens differently'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))


def _models_and_rollouts(pair, config):
    """The tiny pair on a one-device mesh and 4 prompts' rollouts of step 0 under `config`:
    (mesh, student, teacher, rollout, vocabulary size)."""
    mesh = sharding.make_mesh(1, 1, 1)
    tokenizer = load_tokenizer(pair['student'])
    student, student_config = from_pretrained(pair['student'], mesh=mesh)
    teacher, _ = from_pretrained(pair['teacher'], mesh=mesh)
    prompts, _ = data.load_prompts(pair['train'], tokenizer, max_prompt_length=16)
    with jax.set_mesh(mesh):
        rollout, _ = rollouts.make_rollouts(
            teacher,
            student,
            prompts[:4],
            jax.random.key(3),
            0,
            config,
            Placement(mesh, mesh),
            pad_id=tokenizer.pad_token_id,
            eos=sampling.eos_ids(tokenizer, student_config),
            vocab_size=len(tokenizer),
        )
    return mesh, student, teacher, rollout, len(tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize('fused,method', [(False, 'opd'), (True, 'opd'), (True, 'jsd')])
def test_micro_batches_accumulate_to_the_full_batch_gradient(pair, compile_cache, fused, method):
    """One train step with 2 micro-batches (reference or fused loss) against a from-scratch reference: the
    full-batch loss on full logits (`losses.distillation_loss`, shifted as docs/architecture.md says), its gradient,
    and optax AdamW."""
    if jax.device_count() != 1:
        pytest.skip('needs a single-device process')
    # opd / jsd (exact, fused from both models' hidden states and heads): no random trust mask, so one reference call
    # covers both micro-batches. chunk_size 5 splits every micro-batch's 4 x 8 response tokens into uneven chunks.
    config = make_config(pair, loss__method=method, prefix__enabled=True, loss__fused=fused, loss__chunk_size=5)
    mesh, student, teacher, rollout, vocab = _models_and_rollouts(pair, config)
    batch = {k: np.asarray(getattr(rollout, k)) for k in step_lib.BATCH_KEYS}
    assert batch['prefix_mask'].sum() > 0 and batch['response_mask'].sum() > batch['prefix_mask'].sum()

    student_graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    settings = step_lib.step_settings(config, vocab, rollout.prompt_length)
    assert len(batch['tokens']) // settings.micro_batch_size == 2
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    )

    def reference_loss(params):
        def logits(graphdef, state):
            inputs, mask = batch['tokens'][:, :-1], batch['input_mask'][:, :-1]
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            return nnx.merge(graphdef, state)(inputs, positions, mask)[0]

        hp = config_lib.loss_hyperparameters(config.loss)
        return losses.distillation_loss(
            method,
            logits(student_graphdef, params),
            logits(teacher_graphdef, teacher_state),
            batch['tokens'][:, 1:],
            batch['response_mask'][:, 1:],
            batch['prefix_mask'][:, 1:],
            None,
            rollout_logprobs=batch['logprobs'][:, 1:],
            vocab_size=vocab,
            **hp,
        )

    (ref_loss, ref_metrics), ref_grads = jax.value_and_grad(reference_loss, has_aux=True)(params)
    updates, _ = optimizer.update(ref_grads, optimizer.init(params), params)
    ref_params = optax.apply_updates(params, updates)
    ref_params = [np.asarray(x) for x in jax.tree.leaves(ref_params)]

    initial = [np.asarray(x) for x in jax.tree.leaves(params)]  # the step donates (deletes) its input params
    opt_state = step_lib.make_optimizer(settings.optimizer).init(params)
    step, *_ = step_lib.jit_train_step(
        mesh,
        params,
        jax.eval_shape(lambda: opt_state),
        teacher_state,
        step_lib.BATCH_KEYS,
        settings,
        student_graphdef,
        teacher_graphdef,
    )
    with jax.set_mesh(mesh):
        new_params, _, out = step(params, opt_state, teacher_state, batch, jax.random.key(0), settings)
    out = jax.device_get(out)
    np.testing.assert_allclose(out['loss'], ref_loss, rtol=2e-5)
    np.testing.assert_allclose(out['grad_norm'], optax.tree.norm(ref_grads), rtol=2e-5)
    assert out['grad_norm'] > (1.0 if method == 'opd' else 0.0)  # opd: so clipping was exercised
    np.testing.assert_allclose(out['update_norm'], optax.tree.norm(updates), rtol=1e-3)
    for name, value in losses.metric_values(ref_metrics).items():
        np.testing.assert_allclose(out[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
    # Adam's first step moves each weight by about lr * g / (|g| + eps), which amplifies float32 noise in gradient
    # entries near eps; atol = 5% of the learning rate still catches any wrong direction or scale of an update.
    for got, want, before in zip(jax.tree.leaves(new_params), ref_params, initial):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=5e-4)
        assert not np.array_equal(np.asarray(got), before)


@pytest.mark.slow
@pytest.mark.parametrize('clip_norm', [1.0, 0.0])
def test_logged_learning_rate_is_the_schedule_at_the_step(pair, compile_cache, clip_norm):
    """The `learning_rate` metric of steps 0, 1, 2 is the schedule's value at that step (a warm-up over 2 steps,
    then cosine decay: three different values), with and without gradient clipping in the optimizer's chain."""
    if jax.device_count() != 1:
        pytest.skip('needs a single-device process')
    config = make_config(
        pair, optim__schedule='cosine', optim__warmup_steps=2, optim__clip_norm=clip_norm, train__steps=4
    )
    mesh, student, teacher, rollout, vocab = _models_and_rollouts(pair, config)
    batch = {k: np.asarray(getattr(rollout, k)) for k in step_lib.BATCH_KEYS}
    student_graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    settings = step_lib.step_settings(config, vocab, rollout.prompt_length)
    opt_state = step_lib.make_optimizer(settings.optimizer).init(params)
    step, *_ = step_lib.jit_train_step(
        mesh,
        params,
        jax.eval_shape(lambda: opt_state),
        teacher_state,
        step_lib.BATCH_KEYS,
        settings,
        student_graphdef,
        teacher_graphdef,
    )
    schedule = schedules.learning_rate_schedule(1e-2, 4, schedule='cosine', warmup_steps=2)
    logged = []
    with jax.set_mesh(mesh):
        for i in range(3):
            params, opt_state, out = step(params, opt_state, teacher_state, batch, jax.random.key(i), settings)
            logged.append(float(out['learning_rate']))
    want = [float(schedule(i)) for i in range(3)]
    assert len(set(want)) == 3 and want[1] == pytest.approx(1e-2 / 2)
    np.testing.assert_allclose(logged, want, rtol=1e-6, atol=0)


def run_main(flags, *, env=None, **popen):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
    return subprocess.Popen(
        [sys.executable, '-m', 'tropd_jax.main', *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def assert_same_curve(got, want, rtol=1e-4, atol=1e-5):
    """Loss curves of two runs agree: integers (sampled lengths, prefix lengths) exactly, the rest within
    rtol / atol (float32 reductions are summed in a different order when the batch and weights are split)."""
    assert [r['step'] for r in got] == [r['step'] for r in want]
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for name in ('response_length', 'prefix_length', 'max_prefix_length', 'num_tokens', 'skipped_steps'):
            assert a[name] == b[name], (a['step'], name)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=f'step {a["step"]} {name}')


@pytest.mark.slow
def test_sharded_2x2x2_mesh_matches_one_device(reference_run, pair, compile_cache, tmp_path):
    """8 fake CPU devices as data=2, fsdp=2, tensor=2: the same loss curve as the single-device run, within
    rtol=1e-4 / atol=1e-5 per metric, and the same sampled response and prefix lengths."""
    workdir = str(tmp_path / 'run')
    flags = run_args(pair, workdir, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
    process = run_main(
        flags, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_COMPILATION_CACHE_DIR': compile_cache}
    )
    output, _ = process.communicate()
    errors = [line for line in output.splitlines() if 'Check failed' in line or 'Error' in line]
    assert process.returncode == 0, '\n'.join(errors[:5]) + '\n...\n' + output[-2000:]
    assert_same_curve(curve(workdir), curve(reference_run))
