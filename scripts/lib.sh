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
    # pg_partman for the partitioned layout, for the newest server major installed (or the
    # distribution's default when none is yet).
    local major
    major=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sed 's|/usr/lib/postgresql/\([0-9]*\)/bin|\1|' | sort -n | tail -1)
    if [ -n "$major" ]; then
        [ -e "/usr/share/postgresql/$major/extension/pg_partman.control" ] || missing+=("postgresql-$major-partman")
    else
        missing+=(postgresql-15-partman)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    can_be_root || {
        echo "error: missing packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
        exit 1
    }
    apt_install "${missing[@]}"
}

# Whether this user can run commands as root: is root, or has sudo.
can_be_root() {
    [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1
}

# Runs a command as root: directly, or through sudo (see can_be_root).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs packages from the distribution's archive, as root.
apt_install() {
    echo "installing $* from the distribution's packages" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# The PostgreSQL major whose server binaries the local clusters use (the newest installed).
server_major() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sed 's|/usr/lib/postgresql/\([0-9]*\)/bin|\1|' | sort -n | tail -1
}

# Citus for the distributed layout: already installed into the server, or built and installed
# from the source tarball CITUS_SRC names (as root; build packages from the distribution). Returns
# 1 when there is no Citus and no CITUS_SRC.
ensure_citus() {
    local major
    major=$(server_major)
    [ -n "$major" ] || return 1
    [ -e "/usr/lib/postgresql/$major/lib/citus.so" ] && return 0
    [ -n "${CITUS_SRC:-}" ] || return 1
    [ -f "$CITUS_SRC" ] || { echo "error: CITUS_SRC=$CITUS_SRC is not a file" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "error: building Citus from $CITUS_SRC needs root (it installs into the server)" >&2; exit 1; }
    echo "building Citus from $CITUS_SRC for PostgreSQL $major (a few minutes)" >&2
    local packages=(build-essential "postgresql-server-dev-$major" libkrb5-dev liblz4-dev libzstd-dev)
    dpkg -s "${packages[@]}" >/dev/null 2>&1 || apt_install "${packages[@]}"
    local build
    build=$(mktemp -d)
    tar -xzf "$CITUS_SRC" -C "$build"
    (
        cd "$build"/citus-*
        PG_CONFIG=/usr/lib/postgresql/$major/bin/pg_config ./configure --without-libcurl >"$build/configure.log" 2>&1 ||
            { tail -n 30 "$build/configure.log" >&2; exit 1; }
        make -j"$(nproc)" with_llvm=no >"$build/make.log" 2>&1 || { tail -n 30 "$build/make.log" >&2; exit 1; }
        make install with_llvm=no >"$build/install.log" 2>&1 || { tail -n 30 "$build/install.log" >&2; exit 1; }
    )
    rm -rf "$build"
    [ -e "/usr/lib/postgresql/$major/lib/citus.so" ]
}

# Starts the project-local server (if needed) and exports DATABASE_URL for it. Sets
# STARTED_PG=1 when this call started it, so the caller can stop it again.
# For the test suite: the de_DE.UTF-8 locale, so that a test can give a database translated
# server messages (lc_messages) — ticketops must still tell a lock timeout from them. Made with
# localedef from the distribution's `locales` data; a server that was running before the locale
# existed cannot use it until it restarts, so a running local server is stopped (the suite starts it).
ensure_test_locale() {
    locale -a 2>/dev/null | grep -qix 'de_DE.utf8' && return 0
    can_be_root || {
        echo "error: the tests need the de_DE.UTF-8 locale; make it as root: localedef -i de_DE -f UTF-8 de_DE.UTF-8" >&2
        exit 1
    }
    [ -e /usr/share/i18n/locales/de_DE ] || apt_install locales
    echo "making the de_DE.UTF-8 locale for the tests (localedef)" >&2
    as_root localedef -i de_DE -f UTF-8 de_DE.UTF-8
    local citus
    for citus in "" --citus; do
        if "$project_dir/scripts/pg" status $citus >/dev/null 2>&1; then
            echo "stopping the local server${citus:+ (Citus)}: it starts again with the new locale" >&2
            "$project_dir/scripts/pg" stop $citus >/dev/null
        fi
    done
}

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
# vacuum of a 1M-row table next door costs the timed run seconds). Given a database's URL, first
# analyzes there the tables autovacuum is due to analyze: the months a partitioned import leaves
# to it would otherwise be analyzed a minute later, in the middle of the next timed run.
settle_server() { # [database URL]
    local i due
    if [ -n "${1:-}" ]; then
        due=$(psql -Atq "$1" -c "SELECT string_agg(s.relid::regclass::text, ', ')
            FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
            WHERE c.relkind = 'r' AND s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
                + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)
              AND NOT coalesce(c.reloptions::text ~* 'autovacuum_enabled=(f|false|off|no|0)\\M', false)")
        [ -z "$due" ] || psql -q "$1" -c "ANALYZE (SKIP_LOCKED) $due"
    fi
    for i in $(seq 1 300); do
        [ "$(psql -Atq "$DATABASE_URL" -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && break
        sleep 1
    done
    psql -q "$DATABASE_URL" -c "CHECKPOINT"
    sync
}

# For the benchmarks: installs and starts what they need, builds the release binaries and sets
# data (bench-data/, git-ignored), bin, gen, admin (the server's URL) and base (it without the
# database name).
bench_setup() {
    data=$project_dir/bench-data
    mkdir -p "$data"
    chmod 755 "$data"
    ensure_system_packages
    start_local_pg
    cargo build --release --quiet
    bin=$project_dir/target/release/ticketops
    gen=$project_dir/target/release/ticketops-gen
    admin=$DATABASE_URL
    base=${admin%/*}
}

now() { date +%s.%N; }
# secs START END [DIGITS]: the seconds between two `now`s.
secs() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { printf "%.*f", d, b - a }'; }
# ratio A B: A / B with two decimals.
ratio() { awk -v p="$1" -v o="$2" 'BEGIN { printf "%.2f", p / o }'; }

# seed_tickets DATABASE TOTAL STATUS_SQL: a migrated database with 100 organizations, 20,000
# users (50 agents) and TOTAL tickets with ids 1..TOTAL, whose status is STATUS_SQL (an
# expression of g, the ticket's number); analyzed, and autovacuum off for tickets so that the
# timed runs are measured alike.
seed_tickets() {
    local db=$1 total=$2 status=$3
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    DATABASE_URL=$base/$db "$bin" -q migrate run
    echo "== generating $total tickets" >&2
    psql -q "$base/$db" <<SQL
INSERT INTO organizations (name) SELECT 'org ' || g FROM generate_series(1, 100) g;
INSERT INTO users (email, name, role)
    SELECT 'user' || g || '@example.com', 'User ' || g, (CASE WHEN g <= 50 THEN 'agent' ELSE 'customer' END)::user_role
    FROM generate_series(1, 20000) g;
INSERT INTO tickets (id, external_id, subject, description, status, priority, channel, requester_id, assignee_id,
                     organization_id, created_at, updated_at)
    OVERRIDING SYSTEM VALUE
    SELECT g, 'B-' || g, 'Subject ' || g, 'Some description of ticket ' || g, ($status)::ticket_status,
           'normal', 'email', 51 + g % 19950, 1 + g % 50, 1 + g % 100,
           now() - (g % 1000) * interval '1 day', now() - (g % 500) * interval '1 day'
    FROM generate_series(1, $total) g;
SELECT setval(pg_get_serial_sequence('tickets', 'id'), $total);
VACUUM ANALYZE;
-- The timed runs leave many dead tuples; autovacuum would start during one run but not the other.
ALTER TABLE tickets SET (autovacuum_enabled = false);
SQL
}
