#!/usr/bin/env bash
# Run `clipjax train` on an emulated CPU mesh: what a pod does, on a laptop or in CI.
#
#   launch/cpu_mesh.sh mesh CONFIG WORKDIR [--config.k=v ...]          one process, DEVICES devices
#   launch/cpu_mesh.sh multiprocess CONFIG WORKDIR [--config.k=v ...]  NPROC local processes that
#       form one JAX job over 127.0.0.1 (DEVICES devices each), as hosts of a pod would
#
# Settings (environment): DEVICES (default 8 for mesh, 4 for multiprocess), NPROC (2),
# PORT (coordinator port, default a free one), TIMEOUT (seconds, default 900: a bad
# coordinator can hang a process), CLIPJAX (the command, default .venv/bin/clipjax).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLIPJAX=${CLIPJAX:-$REPO/.venv/bin/clipjax}
TIMEOUT=${TIMEOUT:-900}
mode=${1:-}
CONFIG=${2:?usage: cpu_mesh.sh mesh|multiprocess CONFIG WORKDIR [--config.k=v ...]}
WORKDIR=${3:?usage: cpu_mesh.sh mesh|multiprocess CONFIG WORKDIR [--config.k=v ...]}
shift 3
export JAX_PLATFORMS=cpu

case "$mode" in
  mesh)
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-8}"
    exec timeout "$TIMEOUT" "$CLIPJAX" train --config "$CONFIG" --workdir "$WORKDIR" "$@"
    ;;
  multiprocess)
    NPROC=${NPROC:-2}
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-4}"
    PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    pids=()
    for ((i = 0; i < NPROC; i++)); do
      timeout "$TIMEOUT" "$CLIPJAX" train --config "$CONFIG" --workdir "$WORKDIR" \
        --config.runtime.distributed=on --config.runtime.coordinator_address=127.0.0.1:"$PORT" \
        --config.runtime.num_processes="$NPROC" --config.runtime.process_id="$i" "$@" \
        > >(sed "s/^/[process $i] /") 2>&1 &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  *)
    sed -n '2,11p' "$0"
    exit 2
    ;;
esac
