"""launch/: the scripts are valid bash, and the tropd_jax.main command each one runs parses with the real config.

Each script prints its command with DRY_RUN=1; the SLURM script also runs for real against a stand-in `srun` and
a stand-in Python that records what every task received. The printed arguments are then parsed by tropd_jax.main's
own flags (config file + overrides) and the config is validated, without loading any checkpoint.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / 'launch').iterdir())
ENV = {
    'STUDENT': '/ckpt/student dir',
    'TEACHER': '/ckpt/teacher',
    'TRAIN_DATA': '/data/train.jsonl',
    'WORKDIR': '/runs/math',
}

PARSE = """
import json, sys
num_devices = int(sys.argv[1])
from absl import flags
from tropd_jax import config as config_lib, main  # main defines the flags
sys.argv = ['tropd_jax.main', *json.load(sys.stdin)]  # the config flag reads its overrides from sys.argv
flags.FLAGS(sys.argv)
config = flags.FLAGS.config
config_lib.validate_config(config, num_devices=num_devices, check_paths=False)
print(json.dumps(dict(workdir=flags.FLAGS.workdir, student=config.model.student_path,
                      teacher=config.model.teacher_path, train=config.data.train_path, method=config.loss.method,
                      steps=config.train.steps, micro_batch_size=config.train.micro_batch_size,
                      distributed=flags.FLAGS.distributed, coordinator=flags.FLAGS.coordinator_address,
                      num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id,
                      heartbeat_timeout=flags.FLAGS.heartbeat_timeout_seconds)))
"""


def parse_main_flags(argv: list[str], num_devices: int) -> dict:
    """What tropd_jax.main makes of `argv` (its arguments after `-m tropd_jax.main`) on `num_devices` devices."""
    result = subprocess.run(
        [sys.executable, '-c', PARSE, str(num_devices)],
        input=json.dumps(argv),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def main_args(words: list[str]) -> list[str]:
    i = words.index('tropd_jax.main')
    assert words[i - 1] == '-m'
    return words[i + 1 :]


def dry_run(script: str, *args: str, **env) -> list[str]:
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, 'DRY_RUN': '1', **env},
        cwd='/',
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'configs/math.py' in script.read_text()


def test_single_gpu_command_parses():
    (line,) = dry_run('single_gpu.sh', '--config.loss.method=opd')
    parsed = parse_main_flags(main_args(shlex.split(line)), num_devices=1)
    assert parsed['student'] == ENV['STUDENT'] and parsed['teacher'] == ENV['TEACHER']
    assert parsed['train'] == ENV['TRAIN_DATA'] and parsed['workdir'] == ENV['WORKDIR']
    assert parsed['method'] == 'opd' and parsed['steps'] == 200  # the paper's recipe, one override away
    assert parsed['micro_batch_size'] == 2 and parsed['distributed'] is False


def test_tpu_pod_runs_the_same_command_on_every_worker():
    lines = dry_run('tpu_pod.sh', '--config.train.steps=7', TPU_NAME='pod', ZONE='zone-a', SETUP='1')
    assert len(lines) == 4  # mkdir, copy, install, run
    words = shlex.split(lines[-1])
    assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
    assert '--worker=all' in words and '--zone=zone-a' in words
    (remote,) = [w.split('=', 1)[1] for w in words if w.startswith('--command=')]
    assert remote.startswith('cd ~/tropd_jax && mkdir -p logs && ')
    remote_words = shlex.split(remote)
    # Detached: started with nohup in its own session, output to the worker's log, its pid written beside it.
    start = remote_words.index('nohup')
    assert remote_words[start - 1] == 'setsid'
    end = remote_words.index('>')
    assert remote_words[end : end + 4] == ['>', 'logs/tropd.log', '2>&1', '<']
    assert remote.endswith('& echo $! > logs/tropd.pid')
    parsed = parse_main_flags(main_args(remote_words[start + 1 : end]), num_devices=16)
    assert parsed['distributed'] is True and parsed['steps'] == 7 and parsed['student'] == ENV['STUDENT']
    assert '--worker=all' in shlex.split(lines[1])  # the copy goes to every worker too


@pytest.mark.parametrize(
    'action, worker, remote',
    [
        ('logs', '--worker=0', 'tail -n 100 -F ~/tropd_jax/logs/run7.log'),
        ('stop', '--worker=all', 'cd ~/tropd_jax && kill -TERM $(cat logs/run7.pid)'),
    ],
)
def test_tpu_pod_follows_and_stops_the_detached_run(action, worker, remote):
    (line,) = dry_run('tpu_pod.sh', TPU_NAME='pod', ZONE='zone-a', ACTION=action, RUN='run7')
    words = shlex.split(line)
    assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and worker in words
    assert f'--command={remote}' in words
    (line,) = dry_run('tpu_pod.sh', TPU_NAME='pod', ZONE='zone-a', ACTION='status')
    (status,) = [w for w in shlex.split(line) if w.startswith('--command=')]
    assert 'kill -0 $(cat logs/tropd.pid' in status and status.endswith('tail -n 3 logs/tropd.log')


def test_gpu_node_command_parses_on_eight_gpus():
    (line,) = dry_run('gpu_node.sh', '--config.loss.method=opd')
    parsed = parse_main_flags(main_args(shlex.split(line)), num_devices=8)  # validates the mesh and micro-batch
    assert parsed['student'] == ENV['STUDENT'] and parsed['workdir'] == ENV['WORKDIR']
    assert parsed['micro_batch_size'] == 16 and parsed['method'] == 'opd' and parsed['distributed'] is False
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'gpu_node.sh')],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, 'DRY_RUN': '1', 'MICRO_BATCH': '12'},
    )
    assert result.returncode == 2 and 'MICRO_BATCH=12 must be a multiple of GPUS=8' in result.stderr


def test_slurm_asks_for_sigterm_before_the_time_limit():
    text = (ROOT / 'launch' / 'slurm_gpu.sbatch').read_text()
    (warning,) = [line.split('=', 1)[1] for line in text.splitlines() if line.startswith('#SBATCH --signal=')]
    signal_name, seconds = warning.split('@')
    assert signal_name == 'TERM' and int(seconds) >= 60  # without B:, every task is signalled, not the batch shell
    assert '--heartbeat_timeout_seconds' in text


def test_slurm_gives_every_task_its_process_index(tmp_path):
    # Stand-ins: `scontrol` names the nodes, `srun` starts 4 tasks (2 nodes x 2) the way SLURM sets their variables,
    # and "python" records its arguments and the JAX variables it was started with.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text("#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / 'srun').write_text(
        '#!/usr/bin/env bash\n'
        '[[ $1 == --kill-on-bad-exit=1 ]] && shift\n'
        'for id in 0 1 2 3; do SLURM_PROCID=$id SLURM_LOCALID=$((id % 2)) "$@" || exit 1; done\n'
    )
    record = tmp_path / 'tasks.jsonl'
    (bin_dir / 'fake_python').write_text(
        f'#!{sys.executable}\nimport json, os, sys\n'
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps(dict(argv=sys.argv[1:], local=os.environ.get('JAX_LOCAL_DEVICE_IDS'))) + '\\n')\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        **ENV,
        'PATH': f'{bin_dir}:{os.environ["PATH"]}',
        'PYTHON': 'fake_python',
        'SLURM_JOB_NODELIST': 'node-[a-b]',
        'SLURM_NTASKS': '4',
        'SLURM_NTASKS_PER_NODE': '2',
        'SLURM_SUBMIT_DIR': str(ROOT),
    }
    result = subprocess.run(
        [
            'bash',
            str(ROOT / 'launch' / 'slurm_gpu.sbatch'),
            '--config.loss.method=tropd_clip',
            '--heartbeat_timeout_seconds=60',
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    tasks = [json.loads(line) for line in record.read_text().splitlines()]
    assert [t['local'] for t in tasks] == ['0', '1', '0', '1']  # two tasks per node: one GPU each
    for task_id, task in enumerate(tasks):
        assert task['argv'][:2] == ['-m', 'tropd_jax.main']
        if task_id in (0, 3):  # parsing is slow-ish; two tasks are enough to see the per-task index
            parsed = parse_main_flags(task['argv'][2:], num_devices=16)
            assert parsed['process_id'] == task_id and parsed['num_processes'] == 4
            assert parsed['coordinator'] == 'node-a:12355' and parsed['method'] == 'tropd_clip'
            assert parsed['heartbeat_timeout'] == 60
