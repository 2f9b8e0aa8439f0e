#!/usr/bin/env bash
# Runs the Python examples (examples/python) against a running pipeline, to
# show that a client that is not ours, knowing only schemas/ and the topic
# conventions, can publish requests and follow their status.
#
# Needs Postgres and the standalone broker up (scripts/test.sh starts both)
# and a built `bridge` binary ($BRIDGE_BIN, default the debug build the test
# run made, in $CARGO_TARGET_DIR or target/).
# The Python packages go into a virtualenv in the tools cache, once.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}
venv=$tools/examples-venv
requirements=examples/python/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "Installing the examples' Python packages into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

bridge=${BRIDGE_BIN:-${CARGO_TARGET_DIR:-target}/debug/bridge}
brokers=${KAFKA_BROKERS:-127.0.0.1:${BRIDGE_TANSU_PORT:-19092}}
server=${BRIDGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
run=$(python3 -c 'import uuid; print(uuid.uuid4().hex[:10])')
database_url="${server%/*}/bridge_examples_$run"
prefix="ex$run."
work=$(mktemp -d)
pipeline_pid=
registry_pid=
cleanup() {
  if [ -n "$pipeline_pid" ]; then kill "$pipeline_pid" 2>/dev/null || true; wait "$pipeline_pid" 2>/dev/null || true; fi
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
  dropdb -h 127.0.0.1 -U postgres --if-exists "bridge_examples_$run" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export DATABASE_URL=$database_url KAFKA_BROKERS=$brokers BRIDGE_TOPIC_PREFIX=$prefix BRIDGE_GROUP_PREFIX=$prefix
"$bridge" migrate >/dev/null
"$bridge" seed --namespace ex --investors 20 >/dev/null
# The producer is a registered source and signs its requests; the pipeline
# accepts no others.
BRIDGE_MASTER_KEYS=$("$bridge" credentials generate-key examples)
export BRIDGE_MASTER_KEYS
source_secret=$("$bridge" sources add python-example --investors 'ex-inv-*' --funds '*' 2>/dev/null)
RUST_LOG=warn "$bridge" run --simulated-services --require-signed-requests --stage validator --stage withdrawal \
  --stage deposit --stage completion --relay >"$work/pipeline.log" 2>&1 &
pipeline_pid=$!

cd examples/python
"$venv/bin/python" producer.py --brokers "$brokers" --topic-prefix "$prefix" \
  --investor ex-inv-00001 --investor ex-inv-00002 --investor ex-inv-00003 \
  --fund-account ex-fa-growth --count 12 --source python-example --source-secret "$source_secret" >"$work/ids.txt"
echo "Python producer published $(wc -l <"$work/ids.txt") transfer requests" >&2
if ! "$venv/bin/python" status_consumer.py --brokers "$brokers" --topic-prefix "$prefix" \
  --group "${prefix}python-example" --wait-for "$work/ids.txt" --timeout 180 >"$work/events.jsonl"; then
  echo "The Python status consumer did not see every transfer finish; pipeline log:" >&2
  tail -50 "$work/pipeline.log" >&2
  exit 1
fi
echo "Python status consumer decoded $(wc -l <"$work/events.jsonl") status events" >&2
# Signed as a registered source, every request was accepted for validation.
if grep -E 'REQUEST_UNSIGNED|REQUEST_SIGNATURE_INVALID|REQUEST_SIGNATURE_STALE|SOURCE_NOT_ALLOWED' "$work/events.jsonl" >&2; then
  echo "The pipeline refused the Python producer's signatures" >&2
  exit 1
fi
grep -q '"completed"' "$work/events.jsonl" || { echo "No transfer completed" >&2; exit 1; }

kill "$pipeline_pid"; wait "$pipeline_pid" 2>/dev/null || true; pipeline_pid=

# The same with a schema registry run as production ones are: authenticated,
# read-only to the pipeline. The deployment's user checks and registers the
# schemas; the pipeline only looks them up and writes Confluent's wire
# format; the Python consumer reads it with confluent-kafka's stock
# AvroDeserializer.
cd ../..
registry_sim=${CARGO_TARGET_DIR:-target}/debug/schema-registry-sim
cargo build -q -p bridge-testkit --bin schema-registry-sim
"$registry_sim" --user app:app-secret:read --user deployer:deployer-secret:write >"$work/registry.url" 2>"$work/registry.log" &
registry_pid=$!
for _ in $(seq 100); do [ -s "$work/registry.url" ] && break; sleep 0.1; done
registry_url=$(head -1 "$work/registry.url")
prefix="ex${run}r."
export BRIDGE_TOPIC_PREFIX=$prefix BRIDGE_GROUP_PREFIX=$prefix SCHEMA_REGISTRY_URL=$registry_url
SCHEMA_REGISTRY_USERNAME=deployer SCHEMA_REGISTRY_PASSWORD=deployer-secret "$bridge" schemas check >&2
SCHEMA_REGISTRY_USERNAME=deployer SCHEMA_REGISTRY_PASSWORD=deployer-secret "$bridge" schemas register >&2
SCHEMA_REGISTRY_USERNAME=app SCHEMA_REGISTRY_PASSWORD=app-secret SCHEMA_REGISTRY_AUTO_REGISTER=false \
  RUST_LOG=warn "$bridge" run --simulated-services --require-signed-requests --stage validator --stage withdrawal \
  --stage deposit --stage completion --relay >"$work/pipeline-registry.log" 2>&1 &
pipeline_pid=$!
cd examples/python
"$venv/bin/python" producer.py --brokers "$brokers" --topic-prefix "$prefix" --investor ex-inv-00004 \
  --fund-account ex-fa-growth --count 4 --source python-example --source-secret "$source_secret" >"$work/ids-registry.txt"
if ! "$venv/bin/python" status_consumer.py --brokers "$brokers" --topic-prefix "$prefix" \
  --group "${prefix}python-example" --wait-for "$work/ids-registry.txt" --timeout 180 \
  --schema-registry "$registry_url" --schema-registry-auth app:app-secret >"$work/events-registry.jsonl"; then
  echo "The Python status consumer did not read the registry-framed status topic; pipeline log:" >&2
  tail -50 "$work/pipeline-registry.log" >&2
  exit 1
fi
echo "Python status consumer decoded $(wc -l <"$work/events-registry.jsonl") registry-framed status events" >&2
grep -q '"completed"' "$work/events-registry.jsonl" || { echo "No transfer completed with the registry" >&2; exit 1; }
