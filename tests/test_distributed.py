"""Two processes joined with `jax.distributed` on localhost run the trainer together (`tropd_jax.main`).

Each process owns one CPU device; the mesh spans both (fsdp=2), so parameters, optimizer state and rollouts are
split across processes and every step needs cross-process collectives. Process 0 alone writes the metrics and the
exported student; both take part in the checkpoints.

A separate teacher (`model.teacher_placement=separate`) on the devices of the other process (2 processes x 2
devices) gives the same run as one process with 4 devices.

Interrupted runs: a SIGTERM to one process stops both after the same step with a checkpoint (JAX's preemption
service), a worker that stops responding makes the other exit (jax.distributed's heartbeat timeout) instead of
waiting in a collective, and in both cases the same command resumes and ends bit-identical to the uninterrupted run.
"""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train import ROOT, curve, make_tiny_pair, params_of, run_args, run_main

pytestmark = pytest.mark.slow  # two-process runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


STEPS = 6  # enough that a preemption notice is agreed on before the run ends
PAUSE = 5.0  # seconds the signalled step lasts (see SIGNAL_AT_STEP)

# `tropd_jax.main` in a process that sends itself SIGNAL when it reaches step index STEP (before its rollouts), then
# spends PAUSE seconds in that step. The tiny model's steps take a fraction of a second, while JAX's preemption service
# needs a few round trips through the coordination service (notice, every process's step, a barrier) before the stop
# step is agreed; on a loaded host that can outlast the rest of a short run. Real steps take seconds to minutes, and the
# pause stands in for one.
SIGNAL_AT_STEP = """
import os, signal, sys, time
from absl import app
from tropd_jax import main, train
rollouts = train.make_rollouts
def make_rollouts(*args, **kwargs):
    if args[4] == {step}:
        os.kill(os.getpid(), signal.{signal})
        time.sleep({pause})
    return rollouts(*args, **kwargs)
train.make_rollouts = make_rollouts
sys.argv[0] = 'tropd_jax.main'
app.run(main.main, flags_parser=main.parse_flags)
"""


def start_processes(pair, workdir, cache, *, extra=(), signal_in_process_1=None):
    """Starts the two processes of a run; `signal_in_process_1=(signal name, step index)` makes process 1 send
    itself that signal at that step."""
    port = free_port()
    env = {'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': cache}
    processes = []
    for i in range(2):
        flags = (
            run_args(pair, workdir, train__steps=STEPS)
            + list(extra)
            + [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}']
        )
        if i == 1 and signal_in_process_1 is not None:
            name, step = signal_in_process_1
            code = SIGNAL_AT_STEP.format(signal=name, step=step, pause=PAUSE)
            processes.append(
                subprocess.Popen(
                    [sys.executable, '-c', code, *flags],
                    cwd=ROOT,
                    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        else:
            processes.append(run_main(flags, env=env))
    return processes


def finish(processes):
    """Waits for both processes; asserts they exited 0 and returns their outputs."""
    outputs = [p.communicate()[0] for p in processes]
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f'process {i}:\n{out[-3000:]}'
    return outputs


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    return make_tiny_pair(str(tmp_path_factory.mktemp('pair')))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('compile_cache'))


@pytest.fixture(scope='module')
def two_process_run(pair, cache, tmp_path_factory):
    """An uninterrupted run of two processes; its workdir."""
    workdir = str(tmp_path_factory.mktemp('two_processes'))
    finish(start_processes(pair, workdir, cache))
    return workdir


def assert_same_run(workdir, reference):
    assert curve(workdir) == curve(reference)
    for a, b in zip(params_of(os.path.join(workdir, 'hf')), params_of(os.path.join(reference, 'hf'))):
        np.testing.assert_array_equal(a, b)


def test_two_processes_complete_a_short_run(two_process_run, pair):
    workdir = two_process_run
    steps = curve(workdir)
    assert [r['step'] for r in steps] == list(range(1, STEPS + 1))  # one writer: every step logged once
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        assert sum(1 for line in f) == STEPS + 1  # the data report and the steps, nothing from process 1
    assert all(r['skipped'] == 0 and r['num_tokens'] > 0 for r in steps)
    kept = sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int)
    assert kept == [str(s) for s in range(STEPS - 2, STEPS + 1)]  # the last 3 (checkpoint.keep)
    exported = params_of(os.path.join(workdir, 'hf'))
    assert any((a != b).any() for a, b in zip(exported, params_of(pair['student'])))


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(two_process_run, pair, cache, tmp_path):
    workdir = str(tmp_path / 'run')
    # Only process 1 is signalled, as it enters step 2; checkpoints otherwise only at the end. The notice reaches
    # process 0 through the coordination service, and the two agree on a step to stop after: the first one after
    # the notice that neither has passed.
    outputs = finish(
        start_processes(
            pair, workdir, cache, extra=['--config.checkpoint.every_steps=0'], signal_in_process_1=('SIGTERM', 1)
        )
    )
    stops = [re.findall(r'preempted: checkpoint of step (\d+) written', out) for out in outputs]
    assert stops[0] and stops[0] == stops[1], '\n\n'.join(out[-3000:] for out in outputs)
    stop = int(stops[0][0])
    assert 2 <= stop < STEPS  # stopped early, and not before the signal
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stop)]  # written by the preemption alone
    assert not os.path.exists(os.path.join(workdir, 'hf'))
    outputs = finish(start_processes(pair, workdir, cache, extra=['--config.checkpoint.every_steps=0']))
    assert all(f'resuming from checkpoint step {stop}' in out for out in outputs)
    assert_same_run(workdir, two_process_run)


SEPARATE = dict(
    model__teacher_placement='separate', model__teacher_devices=2, train__steps=2, checkpoint__every_steps=0
)


def test_a_separate_teacher_on_the_other_process_gives_the_one_process_curve(pair, cache, tmp_path):
    """2 processes x 2 CPU devices, the teacher on process 1's two and the student on process 0's: the teacher's
    prefixes, the rollouts it scores and its targets cross between processes (`sharding.transfer`), process 1 holds
    no student array (it reads the metrics from a copy on every device) and the checkpoint is written from arrays
    spread over both. The metrics curve equals, bit for bit, that of the same config in one process with 4 devices:
    each mesh runs the same programs on the same shapes, and the transfers copy values exactly."""
    one = str(tmp_path / 'one')
    output = finish(
        [
            run_main(
                run_args(pair, one, **SEPARATE),
                env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_COMPILATION_CACHE_DIR': cache},
            )
        ]
    )[0]
    assert 'separate teacher on 2 devices of processes [0], student on 2 devices of processes [0]' in output
    two = str(tmp_path / 'two')
    port = free_port()
    outputs = finish(
        [
            run_main(
                run_args(pair, two, **SEPARATE)
                + [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
                env={'XLA_FLAGS': '', 'JAX_NUM_CPU_DEVICES': '2', 'JAX_COMPILATION_CACHE_DIR': cache},
            )
            for i in range(2)
        ]
    )
    assert 'separate teacher on 2 devices of processes [1], student on 2 devices of processes [0]' in outputs[0]
    steps = curve(two)
    assert [r['step'] for r in steps] == [1, 2] and all(r['prefix_length'] > 0 for r in steps)
    assert steps == curve(one)
    assert os.listdir(os.path.join(two, 'checkpoints')) == ['2']
    for a, b in zip(params_of(os.path.join(two, 'hf')), params_of(os.path.join(one, 'hf'))):
        np.testing.assert_array_equal(a, b)


def test_a_hung_worker_ends_the_run_and_the_restart_resumes(two_process_run, pair, cache, tmp_path):
    workdir = str(tmp_path / 'run')
    # Process 1 freezes as it enters step 3 (SIGSTOP: alive, connections open, silent, like a hung host), so
    # process 0 waits in a collective that never completes; the 5 s heartbeat timeout ends it.
    processes = start_processes(
        pair, workdir, cache, extra=['--heartbeat_timeout_seconds=5'], signal_in_process_1=('SIGSTOP', 2)
    )
    out = processes[0].communicate()[0]
    processes[1].kill()
    processes[1].communicate()
    assert processes[0].returncode != 0
    assert 'stopped sending heartbeats' in out and 'Terminating process' in out, out[-3000:]
    assert '1' in os.listdir(os.path.join(workdir, 'checkpoints'))  # written before step 3 started
    outputs = finish(start_processes(pair, workdir, cache))  # the same command, both processes
    assert 'resuming from checkpoint step' in outputs[0]
    assert_same_run(workdir, two_process_run)


EVALUATION = dict(
    eval__path='',  # set per test: the pair's prompts
    eval__every_steps=1,
    eval__samples=2,
    eval__num_problems=6,
    eval__batch_size=4,
    eval__max_new_tokens=8,
    train__steps=2,
    checkpoint__every_steps=0,
)


def evaluations(workdir):
    from tropd_jax import metrics

    rows = metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    return {r['step']: {k: v for k, v in r.items() if k.startswith('eval_')} for r in rows if 'eval_avg_at_k' in r}


@pytest.mark.slow
def test_periodic_evaluation_in_two_processes_gives_the_one_process_figures(pair, cache, tmp_path):
    """Evaluation before training, after each step and at the end, with the student split over two processes
    (fsdp=2, one CPU device each): every process samples its device's rows, both hold every response, process 0
    grades and writes. The figures equal those of one process with two devices (same mesh, same programs, same
    draws)."""
    overrides = dict(EVALUATION, eval__path=pair['train'])
    one = str(tmp_path / 'one')
    finish(
        [
            run_main(
                run_args(pair, one, **overrides),
                env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_COMPILATION_CACHE_DIR': cache},
            )
        ]
    )
    two = str(tmp_path / 'two')
    port = free_port()
    outputs = finish(
        [
            run_main(
                run_args(pair, two, **overrides)
                + [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
                env={'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': cache},
            )
            for i in range(2)
        ]
    )
    assert not any('evaluation is skipped' in out for out in outputs)
    got, want = evaluations(two), evaluations(one)
    assert sorted(got) == [0, 1, 2]
    assert all(r['eval_num_problems'] == 6 and r['eval_k'] == 2 for r in got.values())
    assert all(0 < r['eval_mean_response_length'] <= 8 for r in got.values())
    assert got == want
