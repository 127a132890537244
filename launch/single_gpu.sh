#!/usr/bin/env bash
# TrOPD on one GPU: the paper's math recipe (configs/math.py) with the memory savers one 80 GB card needs.
#
#   STUDENT=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B TEACHER=/ckpt/Skywork-OR1-Math-7B \
#   TRAIN_DATA=/data/openthoughts3_math.jsonl WORKDIR=runs/math_1gpu launch/single_gpu.sh [--config.FIELD=VALUE ...]
#
# STUDENT / TEACHER are local Hugging Face checkpoint directories; TRAIN_DATA a JSONL / Parquet file of
# {"problem", "answer"}; EVAL_DATA (optional) a JSONL evaluated during training. Unset ones keep configs/math.py's
# values. Extra arguments are config overrides for tropd_jax.main, e.g. --config.loss.method=opd. Running the same
# command again resumes from the latest checkpoint in WORKDIR. DRY_RUN=1 prints the command instead of running it.
# Install once with: pip install -e ".[gpu]". For one node of 8 GPUs use launch/gpu_node.sh (micro_batch_size=2
# here is not a multiple of 8 devices).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: configs/ paths are relative to it

WORKDIR="${WORKDIR:-runs/math_single_gpu}"
CONFIG="${CONFIG:-configs/math.py}"
PYTHON="${PYTHON:-python}"

command=(
  "$PYTHON" -m tropd_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  ${STUDENT:+--config.model.student_path="$STUDENT"}
  ${TEACHER:+--config.model.teacher_path="$TEACHER"}
  ${TRAIN_DATA:+--config.data.train_path="$TRAIN_DATA"}
  ${EVAL_DATA:+--config.eval.path="$EVAL_DATA"}
  # One card (sizes estimated for 80 GB, not measured): configs/math.py already runs the teacher and the student's
  # activations in bfloat16 and uses the fused loss; here rollouts are generated 16 prompts (64 sequences) at a
  # time so the KV cache stays near 15 GB, and micro-batches hold 2 sequences. The global batch (128 prompts x 4
  # rollouts) and every other recipe value stay the paper's.
  --config.rollout.batch_size=16
  --config.train.micro_batch_size=2
  "$@"
)

# Let XLA take most of the card: rollouts (KV cache) and the train step run one after the other.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
else
  exec "${command[@]}"
fi
