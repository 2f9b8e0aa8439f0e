#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets) for a while, starting from the
# committed seed corpus, with cargo-fuzz installed once into
# ~/.cache/bridge-tools. Without sanitizers, so it works on the stable
# toolchain; libFuzzer still finds panics and failed assertions.
#
#   scripts/fuzz.sh [seconds per target]     (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-30}"
TOOLS="${BRIDGE_TOOLS_DIR:-$HOME/.cache/bridge-tools}"
FUZZ_ROOT="$TOOLS/cargo-fuzz"
VERSION="0.13.2"

if [[ ! -x "$FUZZ_ROOT/bin/cargo-fuzz" ]]; then
    echo "Installing cargo-fuzz $VERSION into $FUZZ_ROOT (once)" >&2
    cargo install cargo-fuzz --version "$VERSION" --locked --root "$FUZZ_ROOT" >&2
fi
export PATH="$FUZZ_ROOT/bin:$PATH"

for target in $(cargo fuzz list); do
    # A scratch copy of the seed corpus: what a run finds stays out of git.
    work="$(mktemp -d)"
    cp -r "fuzz/corpus/$target/." "$work/" 2>/dev/null || true
    echo "fuzzing $target for ${SECONDS_PER_TARGET}s" >&2
    cargo fuzz run --sanitizer none "$target" "$work" -- -max_total_time="$SECONDS_PER_TARGET" >&2
    rm -rf "$work"
done
