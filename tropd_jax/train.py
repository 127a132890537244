"""The trainer: `setup` builds a run (models, meshes, data, the compiled step, the train state, the periodic
actions), and `train_and_evaluate` loops: data -> rollouts -> train step -> hooks.

One training step (SPEC.md):
  1. take `prompts_per_step` prompts from the data iterator;
  2. draw each rollout's prefix length l ~ Uniform{0..L_max(step)} (cosine-annealed; 0 for methods without guidance);
  3. sample `num_rollouts` responses per prompt: the teacher writes l tokens, the student continues
     (`tropd_jax.rollouts.make_rollouts`, each model on its mesh of the run's `tropd_jax.placement.Placement`);
  4. make the step's batch of them (`rollouts.step_batch`: rows, or packed rows with `train.packing`), and with a
     separate teacher score it on the teacher's devices;
  5. `tropd_jax.step.train_step`: micro-batched teacher and student scoring, the loss and its gradient, AdamW.

Randomness: step s uses `fold_in(key(train.seed), s)` for its prefix lengths, samples and trust-region draws, and the
data iterator state is checkpointed, so a run resumed from any checkpoint repeats the uninterrupted run exactly.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tropd_jax import checkpoint, data, evaluate, metrics, paths, preemption, sampling, scoring, sharding
from tropd_jax import config as config_lib
from tropd_jax import step as step_lib
from tropd_jax.hooks import Hooks
from tropd_jax.loading import load_models
from tropd_jax.models import load_tokenizer
from tropd_jax.models.hf import save_pretrained_state
from tropd_jax.placement import Placement
from tropd_jax.rollouts import make_rollouts, step_batch


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


def training_prompts(config, tokenizer, teacher, student, placement: Placement, *, pad_id, eos, vocab_size) -> tuple:
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
            placement.student_mesh,
            placement.teacher_mesh,
            pad_id=pad_id,
            eos=eos,
            vocab_size=vocab_size,
            key=jax.random.key(config.train.seed),
        )
        for p in prompts:
            del p['teacher_prompt_tokens']
    return prompts, report


def evaluation_records(config) -> list[dict] | None:
    """The periodic evaluation's problems (`evaluate.config_records`), or None without `eval.path`."""
    if not config.eval.path:
        return None
    return evaluate.config_records(config)


@dataclasses.dataclass
class Run:
    """What the loop needs, as `setup` builds it: the models on their meshes, the compiled step, the data, the train
    state (resumed when a checkpoint exists) and the periodic actions (`hooks`: None when there is nothing to train)."""

    config: Any
    placement: Placement
    teacher: nnx.Module
    student_graphdef: Any
    teacher_state: nnx.State
    settings: step_lib.StepSettings  # per batch, `rollouts.step_batch` sets its prompt length and REOPOLD's phase
    train_step: Callable  # `step.jit_train_step`'s
    teacher_scores: Callable | None  # a separate teacher's scoring (`Placement.jit_teacher_scores`)
    batch_shardings: dict
    state: TrainState
    checkpointer: checkpoint.Checkpointer
    export: Callable  # (step, state, row=None): the student to `workdir/hf`
    pad_id: int
    eos: tuple
    vocab_size: int
    iterator: Any = None
    hooks: Hooks | None = None
    writer: metrics.MetricsWriter | None = None
    bar: metrics.ProgressBar | None = None


def setup(config, workdir: str, *, export_only: bool = False) -> Run:
    """The run of `config` in `workdir` (see `train_and_evaluate`), resumed from its latest checkpoint. Without
    anything to train (`export_only`, or the checkpoint at `train.steps`) it has no data iterator and no hooks."""
    config_lib.validate_config(config, num_devices=jax.device_count())
    placement = Placement.from_config(config)
    mesh = placement.student_mesh
    tokenizer, student, student_config, teacher, vocab_size = load_models(config, mesh, placement.teacher_mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = sampling.eos_ids(tokenizer, student_config)
    prompts, report = training_prompts(
        config, tokenizer, teacher, student, placement, pad_id=pad_id, eos=eos, vocab_size=vocab_size
    )

    # The compiled step. From here on the student lives as (graphdef, params): params and opt_state are the train
    # state.
    student_graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    settings = step_lib.step_settings(config, vocab_size)
    keys = step_lib.batch_keys(settings)
    if config.data.teacher_template == 'teacher':
        keys += step_lib.TEACHER_TEMPLATE_KEYS
    optimizer = step_lib.make_optimizer(settings.optimizer)
    train_step, batch_shardings, param_shardings, opt_shardings = step_lib.jit_train_step(
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
    teacher_scores = None
    if placement.separate:
        teacher_scores = placement.jit_teacher_scores(
            step_lib.teacher_scores, step_lib.teacher_input_keys, teacher_state, teacher_graphdef
        )

    # The train state, resumed from the latest checkpoint when there is one.
    train_key, eval_key = jax.random.split(jax.random.key(config.train.seed))
    total_steps = config.train.steps
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
    export = lambda step, state, row=None: save_pretrained_state(
        student_graphdef, state.params, mesh, paths.join(workdir, 'hf'), tokenizer
    )
    run = Run(
        config,
        placement,
        teacher,
        student_graphdef,
        teacher_state,
        settings,
        train_step,
        teacher_scores,
        batch_shardings,
        state,
        ckpt,
        export,
        pad_id,
        eos,
        vocab_size,
    )
    if export_only or int(state.step) >= total_steps:
        return run
    run.iterator = data.prompt_iterator(
        prompts, batch_size=config.train.prompts_per_step, seed=config.data.seed, state=data_state
    )
    add_hooks(run, workdir, report, tokenizer, eval_key)
    return run


def add_hooks(run: Run, workdir: str, report, tokenizer, eval_key) -> None:
    """The loop's periodic actions: logging, checkpoints, evaluation and the export at the end (`run.hooks`, with its
    writer and progress bar); the evaluation before training when asked."""
    config, start_step, total_steps = run.config, int(run.state.step), run.config.train.steps
    eval_records = evaluation_records(config)
    is_main = jax.process_index() == 0
    writer = run.writer = metrics.MetricsWriter(
        workdir,
        tensorboard=config.log.tensorboard,
        enabled=is_main,
        wandb=metrics.wandb_settings(config, workdir) if is_main else None,
    )
    bar = run.bar = metrics.ProgressBar(total_steps, start_step, enabled=is_main and config.log.progress_bar)
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
        with jax.set_mesh(run.placement.student_mesh):
            result = evaluate.evaluate_with_config(
                nnx.merge(run.student_graphdef, state.params),
                tokenizer,
                eval_records,
                eval_key,
                config,
                mesh=run.placement.student_mesh,
            )
        writer.write(step, result)
        bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in result.items()))
        return result

    hooks = run.hooks = Hooks(total_steps)
    hooks.add(lambda step, state, row: writer.write(step, row), every=config.log.every_steps, at_end=True)
    hooks.add(lambda step, state, row: bar.update(row), every=1, at_end=True)
    # Also after the step a preemption stops at: the checkpoint the resumed run starts from.
    hooks.add(
        lambda step, state, row: run.checkpointer.save(
            step, state.as_dict(), {'iterator': run.iterator.get_state()}, force=True
        ),
        every=config.checkpoint.every_steps or total_steps,
        at_end=True,
        on_stop='always',
    )
    if eval_records is not None:
        hooks.add(evaluate_now, every=config.eval.every_steps, at_end=config.eval.at_end, on_stop='never')
        if config.eval.at_start and start_step == 0:
            evaluate_now(0, run.state)
    hooks.add(run.export, at_end=config.checkpoint.export_hf_at_end, on_stop='never')


def train_one_step(run: Run, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """Step `step` (0-based) of the run from `state`: rollouts, the batch, the train step. Returns the state after it
    and its metrics row."""
    config, mesh = run.config, run.placement.student_mesh
    prompt_batch = next(run.iterator)
    rollout_key, loss_key = jax.random.split(jax.random.fold_in(state.key, step))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        student = nnx.merge(run.student_graphdef, state.params)
        rollout, l_max = make_rollouts(
            run.teacher,
            student,
            prompt_batch,
            rollout_key,
            step,
            config,
            run.placement,
            pad_id=run.pad_id,
            eos=run.eos,
            vocab_size=run.vocab_size,
        )
        batch, settings = step_batch(
            rollout, prompt_batch, step, run.settings, config, mesh, run.batch_shardings, run.pad_id
        )
        t1 = time.perf_counter()
        # The teacher's parameters, or a separate teacher's targets for the batch, scored on its devices first.
        teacher = (
            run.teacher_state if run.teacher_scores is None else run.teacher_scores(run.teacher_state, batch, settings)
        )
        params, opt_state, step_metrics = run.train_step(
            state.params, state.opt_state, teacher, batch, loss_key, settings
        )
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    t2 = time.perf_counter()
    skipped = int(state.skipped_steps) + int(step_metrics['skipped'])
    if step_metrics['skipped']:
        logging.warning(
            'step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped',
            step + 1,
            step_metrics['loss'],
            step_metrics['grad_norm'],
        )
    row = {
        **step_metrics,
        'max_prefix_length': l_max,
        'skipped_steps': skipped,
        'rollout_time': t1 - t0,
        'train_time': t2 - t1,
        'tokens_per_second': step_metrics['response_tokens'] / max(t2 - t0, 1e-9),
    }
    return TrainState.create(params, opt_state, step + 1, skipped, state.key), row


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
    run = setup(config, workdir, export_only=export_only)
    state, row, preempted = run.state, {}, False
    if run.hooks is None:  # nothing to train
        run.checkpointer.close()
        if export_only or config.checkpoint.export_hf_at_end:
            run.export(int(state.step), state)
        return {'step': int(state.step)}
    watch = preemption.PreemptionWatch().start()  # SIGTERM: save the step reached, then stop
    try:
        for step in range(int(state.step), config.train.steps):
            state, row = train_one_step(run, state, step)
            preempted = watch.reached(step + 1)
            row.update(run.hooks.run(step + 1, state, row, stopping=preempted))
            if preempted:
                logging.warning('preempted: stopping after step %d and writing its checkpoint', step + 1)
                break
    finally:
        watch.stop()
        run.bar.close()
        run.checkpointer.close()  # waits for the checkpoint being written
    run.writer.close()
    if preempted:
        logging.warning(
            'preempted: checkpoint of step %d written to %s; run the same command to resume',
            step + 1,
            run.checkpointer.directory,
        )
        return {**row, 'preempted': True}
    return row
