"""`python -m tropd_jax.aot`: topology names, the shipped model configs, and whole runs on CPU and TPU topologies."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from tropd_jax import aot
from tropd_jax.models import Decoder, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
    spec = importlib.util.spec_from_file_location('tiny_recipe', os.path.join(ROOT, 'configs', 'tiny.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_slice_names_count_cores_or_chips_as_cloud_tpu_does():
    assert aot.libtpu_topology_name('v5p-8') == 'v5p:2x2x1'  # 4 chips of 2 TensorCores
    assert aot.libtpu_topology_name('v5p-16') == 'v5p:2x2x2'
    assert aot.libtpu_topology_name('v4-32') == 'v4:2x2x4'
    assert aot.libtpu_topology_name('v5e-4') == 'v5e:2x2'  # v5e names count chips
    assert aot.libtpu_topology_name('v5litepod-8') == 'v5e:2x4'
    assert aot.libtpu_topology_name('v6e:4x4') == 'v6e:4x4'  # libtpu's own names pass through
    for bad in ('v5p-3', 'v9-8', 'tpu'):
        with pytest.raises(ValueError, match=repr(bad)):
            aot.libtpu_topology_name(bad)


# (total, non-embedding) parameters as published: the safetensors counts of the DeepSeek / Skywork checkpoints
# (untied: embedding and LM head both counted), the Qwen3 model cards' rounded figures (tied embeddings).
PUBLISHED_PARAMETERS = {
    'DeepSeek-R1-Distill-Qwen-1.5B': (1.78e9, None),
    'Skywork-OR1-Math-7B': (7.62e9, None),
    'Skywork-OR1-7B': (7.62e9, None),
    'Qwen3-SFT-1.7B': (1.7e9, 1.4e9),  # Qwen3-1.7B's shape
    'Qwen3-Nemotron-4B': (4.0e9, 3.6e9),  # Qwen3-4B's shape
    'Qwen3-8B': (8.2e9, 6.95e9),  # 8B- and 32B-shaped teachers for the placement benchmarks
    'Qwen3-32B': (32.8e9, 31.2e9),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMETERS))
def test_shipped_model_configs_have_the_published_sizes(name):
    path = aot.model_config_path(f'models/{name}', os.path.join(ROOT, 'configs', 'math.py'))
    with open(path) as f:
        config = ModelConfig.from_hf(json.load(f))
    state = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(state))
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    total, non_embedding = PUBLISHED_PARAMETERS[name]
    tolerance = 0.01 if non_embedding is None else 0.04  # the cards round to 0.1B
    assert abs(count / total - 1) < tolerance, (name, count)
    if non_embedding is not None:
        assert abs((count - embedding) / non_embedding - 1) < tolerance, (name, count - embedding)


def test_model_config_path_prefers_the_checkpoint_and_names_both_places(tmp_path):
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / 'config.json').write_text('{}')
    recipe = os.path.join(ROOT, 'configs', 'math.py')
    assert aot.model_config_path(str(tmp_path / 'ckpt'), recipe) == str(tmp_path / 'ckpt' / 'config.json')
    with pytest.raises(FileNotFoundError, match='NoSuchModel'):
        aot.model_config_path('models/NoSuchModel', recipe)


def run_aot(*args):
    env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
    return subprocess.run(
        [sys.executable, '-m', 'tropd_jax.aot', '--config=configs/tiny.py', *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def check_every_program_fits(result, topology):
    assert result.returncode == 0, result.stdout + result.stderr
    for program in aot.PROGRAMS:
        assert f'{program}:' in result.stdout
    assert f'every program fits on {topology}' in result.stdout
    assert 'DOES NOT FIT' not in result.stdout


@pytest.mark.slow
def test_tiny_config_fits_eight_cpu_devices(tmp_path):
    out = tmp_path / 'aot.json'
    result = run_aot('--topology=cpu:8', f'--json={out}')
    check_every_program_fits(result, 'cpu:8')
    report = json.loads(out.read_text())
    temporaries = {p['program']: p['rows']['temporaries'] for p in report['programs']}
    assert all(v > 0 for v in temporaries.values()), temporaries  # real figures from the compiler, not placeholders
    # The train step holds the student's AdamW moments: twice its float32 parameters, split over 8 devices.
    step = next(p for p in report['programs'] if p['program'] == 'train_step')
    assert step['rows']['optimizer state'] == pytest.approx(2 * step['rows']['student parameters'], rel=0.05)


@pytest.mark.slow
def test_tiny_config_fits_a_small_tpu_topology():
    pytest.importorskip('libtpu', reason='TPU topologies need libtpu (the tpu and test extras install it)')
    result = run_aot('--topology=v5e:2x2')
    check_every_program_fits(result, 'v5e:2x2 (v5e:2x2, 4 chips)')
    assert '15.75 GiB HBM' in result.stdout


@pytest.mark.slow
def test_offloaded_layer_inputs_are_in_host_memory(tmp_path):
    """`model.remat=offload` keeps each student layer's input in host memory: the compiled TPU program reports at
    least one [rows per chip, P + N, hidden] buffer per layer there; 'full' keeps them on the device (no host)."""
    pytest.importorskip('libtpu', reason='TPU topologies need libtpu (the tpu and test extras install it)')
    host = {}
    for remat in ('full', 'offload'):
        out = tmp_path / f'{remat}.json'
        flags = ('--programs=student_grad', f'--config.model.remat={remat}', '--config.model.scan_layers=true')
        result = run_aot('--topology=v5e:2x2', *flags, f'--json={out}')
        assert result.returncode == 0, result.stdout + result.stderr
        (program,) = json.loads(out.read_text())['programs']
        host[remat] = program['host']
    with open(os.path.join(ROOT, 'tropd_jax', 'assets', 'tiny', 'student', 'config.json')) as f:
        student = json.load(f)
    config = _tiny_config()
    rows_per_chip = config.train.micro_batch_size // 4
    length = config.data.max_prompt_length + config.rollout.max_new_tokens
    layer_input = rows_per_chip * length * student['hidden_size'] * 4  # float32 compute in the tiny config
    assert host['full'] == 0
    assert host['offload'] >= student['num_hidden_layers'] * layer_input, host


@pytest.mark.slow
def test_what_the_trainer_holds_meanwhile_counts_against_the_limit(tmp_path):
    # The student's rollouts share the chips with its optimizer state and the colocated teacher's parameters: a limit
    # the program fits under alone but not with those must fail.
    out = tmp_path / 'aot.json'
    result = run_aot('--topology=cpu:4', '--programs=rollout_student,train_step', f'--json={out}')
    assert result.returncode == 0, result.stdout + result.stderr
    rollout, step = json.loads(out.read_text())['programs']
    held = {k.removeprefix(aot.RESIDENT): v for k, v in rollout['rows'].items() if k.startswith(aot.RESIDENT)}
    assert held == {
        'optimizer state': step['rows']['optimizer state'],
        'teacher parameters': step['rows']['teacher parameters'],
    }
    assert rollout['resident'] == pytest.approx(sum(held.values()))
    between = (rollout['total'] + rollout['resident'] / 2) / aot.GIB
    result = run_aot('--topology=cpu:4', '--programs=rollout_student', f'--hbm_gib={between}')
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'rollout_student:  DOES NOT FIT' in result.stdout


@pytest.mark.slow
def test_a_program_over_the_limit_fails_and_is_named():
    result = run_aot('--topology=cpu:4', '--hbm_gib=0.0001', '--programs=teacher_scoring')
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'teacher_scoring:  DOES NOT FIT' in result.stdout
    assert 'does not fit on cpu:4: teacher_scoring' in result.stderr


@pytest.mark.slow
def test_a_separate_int8_teacher_compiles_on_its_own_devices(tmp_path):
    out = tmp_path / 'aot.json'
    result = run_aot(
        '--topology=cpu:8',
        f'--json={out}',
        '--config.model.teacher_placement=separate',
        '--config.model.teacher_devices=2',
        '--config.model.teacher_quantization=int8',
        '--config.train.prompts_per_step=48',
        '--config.train.micro_batch_size=24',
    )  # 24 rows: 6 + 2 chips
    check_every_program_fits(result, 'cpu:8')
    programs = {p['program']: p for p in json.loads(out.read_text())['programs']}
    for name in ('rollout_teacher', 'teacher_scoring'):
        assert programs[name]['where'] == "the teacher's 2 of 8 chips"
    for name in ('rollout_student', 'student_grad', 'train_step'):
        assert programs[name]['where'] == "the student's 6 of 8 chips"
    # Each side's chips hold only its own model meanwhile: the teacher's rollouts share theirs with nothing.
    assert programs['rollout_teacher']['resident'] == 0
    assert [k for k in programs['rollout_student']['rows'] if k.startswith(aot.RESIDENT)] == [
        aot.RESIDENT + 'optimizer state'
    ]
    # The step holds the teacher's targets, not its parameters; the teacher holds one byte per weight (plus a float32
    # scale per output channel), split over its 2 chips.
    assert 'teacher parameters' not in programs['train_step']['rows']
    assert programs['train_step']['rows']['teacher targets'] > 0
    with open(os.path.join(ROOT, 'tropd_jax', 'assets', 'tiny', 'teacher', 'config.json')) as f:
        teacher = ModelConfig.from_hf(json.load(f))
    weights = sum(
        x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Decoder(teacher, rngs=nnx.Rngs(0)))))
    )
    assert weights / 2 < programs['teacher_scoring']['rows']['teacher parameters'] < 1.1 * weights / 2
