"""The sampler against transformers / PyTorch references: greedy parity, prefix injection, log-probs, EOS handling,
the sampling distribution, teacher-student rollouts and sharded generation."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import decoding, sampling
from tropd_jax.models import from_pretrained

# The parity tests' reference: the CPU build of PyTorch (README, Tests); skipped without it.
torch = pytest.importorskip('torch')

EOS = 2  # the fixture's eos_token_id
PAD = 0
N = 10  # new tokens; most tests share one compiled program per sampling setting
CUT = dict(temperature=1.3, top_k=20, top_p=0.9)  # a sampling distribution changed by every setting
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20], [30, 31, 32, 33, 34]]


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Student and teacher: random tiny Qwen3 checkpoints (tied embeddings), written by transformers.

    Module-scoped (unlike conftest's `tiny_hf_checkpoint`) so that the tests share compiled sampling programs.
    """
    import transformers

    def make(seed):
        fields = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=EOS,
            pad_token_id=PAD,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        torch_model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**fields)).eval()
        with torch.no_grad():
            for name, param in torch_model.named_parameters():  # far-from-uniform logits make greedy parity meaningful
                if 'norm' in name:
                    param.uniform_(0.5, 1.5)
                else:
                    param.normal_(0.0, 0.3)
        path = tmp_path_factory.mktemp(f'qwen3_{seed}')
        torch_model.save_pretrained(path)
        return from_pretrained(str(path))[0], torch_model, str(path)

    return {'student': make(0), 'teacher': make(1)}


def prompts(buckets=(8,)):
    return sampling.pad_prompts(PROMPTS, buckets)


def torch_logprobs(torch_model, tokens, input_mask):
    """float64 log-softmax of the reference model's logits, shifted so that [:, t] is the distribution of
    tokens[:, t]."""
    positions = np.maximum(np.cumsum(input_mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = (
            torch_model(
                input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
                attention_mask=torch.tensor(np.asarray(input_mask)),
                position_ids=torch.tensor(positions),
            )
            .logits.double()
            .numpy()
        )
    out = np.zeros(logits.shape)
    out[:, 1:] = logits[:, :-1] - np.logaddexp.reduce(logits[:, :-1], axis=-1, keepdims=True)
    return out


def assert_logprobs_match(torch_model, rollout):
    """The rollout's log-probs equal the reference model's full-forward log-probs of its tokens (0 off-response)."""
    lp = torch_logprobs(torch_model, rollout.tokens, rollout.input_mask)
    want = np.take_along_axis(lp, np.asarray(rollout.tokens)[..., None], -1)[..., 0] * np.asarray(rollout.response_mask)
    np.testing.assert_allclose(np.asarray(rollout.logprobs), want, atol=2e-4)


def torch_greedy(torch_model, tokens, mask, max_new_tokens):
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    return out[:, tokens.shape[1] :].numpy()


def check_layout(rollout, prompt_mask):
    """Masks are consistent with lengths; padding after the response is pad_id with zero log-probs."""
    p = rollout.prompt_length
    n = rollout.tokens.shape[1] - p
    lengths = np.asarray(rollout.lengths)
    response = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(rollout.response_mask)[:, :p], 0)
    np.testing.assert_array_equal(np.asarray(rollout.response_mask)[:, p:], response)
    np.testing.assert_array_equal(np.asarray(rollout.input_mask), np.concatenate([prompt_mask, response], axis=1))
    assert (np.asarray(rollout.prefix_mask) <= np.asarray(rollout.response_mask)).all()
    np.testing.assert_array_equal(np.asarray(rollout.responses)[response == 0], PAD)
    for field in (rollout.logprobs, rollout.model_logprobs):
        np.testing.assert_array_equal(np.asarray(field)[np.asarray(rollout.response_mask) == 0], 0.0)


# ---------------------------------------------------------------------------------------------------------------------


def test_bucketing():
    assert sampling.bucket_length(5, (4, 8, 16)) == 8
    assert sampling.bucket_length(8, (16, 8, 4)) == 8
    with pytest.raises(ValueError, match='exceeds the largest bucket 16'):
        sampling.bucket_length(17, (4, 8, 16))
    tokens, mask = sampling.pad_prompts([[3, 4, 5], [6], []], buckets=(2, 4, 8), pad_id=9)
    np.testing.assert_array_equal(tokens, [[9, 3, 4, 5], [9, 9, 9, 6], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_greedy_matches_transformers(checkpoints):
    model, torch_model, _ = checkpoints['student']
    tokens, mask = prompts()
    expected = torch_greedy(torch_model, tokens, mask, N)
    rollout = sampling.generate(
        model, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_ids=(EOS,), pad_id=PAD
    )
    got = np.asarray(rollout.responses)
    # transformers pads after EOS with pad_token_id, as we do.
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
    check_layout(rollout, mask)
    # Greedy log-probs are the temperature-1 ones, and equal a full-forward recompute.
    assert_logprobs_match(torch_model, rollout)


@pytest.mark.slow
def test_sampled_logprobs_match_full_forward(checkpoints):
    model, torch_model, _ = checkpoints['student']
    tokens, mask = prompts()
    # Several decode segments; temperature, top-k and top-p change the sampling distribution.
    temperature, top_k, top_p = CUT['temperature'], CUT['top_k'], CUT['top_p']
    rollout = sampling.generate(model, tokens, mask, jax.random.key(3), max_new_tokens=N, segment_length=4, **CUT)
    check_layout(rollout, mask)
    lp = torch_logprobs(torch_model, rollout.tokens, rollout.input_mask)
    response = np.asarray(rollout.response_mask) == 1
    token_ids = np.asarray(rollout.tokens)[..., None]
    model_lp = np.take_along_axis(lp, token_ids, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(rollout.model_logprobs)[response], model_lp[response], atol=2e-4)
    # The sampling distribution, re-derived in float64: temperature, then top-k, then the top-p nucleus.
    scaled = lp / temperature
    kth = -np.sort(-scaled, axis=-1)[..., top_k - 1 : top_k]
    scaled = np.where(scaled >= kth, scaled, -np.inf)
    order = -np.sort(-scaled, axis=-1)
    probs = np.exp(order - np.logaddexp.reduce(order, axis=-1, keepdims=True))
    kept = (np.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = np.take_along_axis(order, kept.sum(-1, keepdims=True) - 1, axis=-1)
    scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    sample_lp = np.take_along_axis(scaled - np.logaddexp.reduce(scaled, axis=-1, keepdims=True), token_ids, -1)[..., 0]
    assert np.isfinite(sample_lp[response]).all()  # sampled tokens are inside the cut
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[response], sample_lp[response], atol=2e-4)


@pytest.mark.slow
def test_same_key_same_tokens_and_segments_do_not_change_results(checkpoints):
    model, _, _ = checkpoints['student']
    tokens, mask = prompts()
    first = sampling.generate(model, tokens, mask, jax.random.key(7), max_new_tokens=N)
    again = sampling.generate(model, tokens, mask, jax.random.key(7), max_new_tokens=N)
    other = sampling.generate(model, tokens, mask, jax.random.key(8), max_new_tokens=N)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
    # Decoding in segments (growing attention windows) gives the same rollout as one segment.
    whole = sampling.generate(model, tokens, mask, jax.random.key(9), max_new_tokens=N, segment_length=N, **CUT)
    segmented = sampling.generate(model, tokens, mask, jax.random.key(9), max_new_tokens=N, segment_length=4, **CUT)
    np.testing.assert_array_equal(whole.tokens, segmented.tokens)
    np.testing.assert_allclose(whole.logprobs, segmented.logprobs, atol=1e-5)


@pytest.mark.slow
def test_temperature_near_zero_is_greedy(checkpoints):
    model, _, _ = checkpoints['student']
    tokens, mask = prompts()
    greedy = sampling.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
    cold = sampling.generate(model, tokens, mask, jax.random.key(5), max_new_tokens=N, temperature=1e-4)
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)


@pytest.mark.slow
def test_early_eos_rows_are_padded_and_masked(checkpoints):
    model, _, _ = checkpoints['student']
    tokens, mask = prompts()
    n = N
    free = sampling.generate(model, tokens, mask, jax.random.key(11), max_new_tokens=n)
    responses = np.asarray(free.responses)
    eos = int(responses[0, 2])  # make row 0's third token the end of sequence
    stopped = sampling.generate(model, tokens, mask, jax.random.key(11), max_new_tokens=n, eos_ids=(eos,), pad_id=PAD)
    check_layout(stopped, mask)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(responses[row] == eos)
        length = hits[0] + 1 if len(hits) else n
        assert stopped.lengths[row] == length
        assert stopped.finish_reason[row] == (sampling.FINISH_EOS if len(hits) else sampling.FINISH_LENGTH)
        # Same key, same per-step randomness: identical up to and including the EOS, padding after.
        np.testing.assert_array_equal(np.asarray(stopped.responses)[row, :length], responses[row, :length])
        np.testing.assert_allclose(
            np.asarray(stopped.logprobs)[row, -n:][:length], np.asarray(free.logprobs)[row, -n:][:length], atol=1e-5
        )
    assert stopped.lengths[0] <= 3 and stopped.finish_reason[0] == sampling.FINISH_EOS


def test_forced_prefix(checkpoints):
    model, torch_model, _ = checkpoints['student']
    tokens, mask = prompts()
    n = N
    forced = np.array([[40, 41, 42, 43], [50, 51, 52, 53], [60, EOS, 61, 62], [70, 71, 72, 73]])
    forced_lengths = np.array([3, 0, 4, 4])
    rollout = sampling.generate(
        model,
        tokens,
        mask,
        jax.random.key(2),
        max_new_tokens=n,
        temperature=0.0,
        eos_ids=(EOS,),
        forced_tokens=forced,
        forced_lengths=forced_lengths,
    )
    check_layout(rollout, mask)
    responses = np.asarray(rollout.responses)
    prefix = np.asarray(rollout.prefix_mask)[:, -n:]
    np.testing.assert_array_equal(responses[0, :3], forced[0, :3])
    np.testing.assert_array_equal(responses[3, :4], forced[3])
    # A forced EOS ends the row: two response tokens, both forced.
    assert rollout.lengths[2] == 2 and rollout.finish_reason[2] == sampling.FINISH_EOS
    np.testing.assert_array_equal(responses[2, :2], [60, EOS])
    np.testing.assert_array_equal(prefix, (np.arange(n)[None] < np.array([[3], [0], [2], [4]])).astype(np.int32))
    # Log-probs of forced tokens are the model's log-probs of those tokens (full-forward recompute).
    assert_logprobs_match(torch_model, rollout)
    # The continuation equals greedy decoding from prompt + prefix directly (transformers).
    for row in (0, 1, 3):
        length = forced_lengths[row]
        prompt = [t for t, m in zip(tokens[row], mask[row]) if m] + list(forced[row, :length])
        p_tokens, p_mask = sampling.pad_prompts([prompt], buckets=(len(prompt),))
        expected = torch_greedy(torch_model, p_tokens, p_mask, n - length)[0]
        np.testing.assert_array_equal(responses[row, length : length + len(expected)], expected)


@pytest.mark.slow
def test_first_token_distribution_matches_softmax(checkpoints):
    """20,000 one-token generations from one prompt; total-variation distance to the re-derived distribution."""
    model, torch_model, _ = checkpoints['student']
    samples, temperature, top_k, top_p = 20_000, 2.0, 12, 0.8
    tokens, mask = sampling.pad_prompts([[5, 6, 7]] * samples, buckets=(4,))
    rollout = sampling.generate(
        model, tokens, mask, jax.random.key(4), max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p
    )
    counts = np.bincount(np.asarray(rollout.responses)[:, 0], minlength=128) / samples
    logits = torch_logprobs(torch_model, np.append(tokens[0], 0)[None], np.append(mask[0], 1)[None])[0, -1]
    scaled = logits / temperature
    order = np.argsort(-scaled)
    probs = np.exp(scaled - np.logaddexp.reduce(scaled))
    kept = order[:top_k]
    kept_probs = probs[kept] / probs[kept].sum()
    kept = kept[(np.cumsum(kept_probs) - kept_probs) < top_p]
    expected = np.zeros(128)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert 3 <= len(kept) < top_k  # the cut is active and the test is not degenerate
    assert counts[expected == 0].sum() == 0  # nothing outside the top-k / top-p cut
    # E[TV] <= 0.5 * sqrt(K / n) ~ 0.008 for K <= 12 categories; 0.03 is about 4 standard deviations away.
    assert 0.5 * np.abs(counts - expected).sum() < 0.03


def test_rollout_teacher_prefix_then_student(checkpoints):
    student, student_torch, _ = checkpoints['student']
    teacher, teacher_torch, _ = checkpoints['teacher']
    tokens, mask = prompts()
    n = 8
    prefix_lengths = np.array([0, 3, 8, 5, 2, 0, 1, 4])  # per rollout, two rollouts per prompt
    rollout = sampling.rollout(
        teacher,
        student,
        tokens,
        mask,
        prefix_lengths,
        jax.random.key(0),
        max_new_tokens=n,
        num_rollouts=2,
        temperature=0.0,
        eos_ids=(EOS,),
    )
    assert rollout.tokens.shape == (8, 8 + n)
    np.testing.assert_array_equal(np.asarray(rollout.tokens)[:, :8], np.repeat(tokens, 2, axis=0))
    check_layout(rollout, np.repeat(mask, 2, axis=0))
    teacher_greedy = torch_greedy(teacher_torch, tokens, mask, n)
    responses = np.asarray(rollout.responses)
    for row in range(8):
        prompt_row, length = row // 2, prefix_lengths[row]
        teacher_part = teacher_greedy[prompt_row, :length]
        if EOS in teacher_part:
            teacher_part = teacher_part[: list(teacher_part).index(EOS) + 1]
        np.testing.assert_array_equal(responses[row, : len(teacher_part)], teacher_part)
        np.testing.assert_array_equal(
            np.asarray(rollout.prefix_mask)[row, -n:], (np.arange(n) < len(teacher_part)).astype(np.int32)
        )
        if len(teacher_part) < n and EOS not in teacher_part:
            prompt = [t for t, m in zip(tokens[prompt_row], mask[prompt_row]) if m] + list(teacher_part)
            p_tokens, p_mask = sampling.pad_prompts([prompt], buckets=(len(prompt),))
            expected = torch_greedy(student_torch, p_tokens, p_mask, n - len(teacher_part))[0]
            np.testing.assert_array_equal(
                responses[row, len(teacher_part) : len(teacher_part) + len(expected)], expected
            )
    # Log-probs are the student's, prefix included.
    assert_logprobs_match(student_torch, rollout)


@pytest.mark.slow
def test_rollout_without_prefix_never_runs_the_teacher(checkpoints):
    student, _, _ = checkpoints['student']
    tokens, mask = prompts()
    rollout = sampling.rollout(
        None, student, tokens, mask, np.zeros(4, np.int32), jax.random.key(1), max_new_tokens=N, num_rollouts=1
    )
    assert int(np.asarray(rollout.prefix_mask).sum()) == 0
    check_layout(rollout, mask)


def test_bad_arguments(checkpoints):
    model, _, _ = checkpoints['student']
    tokens, mask = prompts()
    with pytest.raises(ValueError, match='top_p'):
        sampling.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match='forced_tokens'):
        sampling.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=4, forced_tokens=np.zeros((3, 2)))
    with pytest.raises(ValueError, match='prefix_lengths'):
        sampling.rollout(model, model, tokens, mask, np.ones(3), jax.random.key(0), max_new_tokens=4)


# Continuous batching: prompts of different lengths, budgets from 0 to N, forced prefixes (one with an EOS) and an
# EOS set, so rows stop at different steps and slots are refilled in an order unlike the rows'.
RAGGED_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14],
    [20],
    [30, 31, 32, 33, 34],
    [40, 41],
    [50, 51, 52, 53, 54, 55],
    [60],
    [70, 71, 72],
]
RAGGED_BUDGETS = np.array([2, N, 1, 0, 7, N, 3, 5])
RAGGED_FORCED = np.array([[40 + i, 41 + i, EOS if i == 2 else 42 + i, 43 + i] for i in range(8)])
RAGGED_FORCED_LENGTHS = np.array([0, 2, 4, 1, 3, 0, 1, 4])


def ragged_generate(model, key, settings, copies=1, **kwargs):
    tokens, mask = sampling.pad_prompts(RAGGED_PROMPTS * copies, (8,))
    tile = lambda x: np.concatenate([x] * copies)
    return sampling.generate(
        model,
        tokens,
        mask,
        key,
        max_new_tokens=N,
        max_lengths=tile(RAGGED_BUDGETS),
        forced_tokens=tile(RAGGED_FORCED),
        forced_lengths=tile(RAGGED_FORCED_LENGTHS),
        pad_id=PAD,
        **settings,
        **kwargs,
    )


def assert_same_rollouts(got, want, rows=slice(None)):
    for field in ('tokens', 'input_mask', 'response_mask', 'prefix_mask', 'lengths', 'finish_reason'):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field))[rows], field)
    for field in ('logprobs', 'model_logprobs'):
        np.testing.assert_allclose(
            np.asarray(getattr(got, field)), np.asarray(getattr(want, field))[rows], atol=1e-5, err_msg=field
        )


@pytest.mark.slow
@pytest.mark.parametrize('slots', [1, 3])
def test_continuous_batching_gives_each_rollout_its_static_result(checkpoints, slots):
    # One slot, and three: refills one rollout at a time (slots / 8 rounds down to 1).
    model, torch_model, _ = checkpoints['student']
    sampled = dict(eos_ids=(EOS, 17, 33, 90), **CUT)
    static = ragged_generate(model, jax.random.key(4), sampled)
    continuous = ragged_generate(model, jax.random.key(4), sampled, decode_slots=slots)
    # Not degenerate: rows stop at different steps, by EOS and by budget, and some take forced tokens.
    lengths = np.asarray(static.lengths)
    assert len(set(lengths.tolist())) >= 4 and lengths.min() == 0
    assert set(np.asarray(static.finish_reason).tolist()) == {sampling.FINISH_EOS, sampling.FINISH_LENGTH}
    assert_same_rollouts(continuous, static)
    tokens, mask = sampling.pad_prompts(RAGGED_PROMPTS, (8,))
    check_layout(continuous, mask)
    # Greedy, against each rollout generated alone (batch 1) and the reference model's log-probs.
    greedy = ragged_generate(
        model, jax.random.key(0), dict(temperature=0.0, eos_ids=(EOS, 17, 33, 90)), decode_slots=slots
    )
    assert_logprobs_match(torch_model, greedy)
    for row in range(len(RAGGED_PROMPTS)):
        alone = sampling.generate(
            model,
            tokens[row : row + 1],
            mask[row : row + 1],
            jax.random.key(0),
            max_new_tokens=N,
            max_lengths=RAGGED_BUDGETS[row : row + 1],
            forced_tokens=RAGGED_FORCED[row : row + 1],
            forced_lengths=RAGGED_FORCED_LENGTHS[row : row + 1],
            pad_id=PAD,
            temperature=0.0,
            eos_ids=(EOS, 17, 33, 90),
        )
        one = jax.tree.map(lambda x, row=row: x[row : row + 1], greedy)
        assert_same_rollouts(one, alone)


@pytest.mark.slow
def test_continuous_batching_refills_in_groups(checkpoints):
    # 16 slots refill in groups of 2 (slots / 8) over 24 rollouts.
    model, _, _ = checkpoints['student']
    sampled = dict(eos_ids=(EOS, 17, 33, 90), **CUT)
    static = ragged_generate(model, jax.random.key(6), sampled, copies=3)
    assert_same_rollouts(ragged_generate(model, jax.random.key(6), sampled, copies=3, decode_slots=16), static)


@pytest.mark.slow
def test_continuous_batching_rollout_with_teacher_prefixes(checkpoints):
    student, student_torch, _ = checkpoints['student']
    teacher, _, _ = checkpoints['teacher']
    tokens, mask = prompts()
    prefix_lengths = np.array([0, 3, 8, 5, 2, 0, 1, 4])
    settings = dict(max_new_tokens=8, num_rollouts=2, eos_ids=(EOS, 17), **CUT)
    static = sampling.rollout(teacher, student, tokens, mask, prefix_lengths, jax.random.key(2), **settings)
    continuous = sampling.rollout(
        teacher, student, tokens, mask, prefix_lengths, jax.random.key(2), decode_slots=3, **settings
    )
    assert 0 < int(np.asarray(static.prefix_mask).sum()) < int(np.asarray(static.response_mask).sum())
    assert_same_rollouts(continuous, static)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax, numpy as np
    from tropd_jax import sampling, sharding
    from tropd_jax.models import from_pretrained

    path = sys.argv[1]
    tokens, mask = sampling.pad_prompts([[5, 6, 7], [8], [9, 10], [11, 12, 13]] * 2, buckets=(4,))
    model, _ = from_pretrained(path)
    # Rows stop at different steps, so shards that finish early must not leave the others waiting.
    max_lengths = np.array([1, 6, 2, 6, 3, 6, 6, 4])
    plain = sampling.generate(model, tokens, mask, jax.random.key(0), max_new_tokens=6, max_lengths=max_lengths)
    reports = []
    for shape in ((4, 2, 1), (2, 2, 2)):
      mesh = sharding.make_mesh(*shape)
      sharded_model, _ = from_pretrained(path, mesh=mesh)
      with jax.set_mesh(mesh):
        spec = sharding.logical_sharding(('batch', 'length'), tokens.shape, mesh)
        out = sampling.generate(sharded_model, jax.device_put(tokens, spec), mask, jax.random.key(0),
                                max_new_tokens=6, max_lengths=max_lengths)
        # Continuous batching: 4 slots over the shards (one per shard on 2x2x2, whose shards hold two rows each).
        refilled = sampling.generate(sharded_model, jax.device_put(tokens, spec), mask, jax.random.key(0),
                                     max_new_tokens=6, max_lengths=max_lengths, decode_slots=4)
      reports.append({
          'same_tokens': bool((np.asarray(out.tokens) == np.asarray(plain.tokens)).all()),
          'same_lengths': bool((np.asarray(out.lengths) == np.minimum(max_lengths, 6)).all()),
          'max_logprob_diff': float(np.abs(np.asarray(out.logprobs) - np.asarray(plain.logprobs)).max()),
          'devices': len(out.tokens.sharding.device_set),
          'shard_rows': out.tokens.addressable_shards[0].data.shape[0],
          'continuous_same_tokens': bool((np.asarray(refilled.tokens) == np.asarray(plain.tokens)).all()),
          'continuous_same_lengths': bool((np.asarray(refilled.lengths) == np.minimum(max_lengths, 6)).all()),
          'continuous_max_logprob_diff': float(np.abs(np.asarray(refilled.logprobs) -
                                                      np.asarray(plain.logprobs)).max()),
          'continuous_devices': len(refilled.tokens.sharding.device_set),
      })
    print(json.dumps(reports))
""")


@pytest.mark.slow
def test_generate_under_a_mesh_splits_the_batch(checkpoints):
    _, _, path = checkpoints['student']
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', _SHARDED_SCRIPT, path], capture_output=True, text=True, env=env, check=True
    )
    for report in json.loads(result.stdout.strip().splitlines()[-1]):  # data x fsdp x tensor = 4x2x1, 2x2x2
        assert report['same_tokens'] and report['same_lengths'] and report['max_logprob_diff'] < 1e-4
        assert report['devices'] == 8
        assert report['continuous_same_tokens'] and report['continuous_same_lengths']
        assert report['continuous_max_logprob_diff'] < 1e-4 and report['continuous_devices'] == 8
    assert [r['shard_rows'] for r in json.loads(result.stdout.strip().splitlines()[-1])] == [1, 2]


@pytest.mark.parametrize('vocab', [5, 151, 1000, 151936])  # blocks of 32 (the first three) and 128
def test_cumulative_sum_and_sampling_edges(vocab):
    x = np.random.default_rng(vocab).uniform(size=(3, vocab)).astype(np.float32)
    np.testing.assert_allclose(
        decoding.cumulative_sum(jnp.asarray(x)), np.cumsum(x.astype(np.float64), axis=1), rtol=1e-5
    )
    # Tokens after the last one of non-zero probability are never drawn, even for a uniform next to 1; a uniform of
    # 0 draws the first token of non-zero probability.
    logprobs = np.where(np.arange(vocab) % 3 == 1, np.log(x), -np.inf)
    logprobs = logprobs - np.logaddexp.reduce(logprobs, axis=1, keepdims=True)
    last = max(i for i in range(vocab) if i % 3 == 1)
    top, _ = decoding.sample_and_total(jnp.asarray(logprobs, jnp.float32), jnp.full((3,), 1 - 2**-24, jnp.float32))
    bottom, _ = decoding.sample_and_total(jnp.asarray(logprobs, jnp.float32), jnp.zeros((3,), jnp.float32))
    np.testing.assert_array_equal(top, last)
    np.testing.assert_array_equal(bottom, 1)
    ties = jnp.asarray([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(decoding.greedy_token(ties), [1, 0])
