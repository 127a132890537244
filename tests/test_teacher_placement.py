"""Teacher placement: a separate teacher (its own devices) gives the colocated teacher's rollouts, loss and
gradients, on 8 fake CPU devices; also when it scores packed rows (`train.packing`)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # multi-device runs in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHECK = r"""
import dataclasses, importlib.util, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from tropd_jax import data, rollouts, sampling, train
from tropd_jax import step as step_lib
from tropd_jax.placement import Placement, global_array
from tropd_jax.loading import load_models

spec = importlib.util.spec_from_file_location('tiny', 'configs/tiny.py')
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
fused = sys.argv[1] == 'fused'
packed_case = sys.argv[2] == 'packed'  # the separate teacher's run packs its rollouts


def run(placement, packed=False):
  config = tiny.get_config()
  config.unlock()
  config.model.teacher_placement = placement
  config.loss.method = 'tropd'  # teacher prefixes and the trust region (the demo recipe runs the exact JSD)
  config.loss.fused = fused
  config.rollout.max_new_tokens = 64 if packed_case else 24  # room in a row for two rollouts that stopped early
  config.prefix.max_length = 12  # step 0: prefixes of 0..12 teacher tokens
  config.train.prompts_per_step = 16
  config.train.micro_batch_size = 8  # two micro-batches of rows with different lengths
  # AdamW's first update is lr * g / (|g| + eps): with eps far above |g| it is -g * lr / eps, so the parameters'
  # change is the gradient itself (the sign-like step of a small eps would hide its size).
  config.optim.eps, config.optim.learning_rate, config.optim.clip_norm = 1e3, 1e3, 0.0
  config.optim.warmup_steps, config.optim.schedule = 0, 'constant'
  config.train.packing = packed
  placed = Placement.from_config(config)
  mesh, teacher_mesh = placed.student_mesh, placed.teacher_mesh
  tokenizer, student, student_config, teacher, vocab = load_models(config, mesh, teacher_mesh)
  prompts, _ = data.load_prompts(config.data.train_path, tokenizer, chat_template=False, max_prompt_length=64)
  graphdef, params = nnx.split(student)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  settings = step_lib.step_settings(config, vocab)
  optimizer = step_lib.make_optimizer(settings.optimizer)
  step, batch_shardings, _, opt_shardings = step_lib.jit_train_step(
      mesh, params, jax.eval_shape(optimizer.init, params), teacher_state, step_lib.batch_keys(settings), settings,
      graphdef, teacher_graphdef)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  before = jax.tree.map(np.asarray, params)
  with jax.set_mesh(mesh):
    rollout, l_max = rollouts.make_rollouts(teacher, student, prompts[:16], jax.random.key(3), 0, config, placed,
                                         pad_id=0, eos=sampling.eos_ids(tokenizer, student_config),
                                         vocab_size=vocab)
    if packed:
      rows = rollouts.pack_rollouts(rollout, config.train.micro_batch_size, config.train.packing_buckets)
      assert len(rows['tokens']) < len(rollout.tokens)
      batch = {k: global_array(v, mesh, batch_shardings[k].spec) for k, v in rows.items()}
      settings = dataclasses.replace(settings, prompt_length=1)
    else:
      batch = {k: jax.device_put(getattr(rollout, k), batch_shardings[k]) for k in step_lib.BATCH_KEYS}
      settings = dataclasses.replace(settings, prompt_length=rollout.prompt_length)
    teacher_in = teacher_state
    if placement == 'separate':
      teacher_in = placed.jit_teacher_scores(
          step_lib.teacher_scores, step_lib.teacher_input_keys, teacher_state, teacher_graphdef)(
          teacher_state, batch, settings)
      devices = {d for x in jax.tree.leaves(teacher_state) for d in x.sharding.device_set}
      assert devices == set(teacher_mesh.devices.flat) and not devices & set(mesh.devices.flat)
      assert all(x.sharding.device_set == set(mesh.devices.flat) for x in jax.tree.leaves(teacher_in))
    params, _, metrics = step(params, opt_state, teacher_in, batch, jax.random.key(4), settings)
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, params)  # before - after = g
  lengths = np.asarray(rollout.lengths)
  return np.asarray(rollout.tokens), np.asarray(rollout.prefix_mask).sum(1), lengths, metrics, grads


tokens_c, prefix_c, lengths, metrics_c, grads_c = run('colocated')
tokens_s, prefix_s, _, metrics_s, grads_s = run('separate', packed_case)
assert len(set(lengths.tolist())) > 2 and len(set(prefix_c.tolist())) > 2, (lengths, prefix_c)  # rows differ
np.testing.assert_array_equal(tokens_c, tokens_s)
np.testing.assert_array_equal(prefix_c, prefix_s)
for name in set(metrics_c) - ({'padding_fraction'} if packed_case else set()):
  # The sampler-vs-learner mismatch is float32 rounding (about 1e-5 here) of programs sharded differently: compared
  # as an absolute bound, the other metrics to float32 precision.
  tolerance = dict(rtol=0, atol=1e-4) if name.startswith('logprob_mismatch') else dict(rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics_s[name]), float(metrics_c[name]), err_msg=name, **tolerance)
assert float(metrics_c['grad_norm']) > 0
flat_c, flat_s = jax.tree.leaves(grads_c), jax.tree.leaves(grads_s)
scale = max(float(np.abs(g).max()) for g in flat_c)
for a, b in zip(flat_c, flat_s):
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * scale)
# The change of the parameters is the gradient: its norm is the step's gradient norm.
norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in flat_c)))
np.testing.assert_allclose(norm, float(metrics_c['grad_norm']), rtol=1e-3)
print('OK', float(metrics_c['loss']), float(metrics_s['loss']), norm)
"""


@pytest.mark.parametrize(
    'loss, rows',
    [('fused', 'unpacked'), ('fused', 'packed'), ('logits', 'unpacked')],
)
def test_separate_teacher_gives_the_colocated_loss_and_gradients_on_8_devices(loss, rows):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', _CHECK, loss, rows], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and 'OK' in result.stdout, result.stdout + result.stderr[-6000:]


_PREFIX_CHECK = r"""
import importlib.util, sys
import jax, numpy as np
from tropd_jax import data, rollouts, sampling, train
from tropd_jax import step as step_lib
from tropd_jax.placement import Placement, global_array
from tropd_jax.loading import load_models
from tropd_jax.models import from_pretrained, load_tokenizer

spec = importlib.util.spec_from_file_location('tiny', 'configs/tiny.py')
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
SYSTEM = 'You check arithmetic.'  # only the teacher's rendering gets it: the two prompts differ
NEW = 24

config = tiny.get_config()
tokenizer = load_tokenizer(config.model.tokenizer_path)
prompts, _ = data.load_prompts(config.data.train_path, tokenizer, max_prompt_length=96,
                               teacher_tokenizer=load_tokenizer(config.model.teacher_path),
                               teacher_system_prompt=SYSTEM)
prompts = prompts[:8]
# The reference: the teacher and the student alone (unsharded, no mesh), keys and prefix lengths derived as
# `make_rollouts` derives them for its one chunk.
teacher, _ = from_pretrained(config.model.teacher_path)
student, student_config = from_pretrained(config.model.student_path)
eos = sampling.eos_ids(tokenizer, student_config)
settings = dict(max_new_tokens=NEW, eos_ids=eos, vocab_size=128, pad_id=0)
key = jax.random.key(5)
prefix_key, sample_key = jax.random.split(key)
teacher_key, student_key = jax.random.split(jax.random.fold_in(sample_key, 0))
lengths = np.asarray(jax.random.randint(prefix_key, (16,), 0, 13))  # Uniform{0..12}: step 0 of prefix.max_length=12
repeat = lambda x: np.repeat(x, 2, axis=0)
s_tokens, s_mask = map(repeat, sampling.pad_prompts([p['prompt_tokens'] for p in prompts]))
t_tokens, t_mask = map(repeat, sampling.pad_prompts([p['teacher_prompt_tokens'] for p in prompts]))
assert t_tokens.shape[1] > s_tokens.shape[1] or not np.array_equal(t_tokens, s_tokens)
own = sampling.generate(teacher, t_tokens, t_mask, teacher_key, max_lengths=lengths, **settings)
as_student = sampling.generate(teacher, s_tokens, s_mask, teacher_key, max_lengths=lengths, **settings)
expected = sampling.generate(student, s_tokens, s_mask, student_key, forced_tokens=own.responses,
                             forced_lengths=own.lengths, **settings)
written = lambda r: [np.asarray(r.responses)[i, :n].tolist() for i, n in enumerate(np.asarray(r.lengths))]
assert written(own) != written(as_student)  # the teacher's prompt changes its prefixes: the test can fail
assert len(set(np.asarray(own.lengths).tolist())) > 3, own.lengths

failed = []
for case in sys.argv[1].split(','):  # placement:decode_slots
  placement, slots = case.split(':')
  slots = int(slots)
  config = tiny.get_config()
  config.unlock()
  config.model.teacher_placement = placement
  config.loss.method = 'tropd'  # only the tropd* methods get teacher prefixes
  config.data.teacher_template = 'teacher'
  config.data.teacher_system_prompt = SYSTEM
  config.rollout.max_new_tokens, config.rollout.num_rollouts, config.rollout.decode_slots = NEW, 2, slots
  config.prefix.max_length = 12
  config.train.prompts_per_step = config.train.micro_batch_size = 8
  placed = Placement.from_config(config)
  mesh, teacher_mesh = placed.student_mesh, placed.teacher_mesh
  _, student_on, _, teacher_on, vocab = load_models(config, mesh, teacher_mesh)
  with jax.set_mesh(mesh):
    rollout, _ = rollouts.make_rollouts(teacher_on, student_on, prompts, key, 0, config, placed, pad_id=0, eos=eos,
                                     vocab_size=vocab)
  label = f'{placement}, decode_slots={slots}'
  prefix = np.asarray(rollout.prefix_mask).sum(1)
  got = np.asarray(rollout.responses)
  wrong = [i for i, n in enumerate(prefix) if got[i, :n].tolist() != written(own)[i]]
  if wrong:
    failed.append(f'{label}: the prefixes of rows {wrong} are not the teacher\'s after its own prompt')
  # The student continues after its own prompt and the teacher's prefix.
  elif not np.array_equal(np.asarray(rollout.tokens), np.asarray(expected.tokens)):
    failed.append(f'{label}: the student continuation differs')
assert not failed, '\n'.join(failed)
print('OK', sum(len(w) for w in written(own)))
"""


@pytest.mark.parametrize(
    'cases',
    [
        'colocated:0,separate:4',  # each placement, each decode (rollout.decode_slots 0 = static, 4 = continuous)
        'colocated:4,separate:0',
    ],
)
def test_the_teacher_writes_its_prefix_after_its_own_prompt(cases):
    """`data.teacher_template=teacher`: the teacher's prefix tokens are its own samples after the prompt rendered
    its way (here with a system turn the student's rendering lacks) with the same key, which differ from its samples
    after the student's rendering; the student continues after its own prompt. On 8 fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', _PREFIX_CHECK, cases], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and 'OK' in result.stdout, result.stdout + result.stderr[-6000:]
