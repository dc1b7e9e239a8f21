#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM pod slice: one JAX process per TPU host, all started at once.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b WORKDIR=gs://my-bucket/mae_vit_b \
#     launch/tpu_pod.sh configs/vit_b.py --config.dataset.data_dir=gs://my-bucket/tfds
#
# Ships this checkout (git HEAD) to every host, installs it with JAX for TPU, and runs
# `python -m mae_jax.main --multihost` everywhere (jax.distributed finds the pod by itself).
# WORKDIR must be on GCS so that all hosts see the same checkpoints; rerunning the same
# command resumes from the latest one. Run it inside tmux/screen: closing the ssh session
# stops the job (it restarts from the last checkpoint). Parallelism: the default pmap
# (replicated state) fits ViT-B/L/H on v3/v4/v5 chips; for ViT-2B and larger, or to trade
# state memory for batch, add --config.parallelism=fsdp (README: Scaling). A run resumes in
# any mode and on any slice size. PYTHON names the hosts' interpreter
# (default python3, which TPU VM images have; `python` may be missing there).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a gs:// directory}"
CONFIG="${1:-configs/vit_b.py}"
shift || true
PYTHON="${PYTHON:-python3}"
EXTRA_ARGS=$(printf ' %q' "$@")

cd "$(dirname "$0")/.."
ARCHIVE=$(mktemp /tmp/mae_jax.XXXXXX.tar.gz)
git archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":mae_jax.tar.gz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  rm -rf ~/mae_jax && mkdir -p ~/mae_jax && tar xzf ~/mae_jax.tar.gz -C ~/mae_jax && cd ~/mae_jax
  $PYTHON -m pip install -q -e . 'jax[tpu]'
  $PYTHON -m mae_jax.main --config=$CONFIG --workdir=$WORKDIR --multihost$EXTRA_ARGS"
