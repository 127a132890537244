"""The teacher's own prompt template: rendering, the re-aligned rows it scores, and the warning when the two
templates differ and the config does not choose."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tropd_jax import data, placement, sampling, scoring, sharding, train
from tropd_jax import step as step_lib
from tropd_jax.models import from_pretrained, load_tokenizer
from tropd_jax.tasks.arithmetic import tiny_assets

SYSTEM = 'You check arithmetic.'


@pytest.fixture(scope='module')
def tiny():
    assets = tiny_assets()
    tokenizer = load_tokenizer(assets.tokenizer)
    teacher_tokenizer = load_tokenizer(assets.teacher)
    teacher, _ = from_pretrained(assets.teacher)
    student, student_config = from_pretrained(assets.student)
    prompts, _ = data.load_prompts(
        assets.train_data,
        tokenizer,
        max_prompt_length=96,
        teacher_tokenizer=teacher_tokenizer,
        teacher_system_prompt=SYSTEM,
    )
    return dict(
        assets=assets,
        tokenizer=tokenizer,
        teacher=teacher,
        student=student,
        prompts=prompts[:6],
        eos=sampling.eos_ids(tokenizer, student_config),
        vocab=128,
    )


def test_the_teacher_prompt_is_its_rendering_with_the_system_turn(tiny):
    record = tiny['prompts'][0]
    text = tiny['tokenizer'].decode(record['teacher_prompt_tokens'])
    student_text = tiny['tokenizer'].decode(record['prompt_tokens'])
    user_turn = student_text[student_text.index('<|im_start|>user') :]
    assert text.endswith(f'<|im_start|>system\n{SYSTEM}<|im_end|>\n' + user_turn), (text, student_text)
    assert len(record['teacher_prompt_tokens']) > len(record['prompt_tokens'])


def test_teacher_rows_score_the_same_responses_after_the_teacher_prompt(tiny):
    """The teacher's log-probs of each response token from the re-aligned, left-padded rows equal those of the
    teacher run on that row alone, unpadded: teacher prompt + response."""
    prompts = tiny['prompts'][:4]
    tokens, mask = sampling.pad_prompts([p['prompt_tokens'] for p in prompts])
    rollout = sampling.generate(
        tiny['student'],
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=16,
        eos_ids=tiny['eos'],
        vocab_size=tiny['vocab'],
    )
    lengths = np.asarray(rollout.lengths)
    assert len(set(lengths.tolist())) > 1 or len({len(p['teacher_prompt_tokens']) for p in prompts}) > 1
    t_tokens, t_mask = scoring.teacher_rows(
        rollout.tokens, rollout.input_mask, rollout.prompt_length, [p['teacher_prompt_tokens'] for p in prompts], 1
    )
    p_t = t_tokens.shape[1] - 16
    np.testing.assert_array_equal(t_tokens[:, p_t:], rollout.tokens[:, rollout.prompt_length :])
    got = scoring.response_logprobs(tiny['teacher'], t_tokens, t_mask, p_t, tiny['vocab'])
    for row, p in enumerate(prompts):
        response = np.asarray(rollout.tokens[row, rollout.prompt_length : rollout.prompt_length + lengths[row]])
        alone = jnp.asarray(np.concatenate([p['teacher_prompt_tokens'], response]))[None]
        logits, _ = tiny['teacher'](alone, jnp.arange(alone.shape[1])[None], jnp.ones_like(alone))
        logprobs = jax.nn.log_softmax(logits[0, :, : tiny['vocab']].astype(jnp.float32))
        n = len(p['teacher_prompt_tokens'])
        expected = logprobs[np.arange(n - 1, n - 1 + lengths[row]), response]
        np.testing.assert_allclose(got[row, : lengths[row]], expected, rtol=1e-4, atol=1e-4)

    # The train step's teacher pass reads these rows when the settings carry their prompt length.
    micro = {
        'tokens': rollout.tokens,
        'input_mask': rollout.input_mask,
        'teacher_tokens': t_tokens,
        'teacher_input_mask': t_mask,
    }
    settings = step_lib.StepSettings(
        method='tropd',
        hyperparameters=(),
        vocab_size=tiny['vocab'],
        prompt_length=rollout.prompt_length,
        micro_batch_size=4,
        importance_ratio=True,
        fused=False,
        chunk_size=64,
        optimizer=None,
        teacher_prompt_length=p_t,
    )
    graphdef, state = nnx.split(tiny['teacher'])
    logits = step_lib.teacher_outputs(state, micro, teacher_graphdef=graphdef, settings=settings)
    own = jnp.take_along_axis(
        jax.nn.log_softmax(logits[..., : tiny['vocab']].astype(jnp.float32)), t_tokens[:, p_t:, None], axis=-1
    )[..., 0]
    np.testing.assert_allclose(own, got, rtol=1e-5, atol=1e-5)
    as_student = step_lib.teacher_outputs(
        state, micro, teacher_graphdef=graphdef, settings=dataclasses.replace(settings, teacher_prompt_length=0)
    )
    assert not np.allclose(as_student, logits, atol=1e-3)


@pytest.mark.slow
def test_differing_templates_warn_once_with_the_measured_difference(tiny, caplog):
    mesh, _ = placement.make_meshes(_Config())
    for model in (tiny['teacher'], tiny['student']):
        sharding.shard_model(model, mesh)  # as the trainer places them
    kwargs = dict(pad_id=0, eos=tiny['eos'], vocab_size=tiny['vocab'], key=jax.random.key(0))
    with caplog.at_level(logging.WARNING):
        measured = train.warn_on_template_mismatch(
            tiny['prompts'], tiny['teacher'], tiny['student'], mesh, mesh, **kwargs
        )
    warnings = [r.getMessage() for r in caplog.records if 'teacher_template' in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f'renders {len(tiny["prompts"])} of {len(tiny["prompts"])} prompts differently' in warnings[0]
    assert f'{measured["mean"]:+.3f} nats/token' in warnings[0]
    assert measured['tokens'] > 0 and measured['mean_abs'] > 0 and measured['mean_abs'] >= abs(measured['mean'])
    same = [dict(p, teacher_prompt_tokens=p['prompt_tokens']) for p in tiny['prompts']]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train.warn_on_template_mismatch(same, tiny['teacher'], tiny['student'], mesh, mesh, **kwargs) is None
    assert not caplog.records


class _Config:
    """The fields `placement.make_meshes` reads: one colocated device mesh."""

    class model:
        teacher_placement, teacher_devices = 'colocated', 0

    class mesh:
        data, fsdp, tensor = 1, -1, 1
