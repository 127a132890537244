"""Int8 weight-only quantisation of a frozen model (the teacher): half of bfloat16's parameter memory.

Every matrix (q / k / v / o projections, the MLP's gate / up / down, the embedding and an untied LM head) is stored
as int8 with one float32 scale per output channel, symmetric: `w ~= q * scale`, `q = round(w / scale)` in
[-127, 127], `scale = max |w| / 127` over the channel's inputs. The decoder multiplies the int8 weight, cast to the
compute dtype, by its scale right where it is used (`decoder._weight`), so no full-precision copy of the model is
kept. Norm scales and biases stay as they are. The embedding's channels are its rows (a token's vector), which for a
tied LM head are its output channels too.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from tropd_jax import sharding
from tropd_jax.models.decoder import MLP, Attention, Decoder

# Per module type: weight name -> the axes its scale reduces over (the weight's input, or contraction, axes).
QUANTIZED_WEIGHTS = {
    Attention: {'q_proj': (0,), 'k_proj': (0,), 'v_proj': (0,), 'o_proj': (0, 1)},
    MLP: {'gate_proj': (0,), 'up_proj': (0,), 'down_proj': (0,)},
    Decoder: {'embed': (1,), 'lm_head': (0,)},
}


def int8_channels(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(q int8, scale float32) with `w ~= q * scale`; scale has w's shape with `axes` reduced to 1."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def _quantize_in_place(model: Decoder) -> Decoder:
    modules = [model] + [m for block in model.layers for m in (block.attn, block.mlp)]
    for module in modules:
        for name, axes in QUANTIZED_WEIGHTS[type(module)].items():
            param = getattr(module, name, None)
            if param is None:  # a tied LM head
                continue
            logical = param.get_metadata()['out_sharding']
            q, scale = int8_channels(param[...], axes)
            with nnx.use_eager_sharding(False):
                setattr(module, name, nnx.Param(q, out_sharding=logical))
                setattr(
                    module,
                    name + '_scale',
                    nnx.Param(scale, out_sharding=tuple(None if i in axes else a for i, a in enumerate(logical))),
                )
    return model


def quantize_int8(model: Decoder, mesh: jax.sharding.Mesh | None = None) -> Decoder:
    """A copy of `model` with int8 weights (see the module docstring), placed on `mesh` by the logical rules when
    given. Works on abstract models too (`nnx.eval_shape`), for ahead-of-time compiles."""
    graphdef, state = nnx.split(model)
    quantize = lambda state: nnx.split(_quantize_in_place(nnx.merge(graphdef, state)))
    new_graphdef, abstract = jax.eval_shape(quantize, state)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        return nnx.merge(new_graphdef, abstract)
    shardings = None if mesh is None else sharding.state_shardings(abstract, mesh)
    new_state = jax.jit(lambda state: quantize(state)[1], out_shardings=shardings)(state)
    return nnx.merge(new_graphdef, new_state)
