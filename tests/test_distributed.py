"""Two processes joined with `jax.distributed` on localhost run the trainer together (`tropd_jax.main`).

Each process owns one CPU device; the mesh spans both (fsdp=2), so parameters, optimizer state and rollouts are
split across processes and every step needs cross-process collectives. Process 0 alone writes the metrics and the
exported student; both take part in the checkpoints.
"""

import os
import socket

from test_train import curve, make_tiny_pair, params_of, run_args, run_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_complete_a_short_run(tmp_path):
    pair = make_tiny_pair(str(tmp_path / 'pair'))
    workdir = str(tmp_path / 'run')
    port = free_port()
    env = {'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'cache')}
    processes = [
        run_main(run_args(pair, workdir) + [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                                           f'--process_id={i}'], env=env)
        for i in range(2)
    ]
    outputs = [p.communicate()[0] for p in processes]
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f'process {i}:\n{out[-3000:]}'
    steps = curve(workdir)
    assert [r['step'] for r in steps] == [1, 2, 3]  # one writer: every step logged once
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        assert sum(1 for line in f) == 4  # the data report and 3 steps, nothing from process 1
    assert all(r['skipped'] == 0 and r['num_tokens'] > 0 for r in steps)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2', '3']
    exported = params_of(os.path.join(workdir, 'hf'))
    assert any((a != b).any() for a, b in zip(exported, params_of(pair['student'])))
