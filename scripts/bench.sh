#!/usr/bin/env bash
# The pipeline benchmark with everything it needs: Postgres (started if it
# is not running), the standalone broker (built and started if needed), a
# release build, then `bridge-bench pipeline` with the arguments given, e.g.
#
#   scripts/bench.sh                          # as fast as possible, 20,000 transfers
#   scripts/bench.sh --rate 500 --transfers 15000
#   scripts/bench.sh --processes-per-stage 2
#   scripts/bench.sh --in-process-broker --rate 600 --transfers 1000000 --pgbench false --timeout-secs 3600
#
# Results (JSON and an SVG plot) go to target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
# A run on the in-process cluster needs no standalone broker (whose idle
# CPU would be counted as the broker's).
if [[ " $* " != *" --in-process-broker "* ]]; then
  scripts/tansu.sh start
  trap 'scripts/tansu.sh stop' EXIT
fi

cargo build --release -p bridge -p bridge-bench
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export KAFKA_BROKERS=127.0.0.1:${BRIDGE_TANSU_PORT:-19092}
# tansu reads the log once per fetch and holds the answer for the whole
# wait; asking for more bytes than a paced load brings makes it read again
# at the end of the wait (see `bridge run --help`, --fetch-min-bytes).
export BRIDGE_FETCH_MIN_BYTES=${BRIDGE_FETCH_MIN_BYTES:-1048576}
target/release/bridge-bench pipeline "$@"
