#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine of this kind: first installs what the
# machine lacks, then checks formatting and lints, then runs the whole suite.
#
#   scripts/test.sh                  # everything
#   QUICK=1 scripts/test.sh          # skip fmt and clippy (while iterating)
#   FUZZ_SECONDS=0 scripts/test.sh   # skip the bounded fuzz run (default 20 s per target)
#
# Needs: rustup's toolchain with cargo and python3 (the machine has them). Installs, when
# missing: the Debian packages listed below (after `apt-get update`), the rustfmt and clippy
# components, moto's S3 server from PyPI (a virtualenv under ~/.cache/stellar-test), the
# wasm32-wasip1 target (scripts/build-examples.sh; committed builds when unreachable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

# Debian packages the suite needs beyond the base image: protoc and its well-known types for
# etcd-client's build (raft-bench's etcd peer), etcd itself for raft-bench, busybox-static
# for the container tests' image, crun for container-bench's peer, ffmpeg for the transcoding
# job tests, which need ffmpeg and ffprobe (examples/transcode). Our own protos build with a
# vendored protoc.
APT_PACKAGES=(protobuf-compiler libprotobuf-dev etcd-server busybox-static crun ffmpeg)

ensure_debian_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_rust_components() {
  local c
  for c in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
      log "installing rustup component $c"
      rustup component add "$c" || {
        log "cannot install $c: the rust toolchain mirror is unreachable; install it by hand"
        exit 1
      }
    fi
  done
}

# moto's S3-compatible server (PyPI `moto[server]`), which the object-store blob tests run
# against (cli/tests/blob_store_s3.rs), in a virtualenv of its own; the tests find it there.
MOTO_VENV="${HOME}/.cache/stellar-test/venv"
ensure_moto() {
  if [[ -x "$MOTO_VENV/bin/moto_server" ]]; then
    return
  fi
  log "installing moto[server] from PyPI into $MOTO_VENV"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
}

ensure_debian_packages
ensure_rust_components
ensure_moto
# The example functions the worker's tests run (installs wasm32-wasip1 if it can).
scripts/build-examples.sh

if [[ -z "${QUICK:-}" ]]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  cargo fmt --manifest-path examples/wasm/Cargo.toml --all -- --check
  log "cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
fi

# Every fuzz target for a short bounded time (fuzz/README.md; scripts/fuzz.sh installs
# cargo-fuzz when missing). The committed corpus is also replayed by the test suite below.
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if ((FUZZ_SECONDS > 0)); then
  log "fuzz targets, ${FUZZ_SECONDS} s each"
  FUZZ_JOBS=2 scripts/fuzz.sh "" "$FUZZ_SECONDS"
fi

log "test suite"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doc tests; run them first so nextest's summary closes the output.
  # --all-features: the same feature set as clippy's (one compile of the dependencies), and
  # the gateway's `harness` feature that its HTTP fuzz-corpus test needs.
  cargo test --workspace --all-features --locked --doc
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  log "cargo-nextest not found; using cargo test"
  cargo test --workspace --all-features --locked --no-fail-fast
fi
