"""Schedules: the off-policy prefix length (SPEC "Off-policy guidance schedule") and the learning rate.

The prefix schedule anneals the maximum teacher-prefix length from the maximum response length `L` to 0:

        L_max(step) = L · ½(1 + cos(π · step / total_steps))

and each rollout draws its prefix length `l ~ Uniform{0..L_max(step)}` (ours). By the last step generation is fully
on-policy.
"""

import math

import jax
import jax.numpy as jnp
import optax

PREFIX_SCHEDULES = ('cosine', 'linear', 'constant')
LEARNING_RATE_SCHEDULES = ('constant', 'cosine', 'linear')


def max_prefix_length(step: int, total_steps: int, max_length: int, schedule: str = 'cosine') -> int:
    """The largest prefix length a rollout may get at `step` (an int in [0, max_length]).

    `cosine` is the paper's annealing; `linear` goes from `max_length` to 0 in a straight line; `constant` keeps
    `max_length` for the whole run. The real-valued schedule is floored so that `Uniform{0..L_max}` is over integers.
    """
    if total_steps <= 0:
        raise ValueError(f'total_steps must be positive, got {total_steps}')
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == 'cosine':
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == 'linear':
        fraction = 1.0 - progress
    elif schedule == 'constant':
        fraction = 1.0
    else:
        raise ValueError(f'unknown prefix schedule {schedule!r}; expected one of {PREFIX_SCHEDULES}')
    # The small epsilon keeps exact values (e.g. L_max(0) = L) from flooring down through float rounding.
    return int(math.floor(max_length * fraction + 1e-9))


def sample_prefix_lengths(key: jax.Array, max_length: int, num_rollouts: int) -> jax.Array:
    """Draws `l ~ Uniform{0..max_length}` for each rollout; returns `[num_rollouts]` int32."""
    return jax.random.randint(key, (num_rollouts,), 0, max_length + 1, dtype=jnp.int32)


def learning_rate_schedule(
    learning_rate: float, total_steps: int, *, schedule: str = 'constant', warmup_steps: int = 0
) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then `constant` (the paper), `cosine` or `linear` decay to 0."""
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == 'constant':
        decay = optax.constant_schedule(learning_rate)
    elif schedule == 'cosine':
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    elif schedule == 'linear':
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        raise ValueError(f'unknown learning-rate schedule {schedule!r}; expected one of {LEARNING_RATE_SCHEDULES}')
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])
