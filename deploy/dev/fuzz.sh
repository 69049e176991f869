#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each): the decoders (ingest/fuzz) and
# the policy parser with its CEL conditions (allocator/fuzz):
#   deploy/dev/fuzz.sh [SECONDS]
#   deploy/dev/fuzz.sh --build    only build every target (the test command does this early, beside
#                                 the workspace's build)
# Installs cargo-fuzz if missing. Uses libFuzzer without a sanitizer, so it runs on the stable
# toolchain; a crash leaves its input under <crate>/fuzz/artifacts/ and fails the run.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
seconds=${1:-20}
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-fuzz >/dev/null 2>&1 || env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version 0.13.2 --locked
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/foresight-fuzz-target}
for crate in ingest allocator; do
    cd "$root/$crate"
    if [ "$seconds" = --build ]; then
        cargo fuzz build --sanitizer none
        continue
    fi
    for target in $(cargo fuzz list); do
        echo "fuzz: $crate/$target for ${seconds}s"
        log=$(mktemp)
        if ! cargo fuzz run --sanitizer none "$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
            tail -n 40 "$log"
            exit 1
        fi
        grep -E '^Done' "$log"
        rm -f "$log"
    done
done
