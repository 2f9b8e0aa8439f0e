#!/usr/bin/env bash
# Installs schemathesis (the OpenAPI fuzzer from PyPI) into its own virtual
# environment under ~/.cache/bridge-tools, once, and prints the path of its
# `st` command. Idempotent: a second run only prints the path.
set -euo pipefail

VERSION="4.32.5"
TOOLS="${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}"
VENV="$TOOLS/schemathesis-$VERSION"

if [[ ! -x "$VENV/bin/st" ]]; then
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV.partial"
    "$VENV.partial/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" >&2
    rm -rf "$VENV"
    mv "$VENV.partial" "$VENV"
    # The venv's scripts name their interpreter by its path at creation.
    sed -i "1s|$VENV.partial|$VENV|" "$VENV"/bin/*
fi
echo "$VENV/bin/st"
