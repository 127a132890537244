"""tropd_jax: Trust Region On-Policy Distillation in JAX/Flax."""

__version__ = '0.1.0'
