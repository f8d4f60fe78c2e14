#!/usr/bin/env bash
# tests/servers.sh — throwaway Redis and PostgreSQL servers on loopback, in a
# temporary folder, for the tests, examples and benchmarks.
#
#   servers.sh run CMD [ARGS...]   start everything, run CMD with the
#                                  KEEL_TEST_* variables set, always stop;
#                                  exits with CMD's status
#   servers.sh start               start everything; prints the folder, whose
#                                  `env` file holds the variables
#   servers.sh stop                stop everything and remove the folder
#   servers.sh stop-one NAME       stop one server (redis1.., pg-primary,
#   servers.sh start-one NAME        pg-replica) and start it again, for
#   servers.sh pause-one NAME        fault tests; pause/resume freeze it
#   servers.sh resume-one NAME       (SIGSTOP/SIGCONT) so it accepts
#                                    connections but never answers
#   servers.sh promote pg-replica  make the replica a primary (failover)
#
# The folder comes from KEEL_TEST_DIR for every command but start/run.
# Variables given to CMD (and written to $KEEL_TEST_DIR/env):
#   KEEL_TEST_DIR         the folder
#   KEEL_TEST_SERVERS     this script, for stop-one/start-one from a test
#   KEEL_TEST_REDIS       host:port,host:port,... (KEEL_TEST_REDIS_NODES, 3);
#                         node i also listens on $KEEL_TEST_DIR/redis<i>/redis.sock
#   KEEL_TEST_PG          conninfo of the primary
#   KEEL_TEST_PG_REPLICA  conninfo of a streaming replica of it
# PostgreSQL refuses to run as root, so as root it runs as `postgres`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
NODES=${KEEL_TEST_REDIS_NODES:-3}

die() { echo "servers.sh: $*" >&2; exit 1; }

# Runs a PostgreSQL program as the user that may run it.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A loopback port nothing listens on, different from those taken already,
# and below the kernel's ephemeral range: a client socket never takes it,
# so a stopped server can always bind it again.
pick_port() {
    local p tries=0 lo=20000 hi
    hi=$(awk '{print $1 - 1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32767)
    [ "$hi" -gt $((lo + 1000)) ] || { lo=10000; hi=$((lo + 10000)); }
    while :; do
        p=$((lo + RANDOM % (hi - lo + 1)))
        case " $TAKEN " in *" $p "*) continue ;; esac
        port_busy "$p" || { TAKEN="$TAKEN $p"; echo "$p"; return; }
        tries=$((tries + 1))
        [ $tries -lt 200 ] || die "no free port found"
    done
}

wait_redis() { # port
    local i
    for i in $(seq 1 100); do
        redis-cli -h 127.0.0.1 -p "$1" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    return 1
}

# ---- one server ----------------------------------------------------------

redis_start() { # name
    local d="$DIR/$1"
    [ -f "$d/port" ] || die "unknown server $1"
    redis-server --port "$(cat "$d/port")" --bind 127.0.0.1 --dir "$d" \
        --unixsocket "$d/redis.sock" --unixsocketperm 700 \
        --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log" \
        --save '' --appendonly no --protected-mode no >/dev/null ||
        die "redis-server $1 did not start: $(tail -n 5 "$d/redis.log" 2>/dev/null)"
    wait_redis "$(cat "$d/port")" ||
        die "redis $1 does not answer: $(tail -n 5 "$d/redis.log")"
}

redis_stop() { # name
    local d="$DIR/$1" pid
    [ -f "$d/redis.pid" ] || return 0
    pid=$(cat "$d/redis.pid")
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$d/redis.pid"
}

pg_start() { # name
    local d="$DIR/$1"
    [ -d "$d/data" ] || die "unknown server $1"
    as_pg "$PGBIN/pg_ctl" -D "$d/data" -l "$d/log" -w -t 60 start >/dev/null ||
        die "postgres $1 did not start: $(tail -n 5 "$d/log")"
}

pg_stop() { # name [mode]
    local d="$DIR/$1"
    [ -f "$d/data/postmaster.pid" ] || return 0
    kill -CONT "$(head -n 1 "$d/data/postmaster.pid")" 2>/dev/null || true
    as_pg "$PGBIN/pg_ctl" -D "$d/data" -m "${2:-fast}" -w -t 60 stop >/dev/null 2>&1 || true
}

pid_of() { # name
    case "$1" in
    redis*) cat "$DIR/$1/redis.pid" ;;
    pg-*) head -n 1 "$DIR/$1/data/postmaster.pid" ;;
    *) die "unknown server $1" ;;
    esac
}

# ---- the whole set -------------------------------------------------------

pg_conf() { # datadir port
    cat >>"$1/postgresql.conf" <<EOF
# throwaway test server: loopback only, no durability
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$DIR/sock'
max_connections = 200
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
log_min_messages = warning
EOF
}

start_all() {
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/keel-test.XXXXXX")
    chmod 755 "$DIR"
    TAKEN=""
    local redis="" i p

    for i in $(seq 1 "$NODES"); do
        mkdir -p "$DIR/redis$i"
        pick_port >"$DIR/redis$i/port"
        redis_start "redis$i"
        redis="$redis${redis:+,}127.0.0.1:$(cat "$DIR/redis$i/port")"
    done

    [ -x "$PGBIN/initdb" ] || die "PostgreSQL server programs not found (install postgresql)"
    mkdir -p "$DIR/pg-primary" "$DIR/pg-replica" "$DIR/sock"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR/pg-primary" "$DIR/pg-replica" "$DIR/sock"
    local pport rport
    pport=$(pick_port)
    rport=$(pick_port)
    as_pg "$PGBIN/initdb" -D "$DIR/pg-primary/data" -U keel -A trust -E UTF8 \
        --locale=C --no-sync >"$DIR/pg-primary/initdb.log" 2>&1 ||
        die "initdb failed: $(tail -n 5 "$DIR/pg-primary/initdb.log")"
    as_pg sh -c "$(declare -f pg_conf); DIR='$DIR'; pg_conf '$DIR/pg-primary/data' $pport"
    pg_start pg-primary
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$pport" -U keel -D "$DIR/pg-replica/data" \
        -R -X stream -c fast --no-sync >"$DIR/pg-replica/basebackup.log" 2>&1 ||
        die "pg_basebackup failed: $(tail -n 5 "$DIR/pg-replica/basebackup.log")"
    as_pg sh -c "echo 'port = $rport' >> '$DIR/pg-replica/data/postgresql.conf'"
    pg_start pg-replica

    cat >"$DIR/env" <<EOF
export KEEL_TEST_DIR='$DIR'
export KEEL_TEST_SERVERS='$self'
export KEEL_TEST_REDIS='$redis'
export KEEL_TEST_PG='host=127.0.0.1 port=$pport user=keel dbname=postgres'
export KEEL_TEST_PG_REPLICA='host=127.0.0.1 port=$rport user=keel dbname=postgres'
EOF
}

stop_all() {
    [ -n "${DIR:-}" ] && [ -d "$DIR" ] || return 0
    local d
    for d in "$DIR"/redis*; do [ -d "$d" ] && redis_stop "$(basename "$d")"; done
    pg_stop pg-replica immediate
    pg_stop pg-primary immediate
    rm -rf "$DIR"
}

need_dir() {
    DIR=${KEEL_TEST_DIR:-}
    [ -n "$DIR" ] && [ -f "$DIR/env" ] || die "KEEL_TEST_DIR does not name a running server set"
}

cmd=${1:-}
shift || true
case "$cmd" in
run)
    [ $# -gt 0 ] || die "run: no command"
    trap 'stop_all' EXIT
    trap 'exit 130' INT TERM
    start_all
    # shellcheck disable=SC1091
    . "$DIR/env"
    set +e
    # In the background, so that a signal to this shell is handled at once
    # (a foreground command would delay the trap until it ends): the
    # command gets SIGTERM, the servers stop. stdin is passed on explicitly,
    # since a background command would get /dev/null.
    "$@" <&0 &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null; exit 130' INT
    trap 'kill -TERM "$child" 2>/dev/null; exit 143' TERM
    wait "$child"
    exit $?
    ;;
start)
    # A start that fails half way stops what it started (die exits, which
    # an ERR trap would not see).
    trap 'stop_all' EXIT
    trap 'exit 130' INT TERM
    start_all
    trap - EXIT INT TERM
    echo "$DIR"
    ;;
stop) need_dir; stop_all ;;
stop-one)
    need_dir
    case "${1:-}" in redis*) redis_stop "$1" ;; pg-*) pg_stop "$1" fast ;; *) die "stop-one: unknown server '${1:-}'" ;; esac
    ;;
start-one)
    need_dir
    case "${1:-}" in redis*) redis_start "$1" ;; pg-*) pg_start "$1" ;; *) die "start-one: unknown server '${1:-}'" ;; esac
    ;;
pause-one) need_dir; kill -STOP "$(pid_of "${1:-}")" ;;
resume-one) need_dir; kill -CONT "$(pid_of "${1:-}")" ;;
promote)
    need_dir
    [ "${1:-}" = pg-replica ] || die "promote: only pg-replica can be promoted"
    as_pg "$PGBIN/pg_ctl" -D "$DIR/pg-replica/data" -w -t 60 promote >/dev/null
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
