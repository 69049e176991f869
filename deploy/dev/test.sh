#!/usr/bin/env bash
# Runs Foresight's whole test suite: brings up the local stack (installing tansu if missing), then
# formatting, lints, and every test of the workspace (unit, property, doc and end-to-end tests
# against the real broker and Postgres).
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/foresight-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "Local stack"
deploy/dev/stack.sh up

step "Formatting"
cargo fmt --all --check

step "Lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Tests"
cargo test --workspace --locked

step "Done"
