"""The packed train step (`train.packing`) against the unpacked one and against a full-batch reference.

Rollouts of very unequal lengths (one fills the budget, one has no response token, one is all teacher prefix) in
micro-batches of 2 rows: unpacked, 4 micro-batches of one rollout per row; packed, fewer rows holding up to four
rollouts each, so the micro-batches hold different rollouts and different token counts. The loss, its gradient and
every metric must agree, with the trust region's random draws (`tropd`) and with the seq-mean aggregation.
"""

import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import losses, metrics, packing, sampling, train
from tropd_jax import rollouts as rollouts_lib
from tropd_jax import step as step_lib
from tropd_jax.models import ModelConfig, init_decoder

P, N = 6, 10  # prompt bucket and response budget of the unpacked rollouts
PROMPT_LENGTHS = [6, 2, 4, 1, 5, 3, 6, 2]
RESPONSE_LENGTHS = [10, 0, 3, 7, 1, 9, 5, 2]  # row 0 fills the budget; row 1 has no response token
PREFIX_LENGTHS = [3, 0, 1, 0, 0, 9, 2, 0]  # row 5 is all teacher prefix (no on-policy token)
MICRO = 2
VOCAB = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(
    architecture='qwen3',
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
    tie_word_embeddings=True,
    attention='naive',
)
ALLCLOSE = dict(rtol=2e-5, atol=1e-6)
# Per-batch by construction: what packing is meant to change.
PACKING_METRICS = ('padding_fraction',)


def rollouts(seed=0) -> dict:
    """`[R, P + N]` rollout arrays as `sampling.rollout` returns them, and the `[R]` finish reasons."""
    rng = np.random.default_rng(seed)
    r = len(PROMPT_LENGTHS)
    tokens = np.zeros((r, P + N), np.int32)
    input_mask, response_mask, prefix_mask = (np.zeros((r, P + N), np.int32) for _ in range(3))
    for row, (prompt, response, prefix) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, PREFIX_LENGTHS)):
        tokens[row, P - prompt : P + response] = rng.integers(1, VOCAB - 3, prompt + response)  # the shared vocabulary
        input_mask[row, P - prompt : P + response] = 1
        response_mask[row, P : P + response] = 1
        prefix_mask[row, P : P + prefix] = 1
    logprobs = (-rng.uniform(0.5, 4.0, size=(r, P + N)) * response_mask).astype(np.float32)
    finish_reason = np.where(np.asarray(RESPONSE_LENGTHS) == N, sampling.FINISH_LENGTH, sampling.FINISH_EOS).astype(
        np.int32
    )
    return dict(
        tokens=tokens,
        input_mask=input_mask,
        response_mask=response_mask,
        prefix_mask=prefix_mask,
        logprobs=logprobs,
        finish_reason=finish_reason,
    )


def model(seed):
    """A random decoder with large weights, so that student and teacher disagree (P_t spread over (0, 1])."""
    decoder = init_decoder(CONFIG, seed=seed)
    state = nnx.state(decoder, nnx.Param)
    nnx.update(decoder, jax.tree.map(lambda x: x if x.ndim == 1 else x * 8.0, state))
    return nnx.split(decoder)


@pytest.fixture(scope='module')
def models():
    return model(0), model(1)


def settings(method, aggregation, fused, packed):
    hp = dict(losses.DEFAULT_HYPERPARAMETERS, k=8, aggregation=aggregation, beta=0.5)
    optimizer = step_lib.OptimizerSettings(
        learning_rate=1e-3,
        schedule='constant',
        warmup_steps=0,
        total_steps=10,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=0.0,
    )
    return step_lib.StepSettings(
        method=method,
        hyperparameters=tuple(sorted(hp.items())),
        vocab_size=VOCAB - 3,
        prompt_length=1 if packed else P,
        micro_batch_size=MICRO,
        importance_ratio=True,
        fused=fused,
        chunk_size=7,
        optimizer=optimizer,
        packed=packed,
    )


def packed_batch(arrays, buckets=0):
    return rollouts_lib.pack_rollouts(types.SimpleNamespace(**arrays), MICRO, buckets)


def reference_loss(params, student_graphdef, teacher_graphdef, teacher_state, arrays, method, aggregation, key):
    """The loss of the whole unpacked batch at once (no micro-batches) on full logits, its draws keyed as the step's
    are: by rollout index and position."""
    hp = dict(losses.DEFAULT_HYPERPARAMETERS, k=8, aggregation=aggregation, beta=0.5)
    inputs, mask = arrays['tokens'][:, :-1], arrays['input_mask'][:, :-1]
    positions = jnp.maximum(jnp.cumsum(arrays['input_mask'], axis=1) - 1, 0)
    logits = lambda graphdef, state: nnx.merge(graphdef, state)(inputs, positions[:, :-1], mask)[0][:, P - 1 :]
    rollout_ids = jnp.broadcast_to(jnp.arange(len(inputs))[:, None], (len(inputs), N))
    return losses.distillation_loss(
        method,
        logits(student_graphdef, params),
        logits(teacher_graphdef, teacher_state),
        arrays['tokens'][:, P:],
        arrays['response_mask'][:, P:],
        arrays['prefix_mask'][:, P:],
        key,
        rollout_logprobs=arrays['logprobs'][:, P:],
        vocab_size=VOCAB - 3,
        draw_ids=(rollout_ids, positions[:, P:]),
        **hp,
    )


def test_pack_rollouts_layout():
    arrays = rollouts()
    packed = packed_batch(arrays)
    rows = packed['tokens'].shape[0]
    assert rows % MICRO == 0 and rows < len(PROMPT_LENGTHS)
    assert set(packed) == set(step_lib.BATCH_KEYS + step_lib.PACKED_KEYS)
    np.testing.assert_array_equal(packed['finish_reason'], arrays['finish_reason'])
    # Every rollout's tokens, in order, under its own rollout id, its positions counting from 0.
    for r, (prompt, response) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)):
        where = (packed['rollout_ids'] == r) & (packed['segment_ids'] > 0)
        assert where.sum() == prompt + response
        np.testing.assert_array_equal(packed['tokens'][where], arrays['tokens'][r, P - prompt : P + response])
        np.testing.assert_array_equal(packed['positions'][where], np.arange(prompt + response))
    # The micro-batches (rows i * n + j) hold different numbers of response tokens, packed and not.
    for batch in (packed, arrays):
        n = batch['tokens'].shape[0] // MICRO
        per_micro = batch['response_mask'].reshape(MICRO, n, -1).sum(axis=(0, 2))
        assert len(set(per_micro.tolist())) > 1, per_micro


def test_bucket_rows_bounds_the_compiled_shapes():
    assert [packing.bucket_rows(r, 16, 4, 512) for r in (1, 16, 17, 33, 49, 65, 81, 97, 113, 129)] == [
        16,
        16,
        32,
        48,
        64,
        80,
        96,
        112,
        128,
        160,
    ]
    assert packing.bucket_rows(500, 16, 4, 512) == 512 and packing.bucket_rows(130, 16, 0, 512) == 144
    shapes = {packing.bucket_rows(r, 16, 4, 512) for r in range(1, 513)}
    assert len(shapes) <= 4 * 5 + 2  # per_doubling * log2(512 / 16) + 2
    for r in range(1, 513):
        needed = -(-r // 16) * 16
        assert needed <= packing.bucket_rows(r, 16, 4, 512) <= needed * 2**0.25 + 16


@pytest.mark.parametrize(
    'method, aggregation, fused',
    [
        ('opd', 'token_mean', True),
        pytest.param('tropd', 'token_mean', False, marks=pytest.mark.slow),
        pytest.param('tropd', 'seq_mean_token_mean', True, marks=pytest.mark.slow),
        pytest.param('opd', 'seq_mean_token_mean', False, marks=pytest.mark.slow),
    ],
)
def test_packed_step_equals_unpacked_step(models, method, aggregation, fused):
    (student_graphdef, params), teacher = models
    key = jax.random.key(7)
    arrays = rollouts()
    batches = {
        False: {k: jnp.asarray(v) for k, v in arrays.items()},
        True: {k: jnp.asarray(v) for k, v in packed_batch(arrays).items()},
    }
    grads_fn = jax.jit(
        step_lib.accumulate_gradients, static_argnames=('student_graphdef', 'teacher_graphdef', 'settings')
    )
    step_fn = jax.jit(step_lib.train_step, static_argnums=(5, 6, 7))
    opt_state = step_lib.make_optimizer(settings(method, aggregation, fused, False).optimizer).init(params)
    grads, metrics = {}, {}
    for packed, batch in batches.items():
        s = settings(method, aggregation, fused, packed)
        grads[packed], _ = grads_fn(
            params, teacher[1], batch, key, student_graphdef=student_graphdef, teacher_graphdef=teacher[0], settings=s
        )
        _, _, metrics[packed] = step_fn(params, opt_state, teacher[1], batch, key, student_graphdef, teacher[0], s)
    metrics = jax.device_get(metrics)

    # The loss of the whole batch at once, and its metrics.
    (loss, reference_metrics), reference_grads = jax.jit(
        jax.value_and_grad(reference_loss, has_aux=True), static_argnums=(1, 2, 5, 6)
    )(params, student_graphdef, *teacher, arrays, method, aggregation, key)
    if method == 'tropd':  # the trust region's draws matter here: some tokens are in it, some are not
        trust_fraction = losses.metric_values(reference_metrics)['trust_fraction']
        assert 0.1 < trust_fraction < 0.9, trust_fraction
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference_grads))
    for packed in (False, True):
        np.testing.assert_allclose(metrics[packed]['loss'], loss, **ALLCLOSE, err_msg=f'packed={packed}')
        for name, value in losses.metric_values(reference_metrics).items():
            np.testing.assert_allclose(metrics[packed][name], value, **ALLCLOSE, err_msg=f'packed={packed} {name}')
        for got, want in zip(jax.tree.leaves(grads[packed]), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f'packed={packed}')

    # Per-rollout metrics of the step, from the rollouts themselves.
    lengths, prefixes = np.asarray(RESPONSE_LENGTHS), np.minimum(PREFIX_LENGTHS, RESPONSE_LENGTHS)
    expected = dict(
        response_length=lengths.mean(),
        prefix_length=prefixes.mean(),
        response_tokens=lengths.sum(),
        num_tokens=lengths.sum(),
        truncated_fraction=1 / len(lengths),
    )
    for packed in (False, True):
        for name, value in expected.items():
            np.testing.assert_allclose(metrics[packed][name], value, rtol=1e-6, err_msg=f'packed={packed} {name}')
    assert set(metrics[True]) == set(metrics[False])
    for name in metrics[False]:
        if name not in PACKING_METRICS:
            np.testing.assert_allclose(metrics[True][name], metrics[False][name], **ALLCLOSE, err_msg=name)
    real = sum(PROMPT_LENGTHS) + sum(RESPONSE_LENGTHS)
    packed_rows = batches[True]['tokens'].shape[0]
    np.testing.assert_allclose(metrics[False]['padding_fraction'], 1 - real / (len(lengths) * (P + N)), rtol=1e-6)
    np.testing.assert_allclose(metrics[True]['padding_fraction'], 1 - real / (packed_rows * (P + N)), rtol=1e-6)


def test_trust_draws_do_not_depend_on_where_a_token_sits():
    key = jax.random.key(3)
    rollout = jnp.array([[0, 0, 1], [1, 2, 2]])
    position = jnp.array([[4, 5, 4], [5, 0, 1]])
    u = losses.keyed_uniforms(key, rollout, position)
    assert u.shape == (2, 3) and bool(jnp.all((u >= 0) & (u < 1)))
    assert len(set(np.asarray(u).ravel().tolist())) == 6  # six different (rollout, position) pairs
    np.testing.assert_array_equal(losses.keyed_uniforms(key, rollout[::-1, ::-1], position[::-1, ::-1]), u[::-1, ::-1])
    assert losses.keyed_uniforms(key, jnp.array([[1]]), jnp.array([[5]]))[0, 0] == u[1, 0]


@pytest.mark.slow
def test_tiny_config_packed_and_unpacked_runs_log_the_same_curve(tmp_path):
    """configs/tiny.py (the shipped pair, whose responses stop at their EOS) for 3 steps of 16 prompts in
    micro-batches of 4 rows: unpacked, 4 micro-batches; packed, about 2 rollouts per row. Same metrics.jsonl."""
    spec = importlib.util.spec_from_file_location('recipe_tiny', os.path.join(ROOT, 'configs', 'tiny.py'))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    curves = {}
    for packed in (False, True):
        config = tiny.get_config()
        with config.unlocked():
            config.train.steps, config.train.prompts_per_step, config.train.micro_batch_size = 3, 16, 4
            config.train.packing = packed
            # TrOPD with the fused loss: teacher prefixes and the trust region in packed rows (the demo runs the JSD).
            config.loss.method, config.loss.fused = 'tropd', True
            config.eval.path = ''
            config.checkpoint.export_hf_at_end = False
            config.log.progress_bar = False
            config.log.tensorboard = False
        workdir = str(tmp_path / str(packed))
        train.train_and_evaluate(config, workdir)
        curves[packed] = [r for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in r]
    assert [r['step'] for r in curves[True]] == [r['step'] for r in curves[False]] == [1, 2, 3]
    for got, want in zip(curves[True], curves[False]):
        assert set(got) == set(want)
        assert got['padding_fraction'] < 0.6 * want['padding_fraction'], (
            got['padding_fraction'],
            want['padding_fraction'],
        )
        for name in (
            'response_length',
            'prefix_length',
            'max_prefix_length',
            'num_tokens',
            'response_tokens',
            'truncated_fraction',
        ):
            assert got[name] == want[name], name  # the same rollouts
        for name in set(got) - {'step', 'padding_fraction', 'rollout_time', 'train_time', 'tokens_per_second'}:
            # The sampler-vs-learner mismatch is itself float32 rounding (~1e-6): an absolute bound.
            tolerance = dict(rtol=0, atol=1e-5) if name.startswith('logprob_mismatch') else dict(rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(got[name], want[name], **tolerance, err_msg=f'{got["step"]} {name}')
