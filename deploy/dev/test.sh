#!/usr/bin/env bash
# Runs Foresight's whole test suite: brings up the local stack (installing tansu if missing), then
# formatting, lints, and every test of the workspace (unit, property, doc and end-to-end tests
# against the real broker and Postgres).
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/foresight-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# A failing test's error says what failed; a backtrace of where the error was made (several
# dozen frames of the test harness) would push that out of a log cut to its head and tail.
# Panics keep theirs under RUST_BACKTRACE.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}
# The tests' broker: a fresh one, on its own data dir, reset before each end-to-end test binary
# (FORESIGHT_TEST_BROKERS moves it off 9092, e.g. while a development stack runs there).
export FORESIGHT_TEST_BROKERS=${FORESIGHT_TEST_BROKERS:-127.0.0.1:9092}
export FORESIGHT_BROKER=$FORESIGHT_TEST_BROKERS
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

# One run at a time on a machine: two runs would reset each other's broker (the same port and data
# dir) and fail each other's tests. A second run waits for the first, for up to 50 minutes (a
# process left over from a run, holding the lock after it, cannot stop runs for good).
mkdir -p "$HOME/.cache"
exec 9>"$HOME/.cache/foresight-test.lock"
if ! flock -n 9; then
    step "Waiting for another test run on this machine to finish"
    flock -w 3000 9 || step "Another run still holds the lock after 50 minutes: going on"
fi

# Tools this run needs and a new machine lacks (tansu, cargo-deny, cargo-fuzz and the fuzz targets)
# are built in the background, each in a build directory of its own, while the workspace is
# formatted, linted and built; each is waited for where it is first needed.
export PATH="$HOME/.cargo/bin:$PATH"
tools_log=$(mktemp -d)
declare -A tool_pid
tool() { # name command...
    local name=$1; shift
    setsid "$@" >"$tools_log/$name.log" 2>&1 9>&- &
    tool_pid[$name]=$!
}
# A run that stops early stops its background builds too.
trap 'for p in "${tool_pid[@]}"; do kill -- "-$p" 2>/dev/null || true; done' EXIT
need() { # name
    local name=$1
    [ -n "${tool_pid[$name]:-}" ] || return 0
    if ! wait "${tool_pid[$name]}"; then
        echo "installing $name failed:"; tail -n 40 "$tools_log/$name.log"; exit 1
    fi
    unset "tool_pid[$name]"
}
step "Tools, in the background: tansu, cargo-deny, cargo-fuzz and the fuzz targets (built once per machine)"
command -v tansu >/dev/null 2>&1 || tool tansu deploy/dev/stack.sh install
command -v cargo-deny >/dev/null 2>&1 || tool cargo-deny env -u CARGO_TARGET_DIR cargo install cargo-deny --version 0.20.2 --locked
tool fuzz-targets deploy/dev/fuzz.sh --build

step "Test clients (OpenTelemetry Python SDK, confluent-kafka) in ${FORESIGHT_VENV:=$HOME/.cache/foresight-venv}"
if [ ! -x "$FORESIGHT_VENV/bin/python" ] || ! "$FORESIGHT_VENV/bin/python" -c 'import confluent_kafka, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.common, kubernetes_validate' 2>/dev/null; then
    python3 -m venv "$FORESIGHT_VENV"
    "$FORESIGHT_VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
fi
export FORESIGHT_PYTHON="$FORESIGHT_VENV/bin/python"

step "Headless Chromium (the backtest report's rendering test)"
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

step "socat (terminates TLS in front of tansu for the security tests)"
if ! command -v socat >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null
fi

step "Compose client (validates deploy/compose without a Docker engine; the test skips without it)"
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1 || echo "docker-compose not installed; the compose test will say so"
fi

step "Formatting"
cargo fmt --all --check

step "Lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Supply chain: cargo deny (advisories, licences, bans, sources)"
need cargo-deny
# The advisory database comes from GitHub; where GitHub is out of reach the check runs on the
# copy fetched last (FORESIGHT_DENY_OFFLINE=1: `cargo deny --offline`), or without advisories if there is none.
if [ "${FORESIGHT_DENY_OFFLINE:-0}" != 1 ] && ! timeout 30 git ls-remote --heads https://github.com/rustsec/advisory-db main >/dev/null 2>&1; then
    echo "cargo deny: the advisory database cannot be fetched from github.com here; checking offline"
    FORESIGHT_DENY_OFFLINE=1
fi
if [ "${FORESIGHT_DENY_OFFLINE:-0}" = 1 ]; then
    if ls "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/*/ >/dev/null 2>&1; then
        cargo deny --locked --offline check
    else
        echo "cargo deny: no advisory database on disk and no fetching: advisories NOT checked"
        cargo deny --locked check licenses bans sources
    fi
else
    cargo deny --locked check
fi

step "Build (the end-to-end tests run the foresight binary as a child process)"
cargo build --workspace --bins --locked

# Nothing else builds while the tests run: several of them measure rates and time-outs.
need tansu
need fuzz-targets
step "Local stack (a fresh broker in its own data dir)"
FORESIGHT_DATA=${FORESIGHT_TEST_DATA:-$HOME/.cache/foresight-test-stack} deploy/dev/stack.sh reset 9>&-

step "Tests (unit, property, end-to-end; benchmarks in quick mode so they cannot rot)"
# The crates' own tests, then each end-to-end test binary on a freshly reset broker: after a long
# run of tests, tansu 0.6.0 on sqlite stopped answering new clients' requests (metadata, producer
# ids) while answering the clients it had (2026-12-02), which failed later tests that start
# clients of their own (`foresight tail`, the Python clients).
cargo test --workspace --all-targets --locked --exclude foresight-tests
cargo test -p foresight-tests --lib --benches --locked
for t in $(awk '/^\[\[test\]\]/{t=1; next} t && /^name/{gsub(/.*= *"|"/, ""); print; t=0}' tests/Cargo.toml); do
    FORESIGHT_DATA=${FORESIGHT_TEST_DATA:-$HOME/.cache/foresight-test-stack} deploy/dev/stack.sh reset >/dev/null 9>&-
    cargo test -p foresight-tests --test "$t" --locked
done

step "Doc examples"
cargo test --workspace --doc --locked

step "Fuzzing every decoder and the policy parser for ${FUZZ_SECONDS:=20}s each"
deploy/dev/fuzz.sh "$FUZZ_SECONDS"

step "Done"
