"""Rollouts: jitted sampling with a KV cache, and responses whose first tokens are written by the teacher.

`generate(model, prompt_tokens, prompt_mask, key, ...)` samples responses from one model in one compiled program:
a prefill of the left-padded prompts, then a `lax.while_loop` decode that stops as soon as every row has finished.
Per row, the first `forced_lengths[b]` response tokens can be forced (prefix injection) instead of sampled.
`rollout(teacher, student, ...)` uses it twice: the teacher writes the prefixes, the student continues them.

Layout (docs/architecture.md, "Sequences"): prompts are left-padded to a bucket length P, the response starts at
column P and is right-padded to N = max_new_tokens. Every array of a `Rollout` is `[B, P + N]` unless stated.

The decode itself (the sampling distribution, the KV cache's segments, the static loop) is `tropd_jax.decoding`;
continuous batching (`decode_slots`) is `tropd_jax.continuous`.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import decoding, sharding
from tropd_jax.continuous import decode_continuous
from tropd_jax.decoding import FINISH_EOS as FINISH_EOS  # a rollout's public names, read as sampling.*
from tropd_jax.decoding import FINISH_LENGTH as FINISH_LENGTH
from tropd_jax.decoding import DecodeInputs, Rollout
from tropd_jax.models.decoder import init_cache
from tropd_jax.placement import Placement

# Prompt lengths are padded up to one of these, so a stream of prompts compiles a handful of programs.
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# ---------------------------------------------------------------------------------------------------------------------
# Prompt bucketing.


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The smallest bucket >= n."""
    for bucket in sorted(buckets):
        if bucket >= n:
            return bucket
    raise ValueError(f'Length {n} exceeds the largest bucket {max(buckets)}; add a larger bucket.')


def eos_ids(tokenizer, model_config) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the checkpoint's (a checkpoint may list several)."""
    ids = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))


def pad_prompts(
    prompts: Sequence[Sequence[int]], buckets: Sequence[int] = PROMPT_BUCKETS, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into the smallest bucket that fits the longest: (tokens [B, P] int32, mask [B, P]
    int32)."""
    if not prompts:
        raise ValueError('pad_prompts got no prompts.')
    length = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return tokens, mask


@functools.partial(
    jax.jit,
    static_argnames=(
        'graphdef',
        'max_new_tokens',
        'greedy',
        'top_k',
        'top_p',
        'pad_id',
        'segment_length',
        'vocab_size',
        'decode_slots',
    ),
)
def _generate(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    key,
    forced_tokens,
    forced_lengths,
    max_lengths,
    temperature,
    eos_ids,
    decode_slots=0,
    **settings,
):
    """The compiled program behind `generate`: one per shapes, model and static settings (the temperature and the
    EOS ids are inputs, so changing them does not recompile).

    Under a mesh, the decode runs in `shard_map` over the batch axes (`data`, and `fsdp` when the batch divides):
    each shard prefills, decodes and stops on its own, with no collective per step across shards (with `tensor` > 1
    the shards agree on when to stop: one scalar all-reduce per step). FSDP-sharded weights are gathered
    along `fsdp` once per call on entry (inference holds the weights split only along `tensor`, as rollout engines
    do); the `tensor` axis stays automatic. The sampling randomness is drawn for the whole batch first, so the tokens
    do not depend on the mesh.

    `decode_slots` > 0 and below the batch: continuous batching (`continuous.decode_continuous`), each shard with
    its share of the slots (rounded up) over its own rows.
    """
    batch = prompt_tokens.shape[0]
    uniforms = sharding.constrain(jax.random.uniform(key, (batch, settings['max_new_tokens'])), ('batch', None))
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    axes, automatic = _decode_axes(batch, sizes)
    shards = math.prod(sizes[a] for a in axes)
    if 0 < decode_slots < batch:
        decode = functools.partial(decode_continuous, graphdef, decode_slots=-(-decode_slots // shards), **settings)
    else:
        decode = functools.partial(decoding.decode, graphdef, **settings)
    if axes:
        if automatic:
            # XLA CPU joins a collective-permute of the automatic (tensor) axis across every device, so shards that
            # stopped early would leave the others waiting: the shards then stop together.
            decode = functools.partial(decode, sync_axes=axes)
        rows, same = PartitionSpec(axes), PartitionSpec()
        decode = jax.shard_map(
            decode,
            in_specs=(same, DecodeInputs(rows, rows, rows, rows, rows, rows, same, same)),
            out_specs=rows,
            axis_names=set(axes),
            check_vma=False,
        )
    inputs = DecodeInputs(
        prompt_tokens, prompt_mask, uniforms, forced_tokens, forced_lengths, max_lengths, temperature, eos_ids
    )
    return decode(state, inputs)


def _decode_axes(batch: int, sizes: dict) -> tuple[tuple[str, ...], list[str]]:
    """(manual, automatic) mesh axes of the decode of `batch` rows on a mesh of these axis sizes. Manual: data, plus
    fsdp when the batch divides over both (XLA's partitioner also needs the automatic remainder to be a single axis:
    a partial-manual region over `data` with `fsdp` and `tensor` left automatic fails to compile)."""
    axes = tuple(a for a in ('data', 'fsdp') if sizes.get(a, 1) > 1)
    while axes and batch % math.prod(sizes[a] for a in axes):
        axes = axes[:-1]
    automatic = [a for a, n in sizes.items() if n > 1 and a not in axes]
    if len(automatic) > 1:
        axes = ()  # all automatic
    return axes, automatic


def decode_cache_bytes(config, mesh, *, rows: int, prompt_length: int, max_new_tokens: int, decode_slots: int = 0):
    """Bytes of KV cache (`k` and `v`) one device holds at the end of `generate`'s decode of `rows` rows on `mesh`,
    from the cache the decode allocates (`init_cache`, P + N slots): its batch shard's rows (its share of the
    `decode_slots` with continuous batching), the KV heads split along `tensor` when they divide."""
    sizes = dict(mesh.shape)
    axes, _ = _decode_axes(rows, sizes)
    shards = math.prod(sizes[a] for a in axes)
    continuous = 0 < decode_slots < rows
    per_shard = -(-decode_slots // shards) if continuous else rows // shards
    cache = jax.eval_shape(lambda: init_cache(config, per_shard, prompt_length + max_new_tokens))
    tensor = sizes.get('tensor', 1)
    split = tensor if config.num_kv_heads % tensor == 0 else 1
    return sum(x.size * x.dtype.itemsize for x in (*cache.k, *cache.v)) // split


def lower_generate(
    graphdef,
    state,
    mesh,
    *,
    rows: int,
    prompt_length: int,
    max_new_tokens: int,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
):
    """`generate`'s program for `rows` prompts of `prompt_length` tokens on `mesh` (sampled, not greedy), lowered
    from abstract inputs replicated there as `rollout` places them; `state` may be abstract
    (`jax.ShapeDtypeStruct`s with shardings). Returns the `jax.stages.Lowered` (`tropd_jax.aot` compiles it)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    segment_length = min(segment_length or default_segment_length(max_new_tokens), max_new_tokens)
    with jax.set_mesh(mesh):
        return _generate.lower(
            graphdef,
            state,
            spec((rows, prompt_length), jnp.int32),  # prompt tokens
            spec((rows, prompt_length), jnp.int32),  # prompt mask
            key,
            spec((rows, max_new_tokens), jnp.int32),  # forced tokens
            spec((rows,), jnp.int32),  # forced lengths
            spec((rows,), jnp.int32),  # max lengths
            spec((), jnp.float32),  # temperature
            spec((1,), jnp.int32),  # EOS ids
            max_new_tokens=max_new_tokens,
            greedy=False,
            top_k=int(top_k),
            top_p=float(top_p),
            pad_id=int(pad_id),
            segment_length=int(segment_length),
            vocab_size=None if vocab_size is None else int(vocab_size),
            decode_slots=int(decode_slots) if decode_slots < rows else 0,
        )


def default_segment_length(max_new_tokens: int) -> int:
    """About eight decode segments, each a multiple of 16 steps (generations of up to 16 tokens use one).

    More segments attend to less empty cache (segment j's window is P + its end), but each traces the decoder step
    once more, so compile time grows with their number; eight keep the mean window within N / 16 of the filled
    length.
    """
    return 16 * max(1, math.ceil(max_new_tokens / 8 / 16))


def generate(
    model: nnx.Module,
    prompt_tokens,
    prompt_mask,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    forced_tokens=None,
    forced_lengths=None,
    max_lengths=None,
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
) -> Rollout:
    """Samples up to `max_new_tokens` response tokens per row in one compiled program.

    Args:
      model: a `Decoder`, its parameters placed by `tropd_jax.sharding`. Under `jax.set_mesh(mesh)` the batch is
        split along the mesh's `batch` axes and each `data` shard decodes on its own (see `_generate`).
      prompt_tokens: [B, P] int, left-padded (see `pad_prompts`).
      prompt_mask: [B, P], 1 on real prompt tokens.
      key: PRNG key; the same key gives the same tokens, on any mesh.
      max_new_tokens: N, the response columns.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass in (0, 1].
      eos_ids: tokens that end a row (the EOS is part of the response).
      forced_tokens: [B, N_f] int, tokens written instead of samples at response positions t < forced_lengths[b];
        their log-probs are this model's log-probs of the forced token. An EOS among them ends the row.
      forced_lengths: [B] int, how many forced tokens each row takes (capped at N_f); default 0.
      max_lengths: [B] int, per-row budget of response tokens (capped at N); default N. Rows that reach it stop
        with FINISH_LENGTH, and the loop ends once every row has stopped.
      pad_id: the token written after a row has finished.
      segment_length: decode steps per attention window (see the module docstring); default
        `default_segment_length(N)`.
      vocab_size: the real vocabulary; logits of the LM head's padding rows beyond it are masked out (None = all).
      decode_slots: 0 (or >= B) decodes the B rows as one static batch until its longest row stops. S in [1, B):
        continuous batching through S decode slots (split over the batch shards): a row that stops hands its slot
        (and its KV cache region of P + N slots) to the next pending row, whose prompt is prefilled there. Each
        row's tokens and log-probs are those of the static batch with the same key; the cache holds S rows instead
        of B, and rows that stop early no longer hold their compute until the longest one stops.

    Returns:
      A `Rollout` with P + N columns.
    """
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f'prompt_tokens must be [B, P] and prompt_mask the same shape; got {prompt_tokens.shape} and '
            f'{prompt_mask.shape}.'
        )
    batch = prompt_tokens.shape[0]
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f'temperature must be finite and >= 0, got {temperature}.')
    if top_k < 0:
        raise ValueError(f'top_k must be >= 0 (0 = no top-k cut), got {top_k}.')
    if not 0 < top_p <= 1:
        raise ValueError(f'top_p must be in (0, 1], got {top_p}.')
    segment_length = segment_length or default_segment_length(max_new_tokens)
    if segment_length < 1:
        raise ValueError(f'segment_length must be >= 1, got {segment_length}.')
    if decode_slots < 0:
        raise ValueError(f'decode_slots must be >= 0 (0 = one static batch), got {decode_slots}.')
    segment_length = min(segment_length, max_new_tokens)
    if forced_tokens is None:
        if forced_lengths is not None:
            raise ValueError('forced_lengths was given without forced_tokens.')
        forced_tokens = jnp.zeros((batch, 0), jnp.int32)
    forced_tokens = jnp.asarray(forced_tokens, jnp.int32)
    if forced_tokens.ndim != 2 or forced_tokens.shape[0] != batch:
        raise ValueError(f'forced_tokens must be [B={batch}, N_f], got shape {forced_tokens.shape}.')
    num_forced = forced_tokens.shape[1]
    forced_lengths = (
        jnp.zeros((batch,), jnp.int32)
        if forced_lengths is None
        else jnp.minimum(jnp.asarray(forced_lengths, jnp.int32), num_forced)
    )
    # Always [B, N], so that generating with and without a prefix is the same program.
    forced_tokens = jnp.pad(forced_tokens[:, :max_new_tokens], ((0, 0), (0, max(0, max_new_tokens - num_forced))))
    if max_lengths is None:
        max_lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    for name, value in (('forced_lengths', forced_lengths), ('max_lengths', max_lengths)):
        if value.shape != (batch,):
            raise ValueError(f'{name} must be [B={batch}], got shape {value.shape}.')
    # -1 never matches a token, so "no EOS" is the same program as one EOS id.
    eos_ids = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)

    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_tokens,
        prompt_mask,
        key,
        forced_tokens,
        forced_lengths,
        max_lengths,
        jnp.float32(temperature if temperature > 0 else 1.0),
        eos_ids,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        top_k=int(top_k),
        top_p=float(top_p),
        pad_id=int(pad_id),
        segment_length=int(segment_length),
        vocab_size=None if vocab_size is None else int(vocab_size),
        decode_slots=int(decode_slots) if decode_slots < batch else 0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# rollout: teacher prefix, student continuation.


def rollout(
    teacher: nnx.Module,
    student: nnx.Module,
    prompt_tokens,
    prompt_mask,
    prefix_lengths,
    key: jax.Array,
    *,
    max_new_tokens: int,
    num_rollouts: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    segment_length: int | None = None,
    vocab_size: int | None = None,
    decode_slots: int = 0,
    teacher_prompt_tokens=None,
    teacher_prompt_mask=None,
    placement: Placement | None = None,
) -> Rollout:
    """Responses whose first `prefix_lengths[b]` tokens are sampled from the teacher and the rest from the student.

    The teacher runs only until every row has its prefix (and not at all when every prefix length is 0: plain
    on-policy sampling); a teacher EOS inside the prefix ends the response there. The student then re-reads the
    prefix as forced tokens and continues. `prefix_mask` marks the teacher-written tokens; `logprobs` and
    `model_logprobs` are the student's for every response token, prefix included (the student is the sampling
    policy that scoring compares against).

    Args:
      teacher, student: `Decoder`s sharing the tokenizer.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts.
      prefix_lengths: [B] or [B * num_rollouts] int, teacher tokens per response (0 = fully on-policy).
      key: PRNG key.
      max_new_tokens: N, response columns.
      num_rollouts: responses per prompt; the rows of prompt i are rows i * num_rollouts ... (i + 1) * num_rollouts - 1.
      temperature, top_k, top_p, eos_ids, pad_id, segment_length, vocab_size, decode_slots: as `generate`, for both
        models (with continuous batching the teacher decodes only the rows that take a prefix).
      teacher_prompt_tokens, teacher_prompt_mask: [B, P_T] the same prompts as the teacher renders them (its own chat
        template and system prompt), left-padded; the teacher writes its prefixes after these and the student
        continues after its own `prompt_tokens` + the prefix. Default: the teacher reads `prompt_tokens` too.
      placement: where each model runs (`tropd_jax.placement.Placement`): the teacher writes its prefixes on its mesh,
        and only the prefix tokens and lengths move to the student's. The prompts and prefix lengths are then host
        arrays every process holds, and `key` one every process drew alike. Default: both on the current mesh.

    Returns:
      A `Rollout` of B * num_rollouts rows.
    """
    if num_rollouts < 1:
        raise ValueError(f'num_rollouts must be >= 1, got {num_rollouts}.')
    if (teacher_prompt_tokens is None) != (teacher_prompt_mask is None):
        raise ValueError('teacher_prompt_tokens and teacher_prompt_mask go together.')
    if teacher_prompt_tokens is None:
        teacher_prompt_tokens, teacher_prompt_mask = prompt_tokens, prompt_mask
    if np.shape(teacher_prompt_tokens)[0] != np.shape(prompt_tokens)[0]:
        raise ValueError(
            f'teacher_prompt_tokens must have a row per prompt ({np.shape(prompt_tokens)[0]}), got shape '
            f'{np.shape(teacher_prompt_tokens)}.'
        )
    placement = placement or Placement()
    repeat = lambda x: np.repeat(np.asarray(x), num_rollouts, axis=0)  # host side: every process holds the prompts
    prefix_lengths = np.asarray(prefix_lengths, np.int32)
    rows = np.shape(prompt_tokens)[0] * num_rollouts
    if prefix_lengths.shape == (rows // num_rollouts,) and num_rollouts > 1:
        prefix_lengths = np.repeat(prefix_lengths, num_rollouts)
    if prefix_lengths.shape != (rows,):
        raise ValueError(f'prefix_lengths must be [B] or [B * num_rollouts] = [{rows}], got {prefix_lengths.shape}.')
    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_ids=eos_ids,
        pad_id=pad_id,
        segment_length=segment_length,
        vocab_size=vocab_size,
        decode_slots=decode_slots,
    )
    with placement.draws():
        teacher_key, student_key = jax.random.split(key)
    on_student, on_teacher = placement.student_mesh, placement.teacher_mesh
    student_inputs = (
        placement.put(repeat(prompt_tokens), on_student),
        placement.put(repeat(prompt_mask), on_student),
        placement.key_on(student_key, on_student),
    )
    if int(np.max(prefix_lengths)) <= 0:
        with placement.on(on_student):
            return generate(student, *student_inputs, **settings)
    # `responses` are the N columns after each model's own prompt bucket, so the teacher's prompt length P_T may
    # differ from the student's P: its prefix tokens move to the student's rows unchanged.
    with placement.on(on_teacher):
        prefix = generate(
            teacher,
            placement.put(repeat(teacher_prompt_tokens), on_teacher),
            placement.put(repeat(teacher_prompt_mask), on_teacher),
            placement.key_on(teacher_key, on_teacher),
            max_lengths=placement.put(prefix_lengths, on_teacher),
            **settings,
        )
        written = prefix.responses, prefix.lengths
    forced_tokens, forced_lengths = placement.to_student(written)
    with placement.on(on_student):
        return generate(
            student, *student_inputs, forced_tokens=forced_tokens, forced_lengths=forced_lengths, **settings
        )
