#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ with cargo-fuzz (libFuzzer) on this machine's stable Rust
# (no sanitizer instrumentation: `--sanitizer none`; Rust's own checks and the targets'
# assertions find the bugs). New interesting inputs are added to fuzz/corpus/TARGET; a crash
# leaves its input in fuzz/artifacts/TARGET and fails the script.
#
#   scripts/fuzz.sh                      # every target, FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh http_request 600     # one target for ten minutes
#   FUZZ_JOBS=2 scripts/fuzz.sh          # two targets at a time
#
# The last line of each run is libFuzzer's summary ("Done N runs in S second(s)"), which is
# what fuzz/README.md records.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[fuzz.sh] %s\n' "$*" >&2; }

ALL=(decode_messages check_module apply_commands http_request)
if [[ $# -ge 1 && -n "$1" ]]; then
  TARGETS=("$1")
else
  TARGETS=("${ALL[@]}")
fi
SECONDS_EACH="${2:-${FUZZ_SECONDS:-60}}"
JOBS="${FUZZ_JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
log "building the fuzz targets"
cargo fuzz build --sanitizer none

run_one() {
  local t=$1 out
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  out="fuzz/artifacts/$t/last-run.log"
  log "$t: ${SECONDS_EACH} s"
  if ! cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=4096 \
    -print_final_stats=0 >"$out" 2>&1; then
    log "$t FAILED; its log: $out"
    tail -n 30 "$out" >&2
    return 1
  fi
  log "$t: $(grep -E '^Done [0-9]+ runs' "$out" | tail -n 1)"
}

failed=0
running=0
pids=()
for t in "${TARGETS[@]}"; do
  run_one "$t" &
  pids+=($!)
  running=$((running + 1))
  if ((running >= JOBS)); then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
    running=$((running - 1))
  fi
done
for p in "${pids[@]}"; do
  wait "$p" || failed=1
done
exit "$failed"
