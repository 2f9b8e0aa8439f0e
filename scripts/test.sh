#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
# starts Postgres if it is not running, installs cargo-nextest, Chromium and
# ChromeDriver if missing,
# builds and starts the standalone
# broker (tansu) if needed, runs every test against real Postgres, the
# in-process Kafka cluster and the standalone broker, runs the Python client
# examples against the pipeline, then stops the broker, then fuzzes the
# decoders and the request rules for a short while.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh

# librdkafka is built with the system's OpenSSL (TLS, SCRAM) and libcurl
# (OAUTHBEARER/OIDC); their headers come from Debian's packages.
scripts/ensure-build-deps.sh

# Headless Chromium and ChromeDriver for the console's browser tests.
scripts/browser.sh

# cargo-nextest runs the suite; a machine without it gets it once, built
# into the tools cache that later runs (CI included) reuse.
if ! cargo nextest --version >/dev/null 2>&1; then
    tools=${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}
    if [[ ! -x $tools/bin/cargo-nextest ]]; then
        echo "Installing cargo-nextest into $tools (one time)" >&2
        cargo install cargo-nextest --locked --root "$tools"
    fi
    export PATH="$tools/bin:$PATH"
fi

scripts/tansu.sh start
trap 'scripts/tansu.sh stop' EXIT

export BRIDGE_TEST_DATABASE_URL=${BRIDGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export BRIDGE_TEST_TANSU_BROKERS=127.0.0.1:${BRIDGE_TANSU_PORT:-19092}
# The test that kills and restarts a broker runs a private one of its own.
export BRIDGE_TEST_TANSU_BINARY=$(scripts/tansu.sh path)

# Databases left by earlier runs of the suite.
psql -qAt -h 127.0.0.1 -U postgres -d postgres \
  -c "SELECT datname FROM pg_database WHERE datname LIKE 'bridge\_test\_%'" |
  while read -r database; do dropdb -h 127.0.0.1 -U postgres --if-exists "$database" || true; done

cargo nextest run --workspace --no-fail-fast "$@"

# Clients that are not ours: the Python examples publish requests and follow
# their status against the pipeline (skipped when a test filter was given).
if [[ $# -eq 0 ]]; then
    scripts/examples.sh
    # docker-compose.yml and deploy/ against their schemas (no engine needed).
    scripts/validate-deploy.sh
fi

# A short fuzzing run of the decoders and the request rules (the suite's
# own proptests cover the same ground in a different way); skipped when a
# test filter was given, and lengthened with BRIDGE_FUZZ_SECONDS.
if [[ $# -eq 0 ]]; then
    scripts/fuzz.sh "${BRIDGE_FUZZ_SECONDS:-20}"
fi
