#!/usr/bin/env bash
# Start a Docker engine for lmforge's container tests (and `lmforge run --runner docker`)
# on a machine that has none running, the way .ci/run starts PostgreSQL. Idempotent: an
# engine already answering on the socket is left as it is.
#
#   scripts/dockerd.sh            # then: export DOCKER_HOST=unix:///run/lmforge-docker/docker.sock
#
# It installs Debian's docker.io (the engine) and debootstrap (the tests make their base image
# with it: no registry is reachable here) when they are missing, and starts dockerd as root with
# its own data root, exec root, socket and pid file, apart from any other engine. Without
# iptables or a bridge (the sandbox allows neither) containers use host networking, which is
# what the tests want: a container reaches moto, MLflow and PostgreSQL on 127.0.0.1.
# The data root persists, so built images are reused by the next run.
set -euo pipefail

root=${LMFORGE_DOCKER_ROOT:-/var/lib/lmforge-docker}
run=${LMFORGE_DOCKER_RUN:-/run/lmforge-docker}
socket=$run/docker.sock
export DOCKER_HOST=unix://$socket

if docker version >/dev/null 2>&1; then
    echo "lmforge: a Docker engine answers on $socket"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "lmforge: starting dockerd needs root (no engine answers on $socket)" >&2
    exit 1
fi
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
mkdir -p "$root" "$run"
# setsid + nohup: the engine outlives this script on purpose (a service, like PostgreSQL).
setsid nohup dockerd --iptables=false --bridge=none --storage-driver overlay2 \
    --data-root "$root" --exec-root "$run/exec" --host "unix://$socket" --pidfile "$run/docker.pid" \
    >"$run/dockerd.log" 2>&1 < /dev/null &
for _ in $(seq 60); do
    if docker version >/dev/null 2>&1; then
        echo "lmforge: started dockerd on $socket (log: $run/dockerd.log)"
        exit 0
    fi
    sleep 0.5
done
echo "lmforge: dockerd did not answer on $socket within 30 s; see $run/dockerd.log" >&2
exit 1
