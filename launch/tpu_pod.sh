#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice: create (or reuse) it, install clipjax on every worker,
# run `clipjax train` on all workers at once, stream the logs, delete it when done.
#
#   TPU_NAME=clip-b16 ZONE=us-west4-a ACCELERATOR=v5litepod-256 \
#     launch/tpu_pod.sh all configs/clip_vit_b16.py gs://bucket/runs/b16 [--config.k=v ...]
#
# Steps (each can be run alone): create | setup | train CONFIG WORKDIR [overrides] | logs |
# ssh CMD | delete | all CONFIG WORKDIR [overrides] (create + setup + train) |
# clipjax ARGS... (any clipjax command on every worker at once, e.g.
#   launch/tpu_pod.sh clipjax data score --model gs://b/runs/b32 --shards 'gs://b/pool/{00000..09999}.tar' --out gs://b/scores
# : each worker scores its own shards; jax.distributed finds the others).
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5litepod-256, v5p-128, v4-64),
# RUNTIME (TPU VM software version), PROJECT, SPOT=1 (spot VMs), PREEMPTIBLE=1,
# QUEUED=1 (queued resources: wait for capacity), DETACH=1 (train in the background and
# return; see `logs`), DRY_RUN=1 (print the gcloud commands instead of running them).
# jax.distributed.initialize() finds the other workers by itself on TPU VMs.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-clipjax}
LOG=${LOG:-clipjax-train.log}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi
}

gcloud_tpu() {
  # shellcheck disable=SC2086
  run gcloud compute tpus "$@" --zone="$ZONE" $PROJECT_FLAG
}

on_all_workers() {
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker=all --command="$1"
}

exists() {
  [ "${DRY_RUN:-0}" = 1 ] && return 1
  # shellcheck disable=SC2086
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1
}

create() {
  if exists; then echo "reusing TPU VM $TPU_NAME"; return; fi
  local capacity=()
  [ "${SPOT:-0}" = 1 ] && capacity+=(--spot)
  [ "${PREEMPTIBLE:-0}" = 1 ] && capacity+=(--preemptible)
  if [ "${QUEUED:-0}" = 1 ]; then
    gcloud_tpu queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${capacity[@]}"
    [ "${DRY_RUN:-0}" = 1 ] && return
    echo "waiting for queued resource $TPU_NAME to become ACTIVE ..."
    until [ "$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
        ${PROJECT_FLAG} --format='value(state.state)')" = ACTIVE ]; do sleep 30; done
  else
    gcloud_tpu tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${capacity[@]}"
  fi
}

setup() {
  # Ship the committed tree (not local junk), then install exactly '.[tpu]' on every worker:
  # jax[tpu] + gcsfs (gs:// workdirs and shards); the CLIP BPE vocabulary ships inside
  # clipjax. tests/test_install_tpu.py installs the same into a fresh venv and trains.
  local tarball=/tmp/clipjax-src.tar.gz
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  gcloud_tpu tpu-vm scp "$tarball" "$TPU_NAME:clipjax-src.tar.gz" --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf clipjax-src.tar.gz -C $REMOTE_DIR && \
cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q '.[tpu]'"
}

train() {
  local config=${1:?train needs CONFIG WORKDIR}
  local workdir=${2:?train needs CONFIG WORKDIR}
  shift 2
  local cmd="cd $REMOTE_DIR && .venv/bin/clipjax train --config $config --workdir $workdir $*"
  if [ "${DETACH:-0}" = 1 ]; then
    on_all_workers "nohup bash -c '$cmd' > $LOG 2>&1 &"
    echo "training in the background; follow it with: $0 logs"
  else
    on_all_workers "$cmd 2>&1 | tee $LOG"
  fi
}

clipjax_on_all() {
  local quoted
  quoted=$(printf "%q " "$@")
  on_all_workers "cd $REMOTE_DIR && .venv/bin/clipjax $quoted 2>&1 | tee $LOG"
}

logs() {
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --worker=0 --command="tail -n 100 -f $LOG"
}

delete() {
  if [ "${QUEUED:-0}" = 1 ]; then
    gcloud_tpu queued-resources delete "$TPU_NAME" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$TPU_NAME" --quiet
  fi
}

step=${1:-}
shift || true
case "$step" in
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  logs) logs ;;
  ssh) on_all_workers "$*" ;;
  delete) delete ;;
  all) create; setup; train "$@" ;;
  clipjax) clipjax_on_all "$@" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
