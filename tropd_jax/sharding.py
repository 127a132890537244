"""Device mesh and the one table that maps logical axis names to mesh axes.

Weights carry logical names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) and activations
`batch`, `length` (and the fused loss's `loss_tokens`, `loss_vocab`). `LOGICAL_RULES` says which mesh axes each is
split over: vocabulary, attention heads and MLP along `tensor`, the model dimension along `fsdp`, the batch along
`data` and `fsdp`; a loss chunk's logits along `data` (tokens) and `fsdp` x `tensor` (vocabulary). A mesh axis
that does not divide the dimension (or is already used by another dimension of the same array) is dropped for that
array, so tiny test models and odd head counts still place, just less split.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_RULES = {
    # weights
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
    'layers': (),
    # activations
    'batch': ('data', 'fsdp'),
    'length': (),
    # one chunk of the fused loss's logits [tokens, vocabulary]: the vocabulary split over every weight axis, so the
    # LM head and its gradient stay split (`tropd_jax.fused_loss`)
    'loss_tokens': ('data',),
    'loss_vocab': ('fsdp', 'tensor'),
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f'At most one mesh size may be -1, got (data, fsdp, tensor)={tuple(sizes)}.')
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or len(devices) % known:
            raise ValueError(f'Mesh (data, fsdp, tensor)={tuple(sizes)} does not divide {len(devices)} devices.')
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
        raise ValueError(
            f'Mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices; {len(devices)} are available.'
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    skip_axes: Sequence[str] = (),
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes (None = replicated dimension).

    With `shape` and `mesh`, mesh axes that do not divide a dimension, or are used by an earlier dimension, drop;
    so do `skip_axes` (e.g. the manual axes of an enclosing shard_map, over which `shape` is already split).
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f'Logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}.')
    used, spec = set(), []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ValueError(f'Unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}.')
        axes, size = [], 1
        for axis in LOGICAL_RULES[name]:
            if axis in used or axis in skip_axes or (mesh is not None and axis not in mesh.shape):
                continue
            axis_size = 1 if mesh is None else mesh.shape[axis]
            if shape is not None and mesh is not None and shape[i] % (size * axis_size):
                continue
            axes.append(axis)
            size *= axis_size
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_sharding(logical_axes, shape, mesh: Mesh) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` with these logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def _variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    axes = variable.get_metadata().get('out_sharding')
    shape = variable.get_value().shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return logical_sharding(axes, shape, mesh)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A state of NamedShardings mirroring `state` (an `nnx.State` of Variables, concrete or abstract)."""
    return jax.tree.map(
        lambda v: v.replace(_variable_sharding(v, mesh)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every parameter of `model` onto `mesh` following the logical rules (in place); returns the model.
    (The trainer loads onto its mesh directly; this places a model built without one, in benchmarks and tests.)"""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    nnx.update(model, state)
    return model


# Logical axes of one layer's KV-cache buffers (`tropd_jax.models.KVCache`).
KV_CACHE_AXES = {'k': ('batch', 'kv_heads', 'head_dim', 'length'), 'v': ('batch', 'kv_heads', 'length', 'head_dim')}


def tensor_parallel() -> bool:
    """Whether the current mesh (`jax.set_mesh`) splits weights along `tensor` (size > 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get('tensor', 1) > 1


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` on the current mesh (`jax.set_mesh`); a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    manual = set(mesh.manual_axes)
    if manual:
        # Inside a shard_map the manual axes are already split by hand; constrain along the automatic ones only.
        def automatic(entry):
            axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in manual)
            return axes or None

        spec = PartitionSpec(*map(automatic, spec))
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_rows(x: jax.Array) -> jax.Array:
    """`constrain` of a batch-major array (`[B, ...]`): rows along `batch`, the rest unsplit."""
    return constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def transfer(tree, shardings):
    """`jax.device_put(tree, shardings)` between meshes on different devices, also when one of them lies on other
    processes' devices (a separate teacher on its own hosts), where `device_put` needs a backend with cross-host
    transfers. Every process calls it with the same arguments.

    tree: a pytree of jax.Arrays (PRNG key arrays too) on one source mesh; shardings: one `NamedSharding` for every
    leaf, or a matching pytree of them, all on one target mesh. Within one process it is `jax.device_put`. Across
    processes it runs two programs: the source mesh replicates each leaf on its own devices, then one program over the
    union of both meshes' devices sums the source's first copy with zeros from every other device (an all-reduce: the
    values arrive unchanged, except that -0.0 becomes 0.0); each target device keeps its slice. Every union device holds
    each leaf in full for a moment: meant for small arrays (prefix tokens, the teacher's top-k targets, metrics), not
    for weights.
    """
    leaves, treedef = jax.tree.flatten(tree)
    targets = (
        treedef.flatten_up_to(shardings)
        if not isinstance(shardings, jax.sharding.Sharding)
        else [shardings] * len(leaves)
    )
    if all(x.is_fully_addressable for x in leaves) and all(t.is_fully_addressable for t in targets):
        return jax.device_put(tree, shardings)
    keys = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
    impls = [jax.random.key_impl(x) if key else None for x, key in zip(leaves, keys)]
    data = [jax.random.key_data(x) if key else x for x, key in zip(leaves, keys)]
    source = data[0].sharding.mesh
    with jax.set_mesh(source):  # [1, ...] per leaf, a copy on every source device
        replicated = jax.jit(
            lambda *xs: tuple(x[None] for x in xs), out_shardings=NamedSharding(source, PartitionSpec())
        )(*data)
    union_devices = set(source.devices.flat) | {d for t in targets for d in t.device_set}
    order = [d for d in jax.devices() if d in union_devices]  # the same order on every process
    union = Mesh(np.array(order), ('devices',))
    first = order.index(min(source.devices.flat, key=order.index))
    stacked = []
    for x in replicated:
        shards = {s.device: s.data for s in x.addressable_shards}
        pieces = [
            shards[d] if d in shards else jax.device_put(np.zeros(x.shape, x.dtype), d)
            for d in order
            if d.process_index == jax.process_index()
        ]
        stacked.append(
            jax.make_array_from_single_device_arrays(
                (len(order), *x.shape[1:]), NamedSharding(union, PartitionSpec('devices')), pieces, dtype=x.dtype
            )
        )

    def from_first(x):  # an all-reduce of the source's copy and zeros: one copy per device
        chosen = (jnp.arange(x.shape[0]) == first).reshape((-1,) + (1,) * (x.ndim - 1))
        total = jnp.sum(
            jnp.where(chosen, x, jnp.zeros((), x.dtype)), axis=0, dtype=jnp.int32 if x.dtype == bool else None
        )
        return total.astype(x.dtype)

    with jax.set_mesh(union):
        everywhere = jax.jit(
            lambda *xs: tuple(map(from_first, xs)), out_shardings=NamedSharding(union, PartitionSpec())
        )(*stacked)
    out = []
    for x, target in zip(everywhere, targets):  # each leaf in full on the target's devices, then its slices
        full = NamedSharding(target.mesh, PartitionSpec())
        shards = [s.data for s in x.addressable_shards if s.device in full.device_set]
        out.append(jax.make_array_from_single_device_arrays(x.shape, full, shards, dtype=x.dtype))
    with jax.set_mesh(targets[0].mesh):
        out = jax.jit(lambda *xs: xs, out_shardings=tuple(targets))(*out)
    out = [jax.random.wrap_key_data(y, impl=impl) if key else y for y, key, impl in zip(out, keys, impls)]
    return jax.tree.unflatten(treedef, out)


def every_device_mesh() -> Mesh:
    """A 1-D mesh ('devices',) over every device of every process: host-side values computed under it (PRNG draws,
    metrics) are replicated on a device of every process, so every process can read them."""
    return Mesh(np.array(jax.devices()), ('devices',))
