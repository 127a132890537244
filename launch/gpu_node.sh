#!/usr/bin/env bash
# TrOPD on one node of 8 GPUs (configs/math.py): one process that owns every GPU of the node.
#
#   STUDENT=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B TEACHER=/ckpt/Skywork-OR1-Math-7B \
#   TRAIN_DATA=/data/openthoughts3_math.jsonl WORKDIR=runs/math_8gpu launch/gpu_node.sh [--config.FIELD=VALUE ...]
#
# STUDENT, TEACHER, TRAIN_DATA, EVAL_DATA: as in launch/single_gpu.sh (unset ones keep configs/math.py's values).
# GPUS (default 8) is the number of GPUs the process uses (CUDA_VISIBLE_DEVICES picks which).
# The mesh is the recipe's: FSDP over every GPU (mesh.fsdp=-1), so parameters, optimizer state, rollouts and
# micro-batches are split 8 ways. train.micro_batch_size must be a multiple of the GPUs: the recipe's 16 packed rows
# is (2 per GPU). Attention (model.attention=auto): the rollouts' prefill runs cuDNN flash attention; the recipe packs
# its rollouts (train.packing=True), and packed rows carry segment ids, which cuDNN does not take, so the teacher's
# scoring and the student's train step run the blockwise kernel (docs/benchmarks.md has the train step with both on
# an H200). Running the same command again resumes from the latest checkpoint in WORKDIR; SIGTERM (kill, a
# scheduler) makes the run write a checkpoint of the step it finishes and exit 0.
# DRY_RUN=1 prints the command instead of running it. Install once with: pip install -e ".[gpu]"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: configs/ paths are relative to it

WORKDIR="${WORKDIR:-runs/math_gpu_node}"
CONFIG="${CONFIG:-configs/math.py}"
PYTHON="${PYTHON:-python}"
GPUS="${GPUS:-8}"
MICRO_BATCH="${MICRO_BATCH:-16}"  # packed rows per micro-batch: a multiple of GPUS

if (( MICRO_BATCH % GPUS )); then
  echo "MICRO_BATCH=$MICRO_BATCH must be a multiple of GPUS=$GPUS (each GPU takes whole rows)" >&2
  exit 2
fi

command=(
  "$PYTHON" -m tropd_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  ${STUDENT:+--config.model.student_path="$STUDENT"}
  ${TEACHER:+--config.model.teacher_path="$TEACHER"}
  ${TRAIN_DATA:+--config.data.train_path="$TRAIN_DATA"}
  ${EVAL_DATA:+--config.eval.path="$EVAL_DATA"}
  --config.mesh.data=1 --config.mesh.fsdp="$GPUS" --config.mesh.tensor=1
  --config.train.micro_batch_size="$MICRO_BATCH"
  "$@"
)

# Let XLA take most of each card: rollouts (KV cache) and the train step run one after the other.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
else
  exec "${command[@]}"
fi
