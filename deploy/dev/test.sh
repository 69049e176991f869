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

step "Local stack (a fresh broker in its own data dir)"
FORESIGHT_DATA=${FORESIGHT_TEST_DATA:-$HOME/.cache/foresight-test-stack} deploy/dev/stack.sh reset

step "Test clients (OpenTelemetry Python SDK, confluent-kafka) in ${FORESIGHT_VENV:=$HOME/.cache/foresight-venv}"
if [ ! -x "$FORESIGHT_VENV/bin/python" ] || ! "$FORESIGHT_VENV/bin/python" -c 'import confluent_kafka, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.common' 2>/dev/null; then
    python3 -m venv "$FORESIGHT_VENV"
    "$FORESIGHT_VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
fi
export FORESIGHT_PYTHON="$FORESIGHT_VENV/bin/python"

step "Formatting"
cargo fmt --all --check

step "Lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Build (the end-to-end tests run the foresight binary as a child process)"
cargo build --workspace --bins --locked

step "Tests (unit, property, end-to-end; benchmarks in quick mode so they cannot rot)"
cargo test --workspace --all-targets --locked

step "Doc examples"
cargo test --workspace --doc --locked

step "Fuzzing every decoder for ${FUZZ_SECONDS:=20}s each"
deploy/dev/fuzz.sh "$FUZZ_SECONDS"

step "Done"
