"""Where the teacher runs: on the student's devices (colocated) or on devices of its own (separate).

A `Placement` holds the two meshes and is the one place that knows whether they differ. What crosses between them
is small: the teacher's prefix tokens and lengths (to the student), the rollouts' tokens and masks (to the teacher),
its scored targets (back), and, for processes that hold no student device, the step's metrics. `sharding.transfer`
moves them with `jax.device_put` within one process, and across processes with an all-reduce over the union of both
meshes' devices. Host values every process computed alike (prompts, prefix lengths, PRNG keys) are placed on either
mesh as global arrays (`put`, `global_key`), so a mesh whose devices are all other processes' still gets them.

`sampling.rollout` takes a `Placement` (the teacher writes its prefixes on the teacher's mesh, the student continues
on its own); `jit_teacher_scores` runs a separate teacher's scoring of the whole batch on its devices.
"""

import contextlib
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tropd_jax import sharding


def make_meshes(config, devices=None) -> tuple[Mesh, Mesh]:
    """(student mesh, teacher mesh) for `model.teacher_placement`: the same mesh twice when colocated; when
    separate, the student's mesh (`config.mesh`) over the first devices and an FSDP mesh over the teacher's last
    `model.teacher_devices` (in process order, so a teacher of whole hosts gets its own hosts)."""
    # The config schema (which reads the losses' fields) sits above the data path: imported here, so that
    # `sampling`, which takes a Placement, does not depend on it.
    from tropd_jax import config as config_lib

    devices = list(jax.devices() if devices is None else devices)
    n_student, n_teacher = config_lib.placement_devices(config.model, len(devices))
    student_mesh = sharding.make_mesh(*config_lib.mesh_shape(config.mesh, n_student), devices=devices[:n_student])
    if not n_teacher:
        return student_mesh, student_mesh
    processes = lambda ds: sorted({d.process_index for d in ds})
    logging.info(
        'separate teacher on %d devices of processes %s, student on %d devices of processes %s',
        n_teacher,
        processes(devices[n_student:]),
        n_student,
        processes(devices[:n_student]),
    )
    return student_mesh, sharding.make_mesh(1, n_teacher, 1, devices=devices[n_student:])


def global_array(x: np.ndarray, mesh: Mesh, spec: PartitionSpec | None = None) -> jax.Array:
    """A global array from a host array every process holds in full (each process places its own shards, if any);
    replicated by default."""
    x, spec = np.asarray(x), PartitionSpec() if spec is None else spec
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index], dtype=x.dtype)


def global_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A PRNG key every process computed alike, replicated on `mesh` (whose devices may all be other processes')."""
    data = global_array(np.asarray(jax.random.key_data(key)), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


@dataclasses.dataclass(frozen=True)
class Placement:
    """The student's mesh and the teacher's: the same mesh when colocated. Without meshes (`Placement()`) both
    models run on the current mesh (`jax.set_mesh`) and inputs stay as given: the form of one-process callers."""

    student_mesh: Mesh | None = None
    teacher_mesh: Mesh | None = None

    @classmethod
    def from_config(cls, config, devices=None) -> 'Placement':
        """The meshes of `model.teacher_placement` over `devices` (default: every device; see `make_meshes`)."""
        return cls(*make_meshes(config, devices))

    @property
    def separate(self) -> bool:
        return self.teacher_mesh is not self.student_mesh

    def put(self, x, mesh: Mesh | None) -> jax.Array:
        """A host array every process holds, replicated on `mesh` (`student_mesh` or `teacher_mesh`)."""
        return jnp.asarray(x) if mesh is None else global_array(x, mesh)

    def key_on(self, key: jax.Array, mesh: Mesh | None) -> jax.Array:
        """A key every process drew alike (under `draws`), replicated on `mesh`."""
        return key if mesh is None else global_key(key, mesh)

    @contextlib.contextmanager
    def draws(self, key: jax.Array | None = None):
        """A context for host-side draws that every process reads: on every device when separate (a separate
        teacher's processes may hold none of the student's devices), as the caller stands otherwise. Yields `key`,
        replicated on every device when separate (it may be on the student's mesh only, or on none)."""
        if not self.separate:
            yield key
            return
        everywhere = sharding.every_device_mesh()
        with jax.set_mesh(everywhere):
            yield None if key is None else global_key(key, everywhere)

    def on(self, mesh: Mesh | None) -> contextlib.AbstractContextManager:
        """`mesh` (`student_mesh` or `teacher_mesh`) as the current one; the current one as it is without meshes."""
        return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)

    def to_student(self, tree):
        """The teacher's small outputs (prefix tokens and lengths), replicated on the student's devices. The teacher's
        devices may be other processes' (its own hosts): `sharding.transfer`, not `jax.device_put`."""
        if not self.separate or self.student_mesh is None:
            return tree
        return sharding.transfer(tree, NamedSharding(self.student_mesh, PartitionSpec()))

    def jit_teacher_scores(self, teacher_scores, input_keys, teacher_state, teacher_graphdef):
        """`teacher_scores(teacher_state, batch, teacher_graphdef, settings)` (`step.teacher_scores`) on a separate
        teacher's mesh: `score(teacher_state, batch, settings)` moves the batch's `input_keys(settings)` (`tokens` and
        `input_mask`, ...) to the teacher's devices, scores them there, and moves only the targets (top-k ids and
        log-probs, chosen-token log-probs, entropy: O(k) per token with the fused loss) back to the student's
        devices, split along the micro-batch rows as `step.jit_train_step` takes them. `score.lower(teacher_state,
        batch, settings)` lowers the teacher's program (abstract inputs allowed)."""
        teacher_mesh, student_mesh = self.teacher_mesh, self.student_mesh
        rows = lambda mesh: NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
        jitted = jax.jit(
            teacher_scores,
            static_argnums=(2, 3),
            in_shardings=(sharding.state_shardings(teacher_state, teacher_mesh), rows(teacher_mesh)),
            out_shardings=NamedSharding(teacher_mesh, PartitionSpec(None, ('data', 'fsdp'))),
        )
        back = NamedSharding(student_mesh, PartitionSpec(None, ('data', 'fsdp')))

        def score(teacher_state, batch, settings):
            inputs = sharding.transfer({k: batch[k] for k in input_keys(settings)}, rows(teacher_mesh))
            with jax.set_mesh(teacher_mesh):
                out = jitted(teacher_state, inputs, teacher_graphdef, settings)
            return sharding.transfer(out, back)

        def lower(teacher_state, batch, settings):
            with jax.set_mesh(teacher_mesh):
                return jitted.lower(
                    teacher_state, {k: batch[k] for k in input_keys(settings)}, teacher_graphdef, settings
                )

        score.lower = lower
        return score
