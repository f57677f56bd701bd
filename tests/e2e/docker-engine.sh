#!/usr/bin/env bash
# A Docker engine for the compose tests (tests/e2e/test_compose_stack.py), started and stopped by the test
# run itself: `make test` runs pytest through `docker-engine.sh run -- CMD...`.
#
#   docker-engine.sh run -- CMD...   use the engine that answers (DOCKER_HOST or the default socket), else,
#                                    as root, start a private one (no bridge, no iptables: every
#                                    container uses host networking and the tests stay on 127.0.0.1), run
#                                    CMD with DOCKER_HOST pointing at it, stop it, exit with CMD's status.
#                                    When no engine can be had, CMD still runs, with
#                                    PRIVDISTILL_DOCKER_UNAVAILABLE saying why (the test skips with that
#                                    reason, or fails under PRIVDISTILL_CI=1).
#   docker-engine.sh start|stop      the same daemon by hand (start prints the DOCKER_HOST to export).
#
# State: images and volumes in PRIVDISTILL_DOCKER_ROOT (default .cache/docker in the checkout, git-ignored,
# kept between runs so a second run reuses the built layers); sockets and pid in a short folder under /run
# (unix socket paths are limited to 108 bytes). Root is needed to start a daemon; nothing is installed
# here (`make docker-deps` installs docker.io, docker-compose and mmdebstrap as root).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data_root="${PRIVDISTILL_DOCKER_ROOT:-$repo/.cache/docker}"
run_dir="/run/privdistill-docker-$(printf '%s' "$data_root" | sha256sum | cut -c1-10)"
sock="unix://$run_dir/docker.sock"
log="$data_root.log"

answers() {  # does an engine answer at DOCKER_HOST=$1 (empty: the CLI's default)?
  if [ -n "$1" ]; then DOCKER_HOST="$1" timeout 20 docker info >/dev/null 2>&1
  else timeout 20 docker info >/dev/null 2>&1; fi
}

start() {  # prints the DOCKER_HOST of a running private daemon, or why not (exit 3)
  if [ -f "$run_dir/dockerd.pid" ] && answers "$sock"; then echo "$sock"; return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "not root: cannot start a Docker daemon (run as root, or start one and set DOCKER_HOST)" >&2; return 3
  fi
  for b in dockerd docker; do
    command -v "$b" >/dev/null || { echo "$b not installed: make docker-deps (as root)" >&2; return 3; }
  done
  mkdir -p "$data_root" "$run_dir"
  # the storage driver dockerd picks (overlay2 where the kernel and filesystem allow, else vfs: slower, full
  # copies), or PRIVDISTILL_DOCKER_STORAGE
  driver=()
  [ -z "${PRIVDISTILL_DOCKER_STORAGE:-}" ] || driver=(--storage-driver "$PRIVDISTILL_DOCKER_STORAGE")
  dockerd "${driver[@]}" --data-root "$data_root" --exec-root "$run_dir/exec" \
    --pidfile "$run_dir/dockerd.pid" --host "$sock" --bridge=none --iptables=false --ip-masq=false \
    >>"$log" 2>&1 &
  local pid=$! i
  for i in $(seq 1 60); do
    if answers "$sock"; then echo "$sock"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "dockerd exited at start; the end of $log:" >&2; tail -n 15 "$log" >&2; return 3
    fi
    sleep 1
    : "$i"
  done
  echo "dockerd did not answer within 60 s; see $log" >&2
  kill "$pid" 2>/dev/null || true
  return 3
}

stop() {
  [ -f "$run_dir/dockerd.pid" ] || return 0
  local pid i
  pid="$(cat "$run_dir/dockerd.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; : "$i"; done
    kill -0 "$pid" 2>/dev/null && { echo "dockerd $pid still running after 60 s: killing it" >&2; kill -9 "$pid"; }
  fi
  rm -f "$run_dir/dockerd.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  run)
    shift
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || { echo "usage: $0 run -- CMD..." >&2; exit 2; }
    started=""
    whyfile="$(mktemp)"
    if answers "${DOCKER_HOST:-}"; then
      echo "docker-engine: using the engine that answers (${DOCKER_HOST:-default socket})"
    elif host="$(start 2>"$whyfile")"; then
      export DOCKER_HOST="$host"
      started=1
      echo "docker-engine: started a private dockerd at $host (data in $data_root)"
    else
      why="$(tr '\n' ' ' < "$whyfile")"
      export PRIVDISTILL_DOCKER_UNAVAILABLE="${why:-no Docker engine}"
      echo "docker-engine: none: $PRIVDISTILL_DOCKER_UNAVAILABLE" >&2
    fi
    rm -f "$whyfile"
    rc=0
    "$@" || rc=$?
    if [ -n "$started" ]; then stop; fi
    exit "$rc"
    ;;
  *) echo "usage: $0 run -- CMD... | start | stop" >&2; exit 2 ;;
esac
