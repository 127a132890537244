"""Tests for the config schema, the recipes in configs/, and `validate_config`'s one-error-per-problem messages."""

import importlib.util
import json
import pathlib

import ml_collections
import pytest

from tropd_jax import config as config_lib
from tropd_jax import losses

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_recipe(name, arg=None):
    spec = importlib.util.spec_from_file_location(f'recipe_{name}', ROOT / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def valid(tmp_path):
    """A small valid config whose paths exist (checkpoint directories need only their config.json to validate)."""
    for name, vocab in (('student', 120), ('teacher', 128)):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'config.json').write_text(json.dumps({'model_type': 'qwen3', 'vocab_size': vocab}))
    (tmp_path / 'train.jsonl').write_text('{"problem": "1+1", "answer": "2"}\n')
    config = config_lib.default_config()
    config.model.student_path = str(tmp_path / 'student')
    config.model.teacher_path = str(tmp_path / 'teacher')
    config.data.train_path = str(tmp_path / 'train.jsonl')
    config.rollout.num_rollouts = 2
    config.rollout.max_new_tokens = 16
    config.train.steps = 4
    config.train.prompts_per_step = 4
    config.train.micro_batch_size = 4
    config.loss.k = 8
    config_lib.validate_config(config, num_devices=4)
    return config


def test_recipes_load_and_validate():
    math_config = load_recipe('math')
    # The paper's recipe (SPEC.md "Paper recipe").
    assert (math_config.train.steps, math_config.optim.learning_rate) == (200, 5e-6)
    assert math_config.optim.schedule == 'constant'
    assert (math_config.loss.k, math_config.loss.beta, math_config.loss.method) == (64, 0.001, 'tropd')
    assert (math_config.train.prompts_per_step, math_config.rollout.num_rollouts) == (128, 4)
    assert (math_config.rollout.max_new_tokens, math_config.rollout.temperature) == (8096, 1.0)
    assert 'DeepSeek-R1-Distill-Qwen-1.5B' in math_config.model.student_path
    assert 'Skywork-OR1-Math-7B' in math_config.model.teacher_path
    multidomain = load_recipe('multidomain')
    assert 'Qwen3' in multidomain.model.student_path and 'Nemotron' in multidomain.model.teacher_path
    assert 'Skywork-OR1-7B' in load_recipe('multidomain', 'deepseek').model.teacher_path
    assert math_config.train.packing and multidomain.train.packing  # the paper's lengths: 77% padding unpacked
    for config in (
        math_config,
        multidomain,
        load_recipe('math', 'tiny'),
        load_recipe('tiny'),
        load_recipe('tiny_long'),
    ):
        config_lib.validate_config(config, num_devices=1, check_paths=False)
    # The prompt template leaves a literal \boxed{} for the model to fill.
    assert math_config.data.prompt_template.format(prompt='P').endswith('within \\boxed{}.')
    with pytest.raises(ValueError, match="unknown configs/math.py variant 'huge'"):
        load_recipe('math', 'huge')


def test_every_method_is_one_field():
    config = load_recipe('math')
    for method in losses.METHODS:
        config.loss.method = method
        config_lib.validate_config(config, num_devices=8, check_paths=False)


def test_exact_fused_divergences_need_a_colocated_teacher_and_the_tail_excludes_renormalising():
    config = load_recipe('math')
    config.loss.method, config.model.teacher_placement = 'jsd', 'separate'
    with pytest.raises(ValueError, match="loss.method='jsd' with loss.fused=True"):
        config_lib.validate_config(config, num_devices=8, check_paths=False)
    config.loss.fused = False
    config_lib.validate_config(config, num_devices=8, check_paths=False)
    config = load_recipe('math')
    config.loss.topk_tail, config.loss.renormalize = True, True
    with pytest.raises(ValueError, match='topk_tail=True exclude each other'):
        config_lib.validate_config(config, num_devices=8, check_paths=False)


def test_recipes_are_locked():
    config = load_recipe('math')
    with pytest.raises(AttributeError, match='Key "lr" does not exist'):
        config.optim.lr = 1e-3


def test_schema_holds_every_loss_hyperparameter():
    config = config_lib.default_config()
    assert set(losses.DEFAULT_HYPERPARAMETERS) <= set(config.loss.keys())
    assert config_lib.loss_hyperparameters(config.loss) == losses.DEFAULT_HYPERPARAMETERS


def _set(path, value):
    def mutate(config):
        section, name = path.split('.')
        config[section][name] = value

    return mutate


def _add_unknown(config):
    config.loss.unlock()
    config.loss.temperature = 2.0


def _packed_with_teacher_template(config):
    config.train.packing = True
    config.data.teacher_template = 'teacher'


def _remove_config_json(config):
    pathlib.Path(config.model.teacher_path, 'config.json').unlink()


ERRORS = [
    (_add_unknown, ValueError, r"unknown config field 'loss.temperature'; known fields of loss: aggregation"),
    (_set('loss.method', 'grpo'), ValueError, r"loss.method='grpo' is not one of opd, topk_fkl"),
    (_set('loss.jsd_beta', 1.5), ValueError, r'loss: jsd_beta=1.5 must be in \(0, 1\)'),
    (_set('loss.aggregation', 'sum'), ValueError, r"loss: aggregation='sum' must be one of"),
    (_set('loss.k', 121), ValueError, r'loss.k=121 is larger than the vocabulary \(120 tokens\)'),
    (
        _set('train.micro_batch_size', 3),
        ValueError,
        r'train.micro_batch_size=3 does not divide the batch of 8 sequences \(train.prompts_per_step=4 x '
        r'rollout.num_rollouts=2\)',
    ),
    (
        _set('train.micro_batch_size', 2),
        ValueError,
        r'train.micro_batch_size=2 must be a multiple of mesh data x fsdp = 4',
    ),
    (_set('mesh.tensor', 3), ValueError, r'mesh \(data, fsdp, tensor\)=\(1, -1, 3\) cannot fill 4 devices'),
    (_set('mesh.fsdp', 2), ValueError, r'mesh \(data, fsdp, tensor\)=\(1, 2, 1\) needs 2 devices but 4 are available'),
    (_set('mesh.data', -1), ValueError, r'at most one size may be -1'),
    (_set('train.packing_buckets', -1), ValueError, r'train.packing_buckets=-1 must be an integer >= 0'),
    (
        _packed_with_teacher_template,
        ValueError,
        r"train.packing=True cannot be combined with data.teacher_template='teacher'",
    ),
    (_set('rollout.batch_size', 3), ValueError, r'rollout.batch_size=3 must be 0 or divide train.prompts_per_step=4'),
    (_set('rollout.temperature', 0.0), ValueError, r'rollout.temperature=0.0 must be > 0'),
    (_set('rollout.top_p', 1.5), ValueError, r'rollout.top_p=1.5 must be in \(0, 1\]'),
    (
        _set('prefix.max_length', 17),
        ValueError,
        r'prefix.max_length=17 must be -1 or in \[0, rollout.max_new_tokens=16\]',
    ),
    (_set('prefix.schedule', 'step'), ValueError, r"prefix.schedule='step' is not one of"),
    (_set('optim.schedule', 'exponential'), ValueError, r"optim.schedule='exponential' is not one of"),
    (_set('optim.warmup_steps', -1), ValueError, r'optim.warmup_steps=-1 must be >= 0'),
    (_set('optim.learning_rate', 0.0), ValueError, r'optim.learning_rate=0.0 must be > 0'),
    (_set('model.teacher_dtype', 'float16'), ValueError, r"model.teacher_dtype='float16' is not one of"),
    (_set('data.on_bad_record', 'ignore'), ValueError, r"data.on_bad_record='ignore' is not one of \('skip', 'fail'\)"),
    (_set('checkpoint.keep', 0), ValueError, r'checkpoint.keep=0 must be >= 1'),
    (
        _set('data.prompt_template', 'Solve it.'),
        ValueError,
        r"data.prompt_template='Solve it.' must contain \{prompt\} once",
    ),
    (
        _set('data.prompt_template', '{prompt} in \\boxed{}'),
        ValueError,
        r'data.prompt_template=.* is not a format string with only \{prompt\}',
    ),
    (_set('model.student_path', ''), FileNotFoundError, r'model.student_path is empty'),
    (
        _set('model.student_path', '/nonexistent/student'),
        FileNotFoundError,
        r"model.student_path='/nonexistent/student' is not a checkpoint directory \(no config.json there\)",
    ),
    (_remove_config_json, FileNotFoundError, r'model.teacher_path=.* is not a checkpoint directory'),
    (
        _set('data.train_path', '/nonexistent/train.jsonl'),
        FileNotFoundError,
        r"data.train_path='/nonexistent/train.jsonl' does not exist",
    ),
    (
        _set('eval.path', '/nonexistent/eval.jsonl'),
        FileNotFoundError,
        r"eval.path='/nonexistent/eval.jsonl' does not exist",
    ),
]


@pytest.mark.parametrize('mutate, error, message', ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_config_errors(valid, mutate, error, message):
    mutate(valid)
    with pytest.raises(error, match=message):
        config_lib.validate_config(valid, num_devices=4)


def test_shortening_a_recipe_with_train_steps_alone_clamps_its_warmup(caplog):
    config = load_recipe('tiny')
    assert config.optim.warmup_steps == 10
    config.train.steps = 2
    with caplog.at_level('WARNING'):
        config_lib.validate_config(config, num_devices=1, check_paths=False)
    assert config.optim.warmup_steps == 1
    assert [r.getMessage() for r in caplog.records] == ['optim.warmup_steps=10 clamped to 1 for train.steps=2']
    config.train.steps = 1
    config_lib.validate_config(config, num_devices=1, check_paths=False)
    assert config.optim.warmup_steps == 0
    caplog.clear()
    config_lib.validate_config(config, num_devices=1, check_paths=False)  # a valid warm-up: no warning
    assert not caplog.records


def test_eopd_k_is_checked_against_the_vocabulary(valid):
    valid.loss.method = 'eopd'
    valid.loss.eopd_k = 200
    with pytest.raises(ValueError, match=r'loss.eopd_k=200 is larger than the vocabulary \(120 tokens\)'):
        config_lib.validate_config(valid, num_devices=4)
    valid.loss.method = 'tropd'  # eopd_k is only read by eopd
    config_lib.validate_config(valid, num_devices=4)


def test_mesh_shape_fills_the_free_axis():
    mesh = ml_collections.ConfigDict({'data': 2, 'fsdp': -1, 'tensor': 2})
    assert config_lib.mesh_shape(mesh, 8) == (2, 2, 2)
    assert config_lib.mesh_shape(ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1}), 1) == (1, 1, 1)


def test_prefix_enabled_defaults_to_tropd_methods():
    config = config_lib.default_config()
    for method, expected in (('tropd', True), ('tropd_clip', True), ('opd', False), ('fkl_outlier', False)):
        config.loss.method = method
        assert config_lib.prefix_enabled(config) is expected
    config.loss.method = 'opd'
    config.prefix.enabled = True
    assert config_lib.prefix_enabled(config)
