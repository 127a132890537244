#!/usr/bin/env bash
# TrOPD on a Cloud TPU VM pod slice (configs/math.py): the same command on every worker, at once. With
# --distributed, tropd_jax.main calls jax.distributed.initialize(), which finds the other workers by itself on TPU VMs.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a \
#   STUDENT=/mnt/ckpt/DeepSeek-R1-Distill-Qwen-1.5B TEACHER=/mnt/ckpt/Skywork-OR1-Math-7B \
#   TRAIN_DATA=/mnt/data/openthoughts3_math.jsonl WORKDIR=/mnt/runs/math \
#   launch/tpu_pod.sh [--config.FIELD=VALUE ...]
#
# STUDENT, TEACHER, TRAIN_DATA, EVAL_DATA: as in launch/single_gpu.sh. Every worker needs the repository at
# ~/REPO_DIR, and the checkpoints, data and WORKDIR at the same paths (e.g. a Filestore or gcsfuse mount):
# checkpoints are written by every worker, logs by worker 0. PROJECT selects the Google Cloud project.
# SETUP=1 first copies this checkout to every worker and installs it with the TPU build of JAX (and gs:// support).
# DRY_RUN=1 prints the gcloud commands instead of running them.
#
# The run is detached: each worker starts it with nohup (setsid) and returns at once, so closing this terminal or a
# dropped ssh connection does not stop it. Each worker writes its own log, ~/REPO_DIR/LOG_DIR/RUN.log (LOG_DIR
# default logs, RUN default tropd), and the process id next to it (RUN.pid). The same script then follows and stops
# the run (same TPU_NAME, ZONE, REPO_DIR, LOG_DIR, RUN):
#   ACTION=logs   launch/tpu_pod.sh   # follow worker 0's log (WORKER=3 for another; Ctrl-C stops following only)
#   ACTION=status launch/tpu_pod.sh   # on every worker: running or not, and the last lines of its log
#   ACTION=stop   launch/tpu_pod.sh   # SIGTERM on every worker: the step is finished, checkpointed, then exit 0
#
# Preemption: a spot / preemptible slice is reclaimed with SIGTERM; every worker stops after the same step, writes
# its checkpoint and exits 0. To resume, recreate the slice and run this script again with the same WORKDIR (SETUP=1
# on a new slice): training continues from that checkpoint. WORKDIR must outlive the slice, so use a bucket
# (WORKDIR=gs://BUCKET/runs/math) or a Filestore mount, never a worker's own disk. A worker that dies or hangs makes
# the others exit within --heartbeat_timeout_seconds (default 100) instead of waiting in a collective.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: what SETUP copies, and where configs/ lives

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
WORKDIR="${WORKDIR:-runs/math_tpu}"
CONFIG="${CONFIG:-configs/math.py}"
REPO_DIR="${REPO_DIR:-tropd_jax}"  # relative to the home directory on each worker
PYTHON="${PYTHON:-python3}"
ACTION="${ACTION:-start}"
LOG_DIR="${LOG_DIR:-logs}"  # relative to ~/REPO_DIR on each worker (its own disk)
RUN="${RUN:-tropd}"
log="${LOG_DIR}/${RUN}.log"
pid="${LOG_DIR}/${RUN}.pid"

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --worker=all ${PROJECT:+--project="$PROJECT"})

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

case "$ACTION" in
  start) ;;
  logs)
    run "${tpu_vm[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker="${WORKER:-0}" ${PROJECT:+--project="$PROJECT"} \
      --command="tail -n 100 -F ~/${REPO_DIR}/${log}"
    exit 0 ;;
  status)
    run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="cd ~/${REPO_DIR} && \
if kill -0 \$(cat ${pid} 2>/dev/null) 2>/dev/null; then echo \$(hostname): running; \
else echo \$(hostname): not running; fi; tail -n 3 ${log}"
    exit 0 ;;
  stop)
    run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="cd ~/${REPO_DIR} && kill -TERM \$(cat ${pid})"
    exit 0 ;;
  *)
    echo "ACTION=$ACTION is not one of start, logs, status, stop" >&2
    exit 2 ;;
esac

if [[ "${SETUP:-0}" == 1 ]]; then
  run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="mkdir -p ~/${REPO_DIR}"
  run "${tpu_vm[@]}" scp --recurse pyproject.toml README.md tropd_jax configs "${TPU_NAME}:${REPO_DIR}/" "${where[@]}"
  run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="cd ~/${REPO_DIR} && $PYTHON -m pip install -q -e '.[tpu,gcs]'"
fi

main=(
  "$PYTHON" -m tropd_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed
  ${STUDENT:+--config.model.student_path="$STUDENT"}
  ${TEACHER:+--config.model.teacher_path="$TEACHER"}
  ${TRAIN_DATA:+--config.data.train_path="$TRAIN_DATA"}
  ${EVAL_DATA:+--config.eval.path="$EVAL_DATA"}
  "$@"
)
# Detached: the worker's shell returns once the run has started; the run keeps going without this terminal.
run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="cd ~/${REPO_DIR} && mkdir -p ${LOG_DIR} && \
setsid nohup ${main[*]@Q} > ${log} 2>&1 < /dev/null & echo \$! > ${pid}"
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  echo "started on every worker of $TPU_NAME; each logs to ~/${REPO_DIR}/${log}. Follow worker 0 with:"
  echo "  ACTION=logs TPU_NAME=$TPU_NAME ZONE=$ZONE launch/tpu_pod.sh   (ACTION=status, ACTION=stop likewise)"
fi
