# Shared by the project's scripts: make sure what the build and the local server need is
# installed. PostgreSQL and libpq come from the distribution's packages, nothing else.

project_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# libpq (headers and pg_config) for Diesel's PostgreSQL backend, and the server binaries.
ensure_system_packages() {
    local missing=()
    [ -e /usr/include/postgresql/libpq-fe.h ] || missing+=(libpq-dev)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "error: missing packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
            exit 1
        }
        sudo=sudo
    fi
    echo "installing ${missing[*]} from the distribution's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq "${missing[@]}" >&2
}

# Starts the project-local server (if needed) and exports DATABASE_URL for it. Sets
# STARTED_PG=1 when this call started it, so the caller can stop it again.
start_local_pg() {
    STARTED_PG=0
    if ! "$project_dir/scripts/pg" status >/dev/null 2>&1; then
        STARTED_PG=1
    fi
    local line
    line=$("$project_dir/scripts/pg" start | grep '^DATABASE_URL=')
    export DATABASE_URL=${line#DATABASE_URL=}
}

# For the benchmarks, before each timed run: waits (at most 5 minutes) until no autovacuum worker
# is busy, then checkpoints and has the kernel write out its dirty pages. Every run then starts
# on a quiet server instead of paying for the previous run's vacuum and writes (on 2 cores, a
# vacuum of a 1M-row table next door costs the timed run seconds).
settle_server() {
    local i
    for i in $(seq 1 300); do
        [ "$(psql -Atq "$DATABASE_URL" -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && break
        sleep 1
    done
    psql -q "$DATABASE_URL" -c "CHECKPOINT"
    sync
}
