#!/usr/bin/env bash
# Builds the example functions (examples/wasm) for wasm32-wasip1 and checks that the committed
# builds in examples/wasm/prebuilt/ are exactly what their sources build to (the builds are
# reproducible: one codegen unit, stripped, no paths embedded).
#
#   scripts/build-examples.sh            # build and check (installs the target if missing)
#   scripts/build-examples.sh --update   # build and refresh the committed builds
#
# Without the wasm32-wasip1 target (rustup cannot reach its mirror) the committed builds are
# used as they are, and the script says so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[build-examples] %s\n' "$*" >&2; }
NAMES=(hello wordcount framefilter probe)
PREBUILT=examples/wasm/prebuilt
BUILT=examples/wasm/target/wasm32-wasip1/release

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  log "installing the wasm32-wasip1 target"
  if ! rustup target add wasm32-wasip1; then
    log "wasm32-wasip1 is unavailable here; the tests use the committed builds in $PREBUILT unchecked"
    exit 0
  fi
fi

cargo build --release --locked --target wasm32-wasip1 --manifest-path examples/wasm/Cargo.toml
stale=()
for n in "${NAMES[@]}"; do
  if [[ "${1:-}" == "--update" ]]; then
    cp "$BUILT/$n.wasm" "$PREBUILT/$n.wasm"
  elif ! cmp -s "$BUILT/$n.wasm" "$PREBUILT/$n.wasm"; then
    stale+=("$n")
  fi
done
if ((${#stale[@]} > 0)); then
  log "committed builds differ from their sources: ${stale[*]}"
  log "run scripts/build-examples.sh --update and commit $PREBUILT"
  exit 1
fi
log "example functions match their committed builds (${NAMES[*]})"
