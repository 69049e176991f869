#!/usr/bin/env bash
# Foresight's local stack: a Kafka-compatible broker (tansu) and Postgres, on this machine.
#
#   deploy/dev/stack.sh up       install tansu if missing, start it and Postgres, create the database
#   deploy/dev/stack.sh install  only install tansu if missing
#   deploy/dev/stack.sh down     stop the broker (Postgres is the machine's and is left running)
#   deploy/dev/stack.sh status   say what is running
#   deploy/dev/stack.sh reset    stop the broker, delete its data, start it again (the test command
#                                does this with its own data dir: tansu's sqlite storage slows down
#                                as it grows, and tests only add to it)
#
# Idempotent: `up` on a running stack only checks it. Settings (environment):
#   FORESIGHT_DATA     where the broker keeps its data and log (default: ~/.local/share/foresight)
#   FORESIGHT_BROKER   host:port of the broker (default: 127.0.0.1:9092)
#   FORESIGHT_PG_HOST  Postgres host (default: 127.0.0.1), FORESIGHT_PG_PORT (default: 5432)
#   FORESIGHT_PG_USER  Postgres role with CREATEDB (default: postgres)
#   FORESIGHT_DB       database to create (default: foresight)
#   TANSU_VERSION      tansu version to install (default: 0.6.0)
set -euo pipefail

DATA=${FORESIGHT_DATA:-$HOME/.local/share/foresight}
BROKER=${FORESIGHT_BROKER:-127.0.0.1:9092}
PG_HOST=${FORESIGHT_PG_HOST:-127.0.0.1}
PG_PORT=${FORESIGHT_PG_PORT:-5432}
PG_USER=${FORESIGHT_PG_USER:-postgres}
DB=${FORESIGHT_DB:-foresight}
TANSU_VERSION=${TANSU_VERSION:-0.6.0}
PIDFILE=$DATA/tansu.pid
LOG=$DATA/tansu.log

say() { printf '[stack] %s\n' "$*" >&2; }

port_open() { # host:port
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

wait_for() { # description seconds command...
    local what=$1 secs=$2; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    say "$what did not come up within ${secs}s"
    return 1
}

ensure_tansu() {
    export PATH="$HOME/.cargo/bin:$PATH"
    if command -v tansu >/dev/null 2>&1; then return 0; fi
    say "installing tansu $TANSU_VERSION (cargo install; about 10-17 minutes on 2 cores, once per machine)"
    # In a build directory of its own (not the workspace's CARGO_TARGET_DIR), so it can run beside
    # the workspace's build without either waiting for the other's lock.
    env -u CARGO_TARGET_DIR cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
}

broker_up() {
    mkdir -p "$DATA"
    if port_open "$BROKER"; then
        say "broker already listening on $BROKER"
        return 0
    fi
    ensure_tansu
    say "starting tansu on $BROKER (data: $DATA/tansu.db, log: $LOG)"
    # tansu resolves a sqlite URL's path against its working directory.
    (cd "$DATA" && exec nohup tansu broker \
        --listener-url "tcp://$BROKER" \
        --advertised-listener-url "tcp://$BROKER" \
        --storage-engine "sqlite://tansu.db" \
        >>"$LOG" 2>&1 </dev/null) &
    echo $! >"$PIDFILE"
    wait_for "tansu" 30 port_open "$BROKER" || { tail -n 30 "$LOG" >&2; exit 1; }
}

psql_admin() {
    psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qAt "$@"
}

postgres_up() {
    if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
        if [ "$PG_HOST" = 127.0.0.1 ] || [ "$PG_HOST" = localhost ]; then
            if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
                local version
                version=$(ls /etc/postgresql | sort -V | tail -n 1)
                say "starting the local Postgres $version cluster"
                pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
            fi
        fi
        wait_for "Postgres at $PG_HOST:$PG_PORT" 30 pg_isready -q -h "$PG_HOST" -p "$PG_PORT" \
            || { say "start Postgres (or set FORESIGHT_PG_HOST/PORT) and try again"; exit 1; }
    fi
    if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
        say "creating database $DB"
        psql_admin -c "CREATE DATABASE \"$DB\""
    fi
    say "Postgres ready: postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
}

broker_down() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        kill "$(cat "$PIDFILE")"
        wait_for "tansu shutdown" 15 bash -c "! kill -0 $(cat "$PIDFILE") 2>/dev/null" || kill -9 "$(cat "$PIDFILE")" || true
        say "broker stopped"
    else
        say "no broker started by this script is running"
    fi
    rm -f "$PIDFILE"
}

status() {
    if port_open "$BROKER"; then say "broker: listening on $BROKER"; else say "broker: down"; fi
    if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then say "postgres: up"; else say "postgres: down"; fi
}

case "${1:-}" in
    up) broker_up; postgres_up ;;
    install) ensure_tansu ;;
    reset)
        broker_down
        rm -f "$DATA"/tansu.db "$DATA"/tansu.db-shm "$DATA"/tansu.db-wal
        # A reset promises a fresh, empty broker: one started from another data dir (or by
        # hand) would be used with all it holds and however long it has run, so refuse it.
        if port_open "$BROKER"; then
            say "a broker not started from $DATA is listening on $BROKER: stop it first"
            say "(deploy/dev/stack.sh down, with the FORESIGHT_DATA it was started with) or set FORESIGHT_BROKER"
            exit 1
        fi
        broker_up; postgres_up ;;
    down) broker_down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status|reset|install" >&2; exit 2 ;;
esac
