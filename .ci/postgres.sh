#!/usr/bin/env bash
# Start or stop a throw-away PostgreSQL server for the sweep's shared-storage tests.
#
#   eval "$(.ci/postgres.sh start)"   # prints `export BATCHSCOPE_TEST_POSTGRES_URL=... BATCHSCOPE_PG_DIR=...`
#   .ci/postgres.sh stop              # stops the server in $BATCHSCOPE_PG_DIR and deletes it
#
# Installs nothing: it needs PostgreSQL's server binaries (Debian: apt-get install postgresql,
# found under /usr/lib/postgresql/<version>/bin; or set PG_BIN, or have initdb on PATH). The
# cluster lives in a temp directory, listens on 127.0.0.1 on a free port, requires a password
# (random, in the URL) and runs fsync-free: it is for tests only. PostgreSQL refuses to run as
# root, so under root the server runs as the `postgres` user.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$newest" && -x "$newest/initdb" ]]; then echo "$newest"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
    die "no PostgreSQL server binaries (initdb) found; apt-get install postgresql or set PG_BIN"
}

# Run a command as the server's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bin dir port password
    bin=$(find_bin)
    dir=${1:-$(mktemp -d "${TMPDIR:-/tmp}/batchscope-pg.XXXXXX")}
    mkdir -p "$dir"
    touch "$dir/.batchscope-pg"
    [[ $(id -u) -eq 0 ]] && chown -R postgres: "$dir"
    port=$(free_port)
    password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    as_owner sh -c "umask 077; printf '%s\n' '$password' > '$dir/pwfile'"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c synchronous_commit=off" \
        start >/dev/null || { cat "$dir/server.log" >&2; die "server did not start"; }
    PGPASSWORD=$password as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres batchscope \
        || die "createdb failed"
    local url="postgresql://postgres:${password}@127.0.0.1:${port}/batchscope"
    as_owner sh -c "umask 077; printf '%s\n' '$url' > '$dir/url'"
    echo "export BATCHSCOPE_TEST_POSTGRES_URL='$url'"
    echo "export BATCHSCOPE_PG_DIR='$dir'"
}

stop() {
    local bin dir
    dir=${1:-${BATCHSCOPE_PG_DIR:-}}
    [[ -n "$dir" ]] || die "which server? pass its directory or set BATCHSCOPE_PG_DIR"
    [[ -f "$dir/.batchscope-pg" ]] || die "$dir was not made by postgres.sh start; not touching it"
    bin=$(find_bin)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    *) die "usage: $0 start [DIR] | stop [DIR]" ;;
esac
