"""Synthetic tasks for demos and tests (see `tropd_jax.tasks.arithmetic`)."""
