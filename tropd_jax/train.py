"""The trainer: rollouts, teacher and student scoring, the distillation loss, AdamW, checkpoints, metrics.

One training step (SPEC.md):
  1. take `prompts_per_step` prompts from the data iterator;
  2. draw each rollout's prefix length l ~ Uniform{0..L_max(step)} (cosine-annealed; 0 for methods without guidance);
  3. sample `num_rollouts` responses per prompt: the teacher writes l tokens, the student continues (`sampling`);
  4. `train_step`: over micro-batches of the rollouts (a `lax.scan`, so only one micro-batch of logits exists at a
     time), score with the teacher (no gradient) and the student, take the loss and its gradient, accumulate;
     then clip, apply AdamW, or skip the update when the loss or gradient is not finite.

Micro-batches are weighted (`tropd_jax.grad_accum`) so that the accumulated gradient is exactly the gradient of the
loss aggregated over the whole batch (token-mean: each micro-batch's loss times its share of the batch's response
tokens; seq-mean: its share of the batch's sequences), and the loss metrics are `(sum, count)` pairs that add up
over micro-batches. The one batch-level choice made per micro-batch instead is the top-q student-entropy
selection of `entropy_opd` / `reopold`. Trust-region draws are keyed by the step's key, the token's rollout index and
its position in the rollout, so they do not depend on where the token sits (which micro-batch, packed or not).

Packing (`train.packing`): the step's rollouts are packed host-side (`tropd_jax.packing`) into rows of the same
`P + N` columns, several rollouts per row with segment ids and per-segment RoPE positions, and the teacher's scoring
and the student's forward, backward and loss run on those rows: the same loss, gradients and metrics as on the
`[R, P + N]` rollout rows (up to float rounding), with far less padding computed. The packed row count is rounded
up to a multiple of the micro-batch size and then to one of a few buckets (`packing.bucket_rows`,
`train.packing_buckets` per doubling, at most R), which bounds the number of compiled shapes; each step logs its
`padding_fraction`. With `entropy_opd` / `reopold` the per-micro-batch top-q selection sees other micro-batches when
packed (the same training only when one micro-batch holds the whole batch).

Randomness: step s uses `fold_in(key(train.seed), s)` for its prefix lengths, samples and trust-region draws, and the
data iterator state is checkpointed, so a run resumed from any checkpoint repeats the uninterrupted run exactly.

The train step is one `jax.jit` with explicit input and output shardings on the ('data', 'fsdp', 'tensor') mesh:
student parameters and AdamW moments follow the logical rules of `tropd_jax.sharding` (FSDP by default), the teacher
likewise, and rollouts are split along the batch over data x fsdp.
"""

import dataclasses
import logging
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import (
    checkpoint,
    data,
    evaluate,
    metrics,
    paths,
    preemption,
    sampling,
    scoring,
    sharding,
)
from tropd_jax import config as config_lib
from tropd_jax.hooks import Hooks
from tropd_jax.models import load_tokenizer
from tropd_jax.models.hf import save_pretrained_state
from tropd_jax.models.loading import load_models
from tropd_jax.placement import jit_teacher_scores, make_meshes
from tropd_jax.rollouts import make_rollouts, step_batch
from tropd_jax.step import TEACHER_TEMPLATE_KEYS, batch_keys, jit_train_step, make_optimizer, step_settings


def warn_on_template_mismatch(
    prompts, teacher, student, mesh, teacher_mesh, *, pad_id, eos, vocab_size, key, count=4, max_new_tokens=32
):
    """`data.teacher_template=auto`: when the teacher's rendering of some prompts differs from the student's, one
    warning saying how many, and how far the teacher's log-probs move between the two renderings on the student's
    greedy responses (`max_new_tokens`) to `count` of them. Returns that measurement (None when all agree)."""
    differ = [p for p in prompts if not np.array_equal(p['prompt_tokens'], p['teacher_prompt_tokens'])]
    if not differ:
        return None
    message = (
        f"data.teacher_template='auto': the teacher's chat template renders {len(differ)} of {len(prompts)} "
        f"prompts differently from the student's"
    )
    measured = None
    if jax.process_count() == 1:  # the measurement reads the samples back to the host
        sample = differ[:count]
        tokens, mask = sampling.pad_prompts([p['prompt_tokens'] for p in sample], pad_id=pad_id)
        with jax.set_mesh(mesh):
            rollout = jax.device_get(
                sampling.generate(
                    student,
                    tokens,
                    mask,
                    key,
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    eos_ids=eos,
                    pad_id=pad_id,
                    vocab_size=vocab_size,
                )
            )
        with jax.set_mesh(teacher_mesh):
            measured = scoring.template_logprob_difference(
                teacher, rollout, [p['teacher_prompt_tokens'] for p in sample], vocab_size, pad_id
            )
        message += (
            f"; on the student's {measured['tokens']} greedy response tokens to {measured['prompts']} of them, "
            f"the teacher's log-probs after its own rendering differ from those after the student's by "
            f'{measured["mean"]:+.3f} nats/token on average ({measured["mean_abs"]:.3f} in absolute value)'
        )
    logging.warning(
        message + ". The teacher writes its prefixes and scores after the student's rendering: set "
        "data.teacher_template='teacher' for its own, or 'student' to keep the student's and silence this "
        'warning.'
    )
    return measured


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a checkpoint holds, as it holds it: the student's parameters and optimizer state, the steps done and the
    steps skipped (int32 scalars) and the key data of the run's key (`train.seed`), from which step s draws its
    numbers (`fold_in(key, s)`), so a resumed run draws the same ones."""

    params: nnx.State
    opt_state: optax.OptState
    step: np.ndarray
    skipped_steps: np.ndarray
    rng: np.ndarray

    @classmethod
    def create(cls, params, opt_state, step: int, skipped_steps: int, key: jax.Array) -> 'TrainState':
        return cls(
            params,
            opt_state,
            np.asarray(step, np.int32),
            np.asarray(skipped_steps, np.int32),
            np.asarray(jax.random.key_data(key)),
        )

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(np.asarray(self.rng))

    def as_dict(self) -> dict:
        """The checkpoint's tree: `{'params', 'opt_state', 'step', 'skipped_steps', 'rng'}`."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def restore_or_init(ckpt: checkpoint.Checkpointer, state: TrainState, param_shardings, opt_shardings):
    """`(state, data_state)` of the latest readable checkpoint (read onto the given shardings; the scalars on every
    device, so that every process reads them), or `(state, None)` as given when there is none."""
    replicated = NamedSharding(sharding.every_device_mesh(), PartitionSpec())
    shardings = TrainState(param_shardings, opt_shardings, replicated, replicated, replicated).as_dict()
    restored = ckpt.restore_latest(
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state.as_dict(), shardings)
    )
    if restored is None:
        return state, None
    _, tree, data_state = restored
    logging.info('resuming from checkpoint step %d', int(tree['step']))
    return TrainState(**tree), data_state['iterator']


def training_prompts(config, tokenizer, teacher, student, mesh, teacher_mesh, *, pad_id, eos, vocab_size) -> tuple:
    """The tokenized training prompts (`data.load_prompts`), rendered by the teacher's template too when
    `data.teacher_template` asks for it; `auto` compares the two renderings once (`warn_on_template_mismatch`).
    Returns `(prompts, report)`."""
    d = config.data
    teacher_tokenizer = None
    if d.teacher_template != 'student':  # render every prompt as the teacher would too, to use it or to compare
        teacher_tokenizer = load_tokenizer(
            config.model.teacher_tokenizer_path or config.model.teacher_path,
            chat_template=d.teacher_chat_template or None,
        )
    prompts, report = data.load_prompts(
        d.train_path,
        tokenizer,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        prompt_template=d.prompt_template,
        chat_template=d.chat_template,
        max_prompt_length=d.max_prompt_length,
        on_bad_record=d.on_bad_record,
        data_format=d.format,
        teacher_tokenizer=teacher_tokenizer,
        teacher_system_prompt=d.teacher_system_prompt,
    )
    logging.info('training data: %s', report.summary())
    if d.teacher_template == 'auto':
        warn_on_template_mismatch(
            prompts,
            teacher,
            student,
            mesh,
            teacher_mesh,
            pad_id=pad_id,
            eos=eos,
            vocab_size=vocab_size,
            key=jax.random.key(config.train.seed),
        )
        for p in prompts:
            del p['teacher_prompt_tokens']
    return prompts, report


def evaluation_records(config) -> list[dict] | None:
    """The periodic evaluation's problems (`evaluate.config_records`), or None without `eval.path` or on several
    processes."""
    if not config.eval.path:
        return None
    if jax.process_count() > 1:
        # `evaluate` reads its samples back to the host, which a multi-process (sharded) batch does not allow.
        logging.warning('periodic evaluation is skipped in multi-process runs; evaluate the exported checkpoint')
        return None
    return evaluate.config_records(config)


def train_and_evaluate(config, workdir: str, *, export_only: bool = False) -> dict:
    """Trains the student of `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

    Writes `workdir/metrics.jsonl` (one row per logged step), `workdir/tensorboard/`, `workdir/checkpoints/` and,
    at the end, `workdir/hf/` (the student as a Hugging Face checkpoint). `workdir` may be a `gs://` URL.
    Only process 0 writes logs and the export.
    With `export_only`, or when the latest checkpoint is already at `train.steps`, nothing is trained: that
    checkpoint's student (or the initial one) is exported to `workdir/hf` (without `export_only`, when
    `checkpoint.export_hf_at_end`) and the function returns `{'step': its step}`. On SIGTERM
    (`tropd_jax.preemption`) every process stops after the same step, writes its checkpoint and returns the last
    metrics with `preempted=True`, without the final evaluation or export.
    """
    config_lib.validate_config(config, num_devices=jax.device_count())
    mesh, teacher_mesh = make_meshes(config)
    total_steps = config.train.steps

    # Models and data.
    tokenizer, student, student_config, teacher, vocab_size = load_models(config, mesh, teacher_mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = sampling.eos_ids(tokenizer, student_config)
    prompts, report = training_prompts(
        config, tokenizer, teacher, student, mesh, teacher_mesh, pad_id=pad_id, eos=eos, vocab_size=vocab_size
    )

    # The compiled step. From here on the student lives as (graphdef, params): params and opt_state are the train
    # state.
    student_graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    settings = step_settings(config, vocab_size)
    keys = batch_keys(settings) + (TEACHER_TEMPLATE_KEYS if config.data.teacher_template == 'teacher' else ())
    optimizer = make_optimizer(settings.optimizer)
    step_fn, batch_shardings, param_shardings, opt_shardings = jit_train_step(
        mesh,
        params,
        jax.eval_shape(optimizer.init, params),
        teacher_state,
        keys,
        settings,
        student_graphdef,
        teacher_graphdef,
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    score_fn = (
        jit_teacher_scores(teacher_mesh, mesh, teacher_state, teacher_graphdef) if settings.separate_teacher else None
    )

    # The train state, resumed from the latest checkpoint when there is one.
    train_key, eval_key = jax.random.split(jax.random.key(config.train.seed))
    ckpt = checkpoint.Checkpointer(
        paths.join(workdir, 'checkpoints'),
        every_steps=config.checkpoint.every_steps or total_steps,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    state, data_state = restore_or_init(
        ckpt, TrainState.create(params, opt_state, 0, 0, train_key), param_shardings, opt_shardings
    )
    del params, opt_state  # the state holds them (or the restored ones instead)
    start_step, skipped, train_key = int(state.step), int(state.skipped_steps), state.key
    export = lambda step, state, row=None: save_pretrained_state(
        student_graphdef, state.params, mesh, paths.join(workdir, 'hf'), tokenizer
    )
    if export_only or start_step >= total_steps:
        ckpt.close()
        if export_only or config.checkpoint.export_hf_at_end:
            export(start_step, state)
        return {'step': start_step}
    iterator = data.prompt_iterator(
        prompts, batch_size=config.train.prompts_per_step, seed=config.data.seed, state=data_state
    )

    # Logging, checkpoints, evaluation and export: the loop's periodic actions.
    eval_records = evaluation_records(config)
    is_main = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir, tensorboard=config.log.tensorboard, enabled=is_main)
    bar = metrics.ProgressBar(total_steps, start_step, enabled=is_main and config.log.progress_bar)
    if start_step == 0:  # the data report is the same on every resume; log it once
        writer.write(
            0,
            {
                'data_records': report.total,
                'data_kept': report.kept,
                'data_malformed': report.malformed,
                'data_too_long': report.too_long,
            },
        )

    def evaluate_now(step, state, row=None):
        # The same key at every evaluation: the samples before and after training share their random numbers, so
        # the difference in accuracy is the model's, not the draw's (a paired comparison).
        with jax.set_mesh(mesh):
            result = evaluate.evaluate_with_config(
                nnx.merge(student_graphdef, state.params), tokenizer, eval_records, eval_key, config
            )
        writer.write(step, result)
        bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in result.items()))
        return result

    hooks = Hooks(total_steps)
    hooks.add(lambda step, state, row: writer.write(step, row), every=config.log.every_steps, at_end=True)
    hooks.add(lambda step, state, row: bar.update(row), every=1, at_end=True)
    # Also after the step a preemption stops at: the checkpoint the resumed run starts from.
    hooks.add(
        lambda step, state, row: ckpt.save(step, state.as_dict(), {'iterator': iterator.get_state()}, force=True),
        every=config.checkpoint.every_steps or total_steps,
        at_end=True,
        on_stop='always',
    )
    if eval_records is not None:
        hooks.add(evaluate_now, every=config.eval.every_steps, at_end=config.eval.at_end, on_stop='never')
        if config.eval.at_start and start_step == 0:
            evaluate_now(0, state)
    hooks.add(export, at_end=config.checkpoint.export_hf_at_end, on_stop='never')

    row = {}
    watch, preempted = preemption.PreemptionWatch().start(), False  # SIGTERM: save the step reached, then stop
    try:
        for step in range(start_step, total_steps):
            prompt_batch = next(iterator)
            rollout_key, loss_key = jax.random.split(jax.random.fold_in(train_key, step))
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                rollout, l_max = make_rollouts(
                    teacher,
                    nnx.merge(student_graphdef, state.params),
                    prompt_batch,
                    rollout_key,
                    step,
                    config,
                    mesh,
                    pad_id=pad_id,
                    eos=eos,
                    vocab_size=vocab_size,
                    teacher_mesh=teacher_mesh,
                )
                batch, step_settings_now = step_batch(
                    rollout, prompt_batch, step, settings, config, mesh, batch_shardings, pad_id
                )
                t1 = time.perf_counter()
                # A separate teacher scores the whole batch on its devices first; its targets replace its state.
                teacher_in = teacher_state if score_fn is None else score_fn(teacher_state, batch, step_settings_now)
                params, opt_state, step_metrics = step_fn(
                    state.params, state.opt_state, teacher_in, batch, loss_key, step_settings_now
                )
                step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            t2 = time.perf_counter()
            if step_metrics['skipped']:
                skipped += 1
                logging.warning(
                    'step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped',
                    step + 1,
                    step_metrics['loss'],
                    step_metrics['grad_norm'],
                )
            state = TrainState.create(params, opt_state, step + 1, skipped, train_key)
            row = {
                **step_metrics,
                'max_prefix_length': l_max,
                'skipped_steps': skipped,
                'rollout_time': t1 - t0,
                'train_time': t2 - t1,
                'tokens_per_second': step_metrics['response_tokens'] / max(t2 - t0, 1e-9),
            }
            preempted = watch.reached(step + 1)
            row.update(hooks.run(step + 1, state, row, stopping=preempted))
            if preempted:
                logging.warning('preempted: stopping after step %d and writing its checkpoint', step + 1)
                break
    finally:
        watch.stop()
        bar.close()
        ckpt.close()  # waits for the checkpoint being written
    writer.close()
    if preempted:
        logging.warning(
            'preempted: checkpoint of step %d written to %s; run the same command to resume', step + 1, ckpt.directory
        )
        return {**row, 'preempted': True}
    return row
