"""Where the teacher runs: on the student's devices (colocated) or on devices of its own (separate).

`make_meshes` builds the two meshes; `jit_teacher_scores` runs a separate teacher's scoring on its own devices and
moves its targets back to the student's.
"""

import logging

import jax
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import config as config_lib
from tropd_jax import sharding
from tropd_jax.step import teacher_input_keys, teacher_scores


def make_meshes(config, devices=None):
    """(student mesh, teacher mesh) for `model.teacher_placement`: the same mesh twice when colocated; when
    separate, the student's mesh (`config.mesh`) over the first devices and an FSDP mesh over the teacher's last
    `model.teacher_devices` (in process order, so a teacher of whole hosts gets its own hosts)."""
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


def jit_teacher_scores(teacher_mesh, student_mesh, teacher_state, teacher_graphdef):
    """`teacher_scores` on a separate teacher's mesh: `score(teacher_state, batch, settings)` moves the batch's
    `tokens` and `input_mask` to the teacher's devices, scores them there, and moves only the targets (top-k ids and
    log-probs, chosen-token log-probs, entropy: O(k) per token with the fused loss) back to the student's devices,
    split along the micro-batch rows as `jit_train_step` takes them. `score.lower(teacher_state, batch, settings)`
    lowers the teacher's program (abstract inputs allowed)."""
    rows = lambda mesh: NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
    jitted = jax.jit(
        teacher_scores,
        static_argnums=(2, 3),
        in_shardings=(sharding.state_shardings(teacher_state, teacher_mesh), rows(teacher_mesh)),
        out_shardings=NamedSharding(teacher_mesh, PartitionSpec(None, ('data', 'fsdp'))),
    )
    back = NamedSharding(student_mesh, PartitionSpec(None, ('data', 'fsdp')))

    def score(teacher_state, batch, settings):
        inputs = sharding.transfer({k: batch[k] for k in teacher_input_keys(settings)}, rows(teacher_mesh))
        with jax.set_mesh(teacher_mesh):
            out = jitted(teacher_state, inputs, teacher_graphdef, settings)
        return sharding.transfer(out, back)

    def lower(teacher_state, batch, settings):
        with jax.set_mesh(teacher_mesh):
            return jitted.lower(
                teacher_state, {k: batch[k] for k in teacher_input_keys(settings)}, teacher_graphdef, settings
            )

    score.lower = lower
    return score
