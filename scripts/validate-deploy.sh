#!/usr/bin/env bash
# Validates the deployment files without a Docker engine or a cluster:
# docker-compose.yml against the Compose specification's JSON schema
# (vendored by check-jsonschema), every Kubernetes manifest under deploy/
# against the Kubernetes API schemas (kubernetes-validate), and the Grafana
# dashboard as JSON. Tools go into a virtualenv in the tools cache, once.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}
venv=$tools/deploy-venv
wanted="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 pyyaml==6.0.2"
if [ "$(cat "$venv/wanted" 2>/dev/null)" != "$wanted" ]; then
  echo "Installing deployment validators into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $wanted
  echo "$wanted" >"$venv/wanted"
fi

"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
"$venv/bin/python" scripts/validate_manifests.py deploy
