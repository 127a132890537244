"""The step's rollouts across the meshes and the train step's batch made from them (rows or packed rows)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tropd_jax import config as config_lib
from tropd_jax import packing, sampling, schedules, scoring
from tropd_jax.placement import Placement, global_array
from tropd_jax.step import BATCH_KEYS, StepSettings


def make_rollouts(teacher, student, prompt_batch, key, step, config, placement: Placement, *, pad_id, eos, vocab_size):
    """Pads the step's prompts, draws prefix lengths from the schedule, and samples the rollouts
    (`sampling.rollout`, with each model on its mesh of `placement`).

    Returns `(rollout, max_prefix_length)`; prompts are generated `rollout.batch_size` at a time (0 = all at once).
    With `data.teacher_template=teacher` the teacher writes its prefixes after its own rendering of the prompts
    (`teacher_prompt_tokens`), the student continues after its own.
    """
    r = config.rollout
    tokens, mask = sampling.pad_prompts([p['prompt_tokens'] for p in prompt_batch], pad_id=pad_id)
    teacher_prompts = {}
    if config.data.teacher_template == 'teacher':
        teacher_tokens, teacher_mask = sampling.pad_prompts(
            [p['teacher_prompt_tokens'] for p in prompt_batch], pad_id=pad_id
        )
        teacher_prompts = dict(teacher_prompt_tokens=teacher_tokens, teacher_prompt_mask=teacher_mask)
    length = config.prefix.max_length if config.prefix.max_length >= 0 else r.max_new_tokens
    l_max = (
        schedules.max_prefix_length(step, config.train.steps, length, config.prefix.schedule)
        if config_lib.prefix_enabled(config)
        else 0
    )
    num_prompts = len(prompt_batch)
    chunk = r.batch_size or num_prompts
    starts = range(0, num_prompts, chunk)
    with placement.draws(key) as key:
        prefix_key, sample_key = jax.random.split(key)
        prefix_lengths = np.asarray(schedules.sample_prefix_lengths(prefix_key, l_max, num_prompts * r.num_rollouts))
        chunk_keys = [jax.random.fold_in(sample_key, i) for i in range(len(starts))]
    parts = []
    for start, chunk_key in zip(starts, chunk_keys):
        prompts = slice(start, start + chunk)
        parts.append(
            sampling.rollout(
                teacher,
                student,
                tokens[prompts],
                mask[prompts],
                prefix_lengths[start * r.num_rollouts : (start + chunk) * r.num_rollouts],
                chunk_key,
                max_new_tokens=r.max_new_tokens,
                num_rollouts=r.num_rollouts,
                temperature=r.temperature,
                top_k=r.top_k,
                top_p=r.top_p,
                eos_ids=eos,
                pad_id=pad_id,
                vocab_size=vocab_size,
                decode_slots=r.decode_slots,
                placement=placement,
                **{k: v[prompts] for k, v in teacher_prompts.items()},
            )
        )
    if len(parts) == 1:
        return parts[0], l_max
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts), l_max


def _host_array(x) -> np.ndarray:
    """A (possibly multi-process, replicated or sharded) array's full value on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def pack_rollouts(rollout, micro_batch_size: int, buckets_per_doubling: int) -> dict:
    """The step's rollouts packed (`packing.plan`, first-fit decreasing; `packing.pack`) into rows of the rollouts'
    own `P + N` columns, host-side: `[K, P + N]` `BATCH_KEYS` arrays plus `PACKED_KEYS` (`rollout_ids`: each token's
    rollout index, which keys its trust-region draws), and the `[R]` `finish_reason` as it is.

    K, the rows computed, is the rows needed rounded up to a multiple of `micro_batch_size` and then to a bucket
    (`packing.bucket_rows`, `buckets_per_doubling`), at most R: the number of compiled shapes stays small.
    """
    arrays = {k: _host_array(getattr(rollout, k)) for k in BATCH_KEYS}
    finish_reason = arrays.pop('finish_reason')
    rows, columns = arrays['tokens'].shape
    arrays['rollout_ids'] = np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None], (rows, columns))
    plan = packing.plan(arrays['input_mask'], row_length=columns, multiple_of=micro_batch_size)
    plan = plan._replace(num_rows=packing.bucket_rows(plan.num_rows, micro_batch_size, buckets_per_doubling, rows))
    packed = packing.pack(arrays, plan)
    packed['finish_reason'] = finish_reason
    return packed


def with_teacher_rows(batch, rollout, prompt_batch, settings, batch_shardings, num_rollouts, pad_id):
    """`batch` plus `teacher_tokens` / `teacher_input_mask`: its responses after the prompts as the teacher renders
    them (`scoring.teacher_rows`), and the settings with their prompt length."""
    tokens, input_mask = scoring.teacher_rows(
        rollout.tokens,
        rollout.input_mask,
        rollout.prompt_length,
        [p['teacher_prompt_tokens'] for p in prompt_batch],
        num_rollouts,
        pad_id,
    )
    batch = {
        **batch,
        'teacher_tokens': jax.device_put(tokens, batch_shardings['teacher_tokens']),
        'teacher_input_mask': jax.device_put(input_mask, batch_shardings['teacher_input_mask']),
    }
    response_columns = rollout.tokens.shape[1] - rollout.prompt_length
    return batch, dataclasses.replace(settings, teacher_prompt_length=tokens.shape[1] - response_columns)


def step_batch(rollout, prompt_batch, step: int, settings: StepSettings, config, mesh, batch_shardings, pad_id):
    """The train step's batch from the step's rollouts, on the student's mesh, and the step's settings: the rollout
    rows, or packed rows (`train.packing`: every column after the first may be a response token), plus the teacher's
    own rows with `data.teacher_template=teacher`; REOPOLD's phase from the step."""
    if settings.packed:
        packed = pack_rollouts(rollout, config.train.micro_batch_size, config.train.packing_buckets)
        batch = {k: global_array(v, mesh, batch_shardings[k].spec) for k, v in packed.items()}
        prompt_length = 1
    else:
        batch = {k: jax.device_put(getattr(rollout, k), batch_shardings[k]) for k in BATCH_KEYS}
        prompt_length = rollout.prompt_length
    refining = config.loss.method == 'reopold' and step / config.train.steps >= config.loss.reopold_exploration_fraction
    settings = dataclasses.replace(settings, prompt_length=prompt_length, reopold_refining=refining)
    if config.data.teacher_template == 'teacher':
        batch, settings = with_teacher_rows(
            batch, rollout, prompt_batch, settings, batch_shardings, config.rollout.num_rollouts, pad_id
        )
    return jax.block_until_ready(batch), settings
