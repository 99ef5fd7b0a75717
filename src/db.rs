//! Database plumbing: the connection pool, URL masking, per-batch timeouts, advisory locks.

use std::time::Duration;

use anyhow::Context as _;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::sql_types::{Bool, Text};
use diesel::{Connection, QueryResult, RunQueryDsl, sql_query};

use crate::exit::LockHeld;

/// The migrations in `migrations/`, embedded in the binary (build.rs rebuilds on change).
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations = diesel_migrations::embed_migrations!("migrations");

pub type Pool = diesel::r2d2::Pool<ConnectionManager<PgConnection>>;
pub type PooledConn = PooledConnection<ConnectionManager<PgConnection>>;

/// How long to wait for a connection from the pool (and for the server to answer at all).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::conninfo::mask_url;
use crate::conninfo::{scrub, with_connection_params};

/// Connects once directly, so that an unreachable server gives libpq's own message rather
/// than the pool's "timed out", then builds the pool.
pub fn connect_pool(url: &str, size: u32, schema: SchemaCheck) -> anyhow::Result<Pool> {
    connect_pool_noting(url, size, schema).map(|(pool, _)| pool)
}

/// `connect_pool`, and a warning for the person running the command when the server's
/// messages stay translated (see [`MessageLanguage`]).
pub fn connect_pool_noting(url: &str, size: u32, schema: SchemaCheck) -> anyhow::Result<(Pool, Option<String>)> {
    let full_url = with_connection_params(url);
    let mut first = establish(url)?;
    if schema == SchemaCheck::UpToDate {
        require_current_schema(&mut first)?;
    }
    let language = MessageLanguage::of(&mut first)?;
    if let MessageLanguage::SetToC { superuser } = language {
        UNTRANSLATED_MESSAGES.store(true, std::sync::atomic::Ordering::Relaxed);
        UNTRANSLATED_IN_BATCHES.store(superuser, std::sync::atomic::Ordering::Relaxed);
    }
    drop(first);
    let manager = ConnectionManager::<PgConnection>::new(full_url);
    let pool = diesel::r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(0))
        .test_on_check_out(true)
        .connection_timeout(CONNECTION_TIMEOUT)
        .connection_customizer(Box::new(UtcSession))
        .build(manager)
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot create a connection pool for {}: {}",
                mask_url(url),
                scrub(&err.to_string(), url)
            )
        })?;
    Ok((pool, language.warning()))
}

/// Whether ticketops' sessions ask for untranslated messages ([`MessageLanguage::SetToC`]): each
/// pooled session. One flag for the process: a run works on one database.
static UNTRANSLATED_MESSAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether each batch transaction asks again with `SET LOCAL`, which Citus passes on to the
/// workers' sessions, whose errors the coordinator relays in the workers' language. For a
/// superuser only: a role granted `lc_messages` on the coordinator may not have it on the
/// workers (Citus does not pass `GRANT SET ON PARAMETER` on), where the `SET LOCAL` would fail
/// every batch.
static UNTRANSLATED_IN_BATCHES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The language of the server's messages to ticketops' sessions. ticketops tells the
/// failures worth retrying — a lock timeout, a deadlock, a lock not available
/// ([`crate::job::is_transient`]) — by their English text: Diesel's errors carry no SQLSTATE
/// for them. On a server whose `lc_messages` translates them, each would end a run instead of being
/// retried. So where the server lets a session choose (`lc_messages` is a superuser's setting,
/// or granted with `GRANT SET ON PARAMETER`), every session asks for untranslated messages.
#[derive(Debug)]
pub enum MessageLanguage {
    /// English already (`C`, `POSIX`, `en_*`), or the server's environment's (an empty setting).
    English,
    /// Translated by default, untranslated in ticketops' sessions (this role is a superuser, or
    /// was granted the setting).
    SetToC { superuser: bool },
    /// Translated, and this role may not change it: the value and the role.
    Translated { value: String, role: String },
}

impl MessageLanguage {
    fn of(conn: &mut PgConnection) -> anyhow::Result<Self> {
        use diesel::connection::SimpleConnection;
        #[derive(diesel::QueryableByName)]
        struct Setting {
            #[diesel(sql_type = Text)]
            value: String,
            #[diesel(sql_type = Text)]
            role: String,
            #[diesel(sql_type = Bool)]
            superuser: bool,
        }
        let Setting { value, role, superuser } = sql_query(
            "SELECT current_setting('lc_messages') AS value, quote_ident(current_user) AS role,
                    coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) AS superuser",
        )
        .get_result(conn)
        .context("cannot read the server's lc_messages")?;
        let lower = value.to_ascii_lowercase();
        if lower.is_empty() || lower == "c" || lower.starts_with("c.") || lower == "posix" || lower.starts_with("en") {
            return Ok(Self::English);
        }
        if conn.batch_execute("SET lc_messages TO 'C'").is_ok() {
            return Ok(Self::SetToC { superuser });
        }
        // A server built without translations (or without this language's) speaks English
        // whatever the setting: ask it something it must refuse, and read the answer (named,
        // for whoever reads the server log's error line).
        let answer = conn
            .batch_execute("SELECT 1 / 0 AS ticketops_asks_the_language_of_messages")
            .map_err(|e| e.to_string());
        if answer.is_err_and(|message| message.contains("division by zero")) {
            return Ok(Self::English);
        }
        Ok(Self::Translated { value, role })
    }

    fn warning(&self) -> Option<String> {
        match self {
            Self::Translated { value, role } => Some(format!(
                "the server's messages are in {value:?} (lc_messages) and role {role} may not change that: \
                 lock timeouts and deadlocks, recognized by their English text, will fail the run instead of \
                 being retried; a superuser can allow it (PostgreSQL 15+: GRANT SET ON PARAMETER lc_messages \
                 TO {role}) or set it (ALTER ROLE {role} SET lc_messages = 'C')"
            )),
            Self::English | Self::SetToC { .. } => None,
        }
    }
}

/// Whether a command needs the schema of this binary's migrations before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaCheck {
    UpToDate,
    /// `doctor` reports pending migrations itself.
    None,
}

/// Every embedded migration's version and whether the database has it applied. Reads only:
/// a database that was never migrated has every migration pending (diesel's own lookup would
/// create its bookkeeping table first).
pub fn migration_status(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, bool)>> {
    use diesel::migration::MigrationSource;
    #[derive(diesel::QueryableByName)]
    struct Version {
        #[diesel(sql_type = Text)]
        version: String,
    }
    let table: Vec<Version> =
        sql_query("SELECT coalesce(to_regclass('__diesel_schema_migrations')::text, '') AS version").load(conn)?;
    let applied: Vec<String> = if table.first().is_some_and(|t| !t.version.is_empty()) {
        sql_query("SELECT version::text AS version FROM __diesel_schema_migrations")
            .load::<Version>(conn)
            .context("cannot read applied migrations")?
            .into_iter()
            .map(|v| v.version)
            .collect()
    } else {
        Vec::new()
    };
    let known = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(known
        .iter()
        .map(|m| {
            let version = m.name().version().to_string();
            let is_applied = applied.contains(&version);
            (version, is_applied)
        })
        .collect())
}

/// Fails, saying what to run, unless every migration of this binary is applied: commands
/// would otherwise fail half-way with errors about missing relations or types.
pub fn require_current_schema(conn: &mut PgConnection) -> anyhow::Result<()> {
    let status = migration_status(conn).context("cannot check the database's migrations")?;
    let pending: Vec<&str> = status.iter().filter(|(_, a)| !a).map(|(v, _)| v.as_str()).collect();
    if pending.is_empty() {
        Ok(())
    } else if pending.len() == status.len() {
        anyhow::bail!("the database has no ticketops schema yet: run 'ticketops migrate run'")
    } else {
        anyhow::bail!(
            "the database is missing {} migration(s) of this ticketops ({}): run 'ticketops migrate run'",
            pending.len(),
            pending.join(", ")
        )
    }
}

/// Every pooled session runs in UTC: timestamps that SQL turns into text or JSON (audit
/// images, which `undo` compares with current values) then read the same whatever the
/// server's or the role's default time zone. And without JIT: ticketops' statements are
/// batches and one-off counts whose run time is milliseconds to a second, and the planner's
/// guesses for bound arrays and set-returning functions price many of them past
/// `jit_above_cost` — compiling then took longer than running (the dry run of an undo of
/// 20,000 rows: 1.37 s of JIT in a 1.66 s statement; a page of `ops show --changes`: 450 ms
/// against 1). Reports and exports measured the same or faster without it (an export on the
/// partitioned layout compiled every partition's scan: 1.36 s against 0.18).
///
/// And without Diesel's cache of prepared statements: a cached statement is planned
/// generically after five runs, which prices a bound array as ten values — a `--ids-file` of
/// 100,000 tickets was searched linearly for every row of every batch (3.7 s a `fix set`
/// batch of 5,000; 0.7 s planned for its values, where the array is hashed). Uncached, each
/// statement goes out unnamed with its values and is planned for them, as statements written
/// as SQL text always were. (`plan_cache_mode = force_custom_plan` did the same for a while,
/// but it also replanned every foreign-key check and cascade the server runs for each row
/// and every statement of the PL/pgSQL triggers: an import's inserts and a retention's key
/// deletes cost twice their time.)
/// And with untranslated messages where the server translates them and lets the role choose
/// ([`MessageLanguage`]).
///
/// And in READ COMMITTED whatever the database's or role's `default_transaction_isolation`:
/// the batches are written for it — a writer that waited for another's lock (an advisory lock,
/// a row lock, a unique key) then sees what the other committed. A repeatable read snapshot,
/// taken before the wait, does not: with `--jobs 4` a comment without external_id repeated in
/// the file was made twice. What needs one snapshot (exports, reports, a retention month, the
/// import's read-ahead) asks for REPEATABLE READ itself.
///
/// And without the server's idle timeouts (`idle_session_timeout`, `idle_in_transaction_session_timeout`),
/// which a DBA may set against forgotten sessions: a run's sessions live only as long as the run, and
/// some wait idle by design — the one holding a job's advisory lock for the whole run (ended by the
/// server, the lock would let a second cron run start beside this one), a transaction waiting for
/// the work of the run's other connection (a retention month's archive, the ANALYZE helper) or for
/// the reader (`--atomic`, `--initial-load`). Every wait for a lock is bounded by `lock_timeout`.
///
/// And with `standard_conforming_strings` on (every connection, [`establish`]'s too): the SQL
/// written here and in the migrations has backslashes in its string literals (the regular
/// expressions that read a partition's bounds), which a database set to `off` read as escapes —
/// every import on the partitioned layout failed there ("Unexpected null for non-null column").
#[derive(Debug)]
struct UtcSession;

impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for UtcSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        use diesel::connection::SimpleConnection;
        conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
        // On Citus, SET LOCAL (the batch timeouts) reaches the workers' sessions too; elsewhere
        // the setting is an unused placeholder.
        conn.batch_execute(
            "SET TIME ZONE 'UTC'; SET jit = off; SET citus.propagate_set_commands TO 'local';
             SET default_transaction_isolation TO 'read committed'; SET standard_conforming_strings = on;
             SELECT set_config(name, '0', false) FROM pg_settings
             WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout')",
        )
        .map_err(diesel::r2d2::Error::QueryError)?;
        if UNTRANSLATED_MESSAGES.load(std::sync::atomic::Ordering::Relaxed) {
            conn.batch_execute("SET lc_messages TO 'C'")
                .map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(())
    }
}

/// One connection outside any pool, with a message a person can act on when it fails; string
/// literals read as standard SQL (see [`UtcSession`]).
pub fn establish(url: &str) -> anyhow::Result<PgConnection> {
    use diesel::connection::SimpleConnection as _;
    let mut conn = connect(url)?;
    conn.batch_execute("SET standard_conforming_strings = on")
        .context("cannot set up the session")?;
    Ok(conn)
}

fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::establish(&with_connection_params(url)).map_err(|err| {
        let reason = scrub(err.to_string().trim(), url)
            .replace("\\n", " ")
            .replace("\\t", "");
        anyhow::anyhow!(
            "cannot connect to {}: {} — {}",
            crate::conninfo::describe(url),
            reason,
            crate::conninfo::next_step(&reason)
        )
    })
}

/// Whether an error is the database connection going away (the server stopped or
/// restarted, the session was terminated, the network broke) rather than a failed statement.
pub fn is_connection_lost(err: &anyhow::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    if err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<Error>(),
            Some(Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _) | Error::BrokenTransactionManager)
        )
    }) {
        return true;
    }
    let text = format!("{err:#}");
    [
        "server closed the connection",
        "terminating connection",
        "no connection to the server",
        "could not receive data from server",
        "could not send data to server",
        "connection to server was lost",
        "SSL connection has been closed",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Names a lost connection as such in front of the driver's own words, which for a broken
/// session are often about something else (a type lookup that failed, say).
pub fn name_lost_connection(err: anyhow::Error) -> anyhow::Error {
    if is_connection_lost(&err) {
        err.context(
            "the connection to the database was lost (the server stopped or restarted, or the session was terminated)",
        )
    } else {
        err
    }
}

/// Checks a connection out of the pool with context.
pub fn get(pool: &Pool) -> anyhow::Result<PooledConn> {
    pool.get().context("cannot get a database connection from the pool")
}

/// Timeouts applied to each batch transaction, so that a bulk job never waits long on
/// rows a live application holds, nor holds its own locks for long.
#[derive(Debug, Clone, Copy)]
pub struct BatchTimeouts {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
}

impl Default for BatchTimeouts {
    fn default() -> Self {
        BatchTimeouts {
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
        }
    }
}

/// For the rest of the current transaction, changes to tag links leave the tickets' import
/// fingerprints alone (the triggers of the migrations `import_fingerprint` and
/// `fingerprint_links_per_statement`): for a writer that writes the fingerprints itself, or
/// whose tickets go in the same transaction.
pub fn keep_fingerprints(conn: &mut PgConnection) -> QueryResult<()> {
    use diesel::connection::SimpleConnection as _;
    conn.batch_execute("SET LOCAL ticketops.fingerprints_kept = on")
}

/// Sets the timeouts for the rest of the current transaction only (and untranslated
/// messages again, for Citus' workers: see [`UNTRANSLATED_IN_BATCHES`]). And no idle timeout
/// for it: the session's own setting ([`UtcSession`]) does not reach the sessions Citus opens on
/// its workers, which sit idle in the transaction while ticketops waits (for the reader, say).
pub fn set_local_timeouts(conn: &mut PgConnection, timeouts: BatchTimeouts) -> QueryResult<()> {
    use diesel::connection::SimpleConnection;
    let messages = if UNTRANSLATED_IN_BATCHES.load(std::sync::atomic::Ordering::Relaxed) {
        "; SET LOCAL lc_messages TO 'C'"
    } else {
        ""
    };
    conn.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {};
         SET LOCAL idle_in_transaction_session_timeout = 0{messages}",
        timeouts.lock_timeout.as_millis(),
        timeouts.statement_timeout.as_millis()
    ))
}

/// Runs `lock` (a `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` of tables others read) in the
/// caller's transaction in short tries — each waiting at most [`LOCK_TRY`], in a savepoint, with
/// a pause between — until `patience` is spent, then fails as a lock timeout. While such a lock
/// waits, every query on those tables queues behind it: waiting `patience` in one go held up
/// every reader of tickets for as long as a transaction held any of them.
pub fn lock_in_short_tries(conn: &mut PgConnection, lock: &str, patience: Duration) -> anyhow::Result<()> {
    use diesel::Connection as _;
    use diesel::sql_types::Text;
    let started = std::time::Instant::now();
    let set_lock_timeout = |conn: &mut PgConnection, timeout: Duration| {
        sql_query("SELECT set_config('lock_timeout', $1, true)")
            .bind::<Text, _>(format!("{}ms", timeout.as_millis()))
            .execute(conn)
    };
    loop {
        let tried = conn.transaction(|conn| {
            set_lock_timeout(conn, LOCK_TRY.min(patience))?;
            sql_query(lock).execute(conn)
        });
        // (a setting made in a savepoint that is released lasts to the end of the transaction)
        set_lock_timeout(conn, patience)?;
        match tried {
            Ok(_) => return Ok(()),
            Err(err) if err.to_string().contains("lock timeout") && started.elapsed() < patience => {
                std::thread::sleep(LOCK_PAUSE);
            }
            Err(err) => {
                return Err(anyhow::Error::from(err).context(format!("{lock}: lock timeout after {patience:?}")));
            }
        }
    }
}

/// How long one try of [`lock_in_short_tries`] waits, and the pause after a try that failed.
pub const LOCK_TRY: Duration = Duration::from_millis(100);
pub const LOCK_PAUSE: Duration = Duration::from_millis(100);

/// How long a count for a progress bar may take before the bar is a spinner instead.
pub const COUNT_BUDGET: Duration = Duration::from_secs(2);

/// A count for a progress bar, when it is cheap: `count` runs under a `statement_timeout` of
/// `budget` in its own transaction; a count that takes longer (or fails) is `None`.
pub fn count_within(
    conn: &mut PgConnection,
    budget: Duration,
    count: impl FnOnce(&mut PgConnection) -> QueryResult<i64>,
) -> Option<u64> {
    conn.transaction(|conn| {
        diesel::sql_query(format!("SET LOCAL statement_timeout = {}", budget.as_millis().max(1))).execute(conn)?;
        count(conn)
    })
    .ok()
    .map(|n| n.max(0) as u64)
}

/// Runs `f` in its own transaction with `SET LOCAL lock_timeout` / `statement_timeout`.
pub fn in_batch_transaction<T, E, F>(conn: &mut PgConnection, timeouts: BatchTimeouts, f: F) -> Result<T, E>
where
    F: FnOnce(&mut PgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    conn.transaction(|conn| {
        set_local_timeouts(conn, timeouts)?;
        f(conn)
    })
}

#[derive(diesel::QueryableByName)]
struct LockHolder {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    application_name: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::Double)]
    seconds: f64,
}

/// `LOCK TABLE tables IN mode MODE` inside the current transaction, waiting at most the
/// transaction's `lock_timeout` (which the caller has set: a LOCK that waits without limit
/// also makes every later reader of the table queue behind it). When it times out, the error
/// names the sessions that hold conflicting locks on the tables. It runs in a savepoint, so
/// that they can still be looked up on this connection.
pub fn lock_tables(conn: &mut PgConnection, tables: &[&str], mode: &str) -> anyhow::Result<()> {
    let list = tables.join(", ");
    let locked = conn.transaction(|c| sql_query(format!("LOCK TABLE {list} IN {mode} MODE")).execute(c));
    let Err(err) = locked else { return Ok(()) };
    if !err.to_string().contains("lock timeout") {
        return Err(anyhow::Error::from(err).context(format!("cannot lock {list}")));
    }
    let holders: Vec<LockHolder> = sql_query(
        "SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), '?') AS application_name,
                coalesce(a.state, '?') AS state,
                greatest(coalesce(extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::float8, 0), 0) AS seconds
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.granted AND l.pid <> pg_backend_pid()
           AND l.relation = ANY (SELECT to_regclass(t)::oid FROM unnest($1::text[]) t)
         ORDER BY seconds DESC LIMIT 10",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(tables)
    .load(conn)
    .unwrap_or_default();
    let timeout: String = sql_query("SELECT current_setting('lock_timeout') AS v")
        .get_result::<Setting>(conn)
        .map(|s| s.v)
        .unwrap_or_else(|_| "?".into());
    let named: Vec<String> = holders
        .iter()
        .map(|h| {
            format!(
                "pid {} ({}, {}, for {:.0} s)",
                h.pid, h.application_name, h.state, h.seconds
            )
        })
        .collect();
    let who = if named.is_empty() {
        "sessions that have since let go".to_string()
    } else {
        named.join(", ")
    };
    Err(anyhow::anyhow!(
        "cannot lock {list} within the lock timeout of {timeout} (--lock-timeout): held by {who}; \
         nothing was changed — try again when they are done, or with a longer --lock-timeout"
    ))
}

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    v: String,
}

#[derive(diesel::QueryableByName)]
struct SafeAnswer {
    #[diesel(sql_type = Bool)]
    safe: bool,
}

/// Whether an UPDATE of `table` may name `columns` in its SET list without changing them
/// (`column = column`) and without side effects: the user may update them, and no user trigger
/// on the table is limited to columns (an `UPDATE OF column` trigger fires whenever its column
/// is named, changed or not).
pub fn can_restate_columns(conn: &mut PgConnection, table: &str, columns: &[&str]) -> QueryResult<bool> {
    let answer: SafeAnswer = sql_query(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_trigger
                            WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND cardinality(tgattr::int2[]) > 0)
                AND coalesce(bool_and(has_column_privilege(to_regclass($1), c, 'UPDATE')), true) AS safe
         FROM unnest($2::text[]) c",
    )
    .bind::<Text, _>(table)
    .bind::<diesel::sql_types::Array<Text>, _>(columns)
    .get_result(conn)?;
    Ok(answer.safe)
}

#[derive(diesel::QueryableByName)]
struct LockAnswer {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// The 64-bit advisory lock key for a name: stable across runs and clients.
const LOCK_KEY_SQL: &str = "('x' || substr(md5('ticketops:' || $1), 1, 16))::bit(64)::bigint";

/// A session-level PostgreSQL advisory lock held for as long as this value lives; it is
/// released explicitly on drop, and by the server if the connection dies.
pub struct AdvisoryLock {
    conn: PooledConn,
    name: String,
}

impl AdvisoryLock {
    /// Tries to take the lock without waiting; another holder gives [`LockHeld`] (exit 75).
    pub fn try_acquire(pool: &Pool, name: &str) -> anyhow::Result<AdvisoryLock> {
        let mut conn = get(pool)?;
        let answer: LockAnswer = sql_query(format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL}) AS locked"))
            .bind::<Text, _>(name)
            .get_result(&mut conn)
            .with_context(|| format!("cannot take the advisory lock '{name}'"))?;
        if !answer.locked {
            return Err(LockHeld(name.to_string()).into());
        }
        Ok(AdvisoryLock {
            conn,
            name: name.to_string(),
        })
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let _ = sql_query(format!("SELECT pg_advisory_unlock({LOCK_KEY_SQL}) AS locked"))
            .bind::<Text, _>(&self.name)
            .execute(&mut self.conn);
    }
}

/// One `name` column of a raw query's rows (a table's, as the catalog gives it).
#[derive(Debug, diesel::QueryableByName)]
pub struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub name: String,
}

/// One `id` column of a raw query's rows.
#[derive(Debug, diesel::QueryableByName)]
pub struct Id {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub id: i64,
}

/// A row of one count, `… AS n`.
#[derive(Debug, diesel::QueryableByName)]
pub struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}
