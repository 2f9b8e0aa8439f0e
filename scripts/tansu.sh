#!/usr/bin/env bash
# The standalone Kafka-protocol broker used by the test suite: tansu 0.6.0.
# The shared broker keeps its log in memory (feature "dynostore"); the test
# that stops and restarts a broker runs its own on a SQLite file (feature
# "libsql"), so what was acknowledged before the stop is still there after.
#
#   scripts/tansu.sh install   build it once into the tools cache (~10 min)
#   scripts/tansu.sh start     start it on $BRIDGE_TANSU_PORT (default 19092)
#   scripts/tansu.sh stop      stop the broker started by `start`
#   scripts/tansu.sh path      print the binary's path (building it if needed)
#
# The binary lives in $BRIDGE_TOOLS_DIR (default ~/.cache/bridge-tools), so a
# machine builds it once and every later run, CI included, reuses it.
set -euo pipefail

version=0.6.0
features=dynostore,libsql
tools=${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}
binary=$tools/bin/tansu
port=${BRIDGE_TANSU_PORT:-19092}
state=${BRIDGE_TANSU_STATE:-$(cd "$(dirname "$0")/.." && pwd)/.tmp/tansu}

install() {
  # The marker records the features the binary was built with, so a change
  # of features rebuilds it instead of reusing a binary that lacks one.
  if [ -x "$binary" ] && "$binary" --version 2>/dev/null | grep -q "$version" \
    && [ "$(cat "$binary.features" 2>/dev/null)" = "$features" ]; then
    return 0
  fi
  echo "Building tansu $version into $tools (one time, about ten minutes)" >&2
  mkdir -p "$tools"
  CARGO_TARGET_DIR=$tools/target cargo install tansu --version "$version" --locked \
    --features "$features" --root "$tools" --force
  echo "$features" >"$binary.features"
  # The build directory is large and not needed once the binary exists.
  rm -rf "$tools/target"
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
  install
  mkdir -p "$state"
  if [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then
    return 0
  fi
  if listening; then
    # A broker left running by another checkout or an earlier session can be
    # shared: every test uses its own random topic and group names.
    if pgrep -f "tansu broker --listener-url tcp://127.0.0.1:$port" >/dev/null; then
      echo "Reusing the tansu broker already listening on port $port" >&2
      return 0
    fi
    echo "Port $port is taken by another process; set BRIDGE_TANSU_PORT" >&2
    exit 1
  fi
  "$binary" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ \
    >"$state/broker.log" 2>&1 &
  echo $! >"$state/pid"
  for _ in $(seq 1 100); do
    if listening; then return 0; fi
    if ! kill -0 "$(cat "$state/pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "tansu did not start; its log:" >&2
  cat "$state/broker.log" >&2
  exit 1
}

stop() {
  if [ -f "$state/pid" ]; then
    local pid
    pid=$(cat "$state/pid")
    kill "$pid" 2>/dev/null || true
    # Wait for it to go, so a `start` right after finds the port free
    # instead of reusing a broker that is shutting down.
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$state/pid"
  fi
}

case "${1:-}" in
  install) install ;;
  path) install >&2; echo "$binary" ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop|path" >&2; exit 2 ;;
esac
