#!/usr/bin/env bash
# Start a Docker daemon on this machine (none runs by default) and build the gramline image offline.
# Called by .ci/run before the tests; developers can run it too. Idempotent: a running daemon and an
# up-to-date image are reused.
#
#   bash .ci/docker.sh [PYTHON]      # PYTHON: the interpreter with gramline's deps (default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python}"
SOCK=/var/run/docker.sock

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    echo "[docker.sh] apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker version >/dev/null 2>&1; then
    echo "[docker.sh] starting dockerd (no iptables, no bridge: containers use --network host)"
    nohup dockerd --iptables=false --bridge=none >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        [ -S "$SOCK" ] && docker version >/dev/null 2>&1 && break
        sleep 1
    done
    docker version >/dev/null 2>&1 || { echo "[docker.sh] dockerd did not start:"; tail -20 /tmp/dockerd.log; exit 1; }
fi
echo "[docker.sh] daemon $(docker version --format '{{.Server.Version}}') is up"

"$PYTHON" images/build.py
