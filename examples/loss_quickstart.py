"""The loss API on random logits: value, gradient and per-step metrics of TrOPD."""

import jax
import jax.numpy as jnp

from tropd_jax import losses

B, T, V = 2, 6, 32
ks = jax.random.split(jax.random.key(0), 4)
student_logits = jax.random.normal(ks[0], (B, T, V))
teacher_logits = jax.random.normal(ks[1], (B, T, V))
tokens = jax.random.randint(ks[2], (B, T), 0, V)
response_mask = jnp.array([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])  # prompt/padding = 0
prefix_mask = jnp.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])  # teacher-written prefix tokens


def loss_fn(student_logits):
    return losses.distillation_loss(
        'tropd', student_logits, teacher_logits, tokens, response_mask, prefix_mask, ks[3], k=8, beta=0.001
    )


(loss, pairs), grads = jax.value_and_grad(loss_fn, has_aux=True)(student_logits)
metrics = losses.metric_values(pairs)  # each metric comes as (sum, count): micro-batches add up exactly
print(float(loss), {name: float(v) for name, v in metrics.items()})
