//! Test harness: a database per test, cloned from a migrated template, and a helper that
//! runs the real `ticketops` binary in a scratch directory.
//!
//! The server is the project-local one (`scripts/test` starts it and sets
//! TICKETOPS_TEST_ADMIN_URL). Without it every test fails with a message saying so: these
//! tests are about real PostgreSQL behaviour and never fall back to anything else.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_ticketops");
pub const GEN: &str = env!("CARGO_BIN_EXE_ticketops-gen");

pub fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    project_dir().join("fixtures").join(name)
}

fn admin_url() -> String {
    if let Ok(url) = std::env::var("TICKETOPS_TEST_ADMIN_URL") {
        return url;
    }
    // Convenience for `cargo test` by hand with the local server running.
    let out = Command::new(project_dir().join("scripts/pg")).arg("url").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .trim_start_matches("DATABASE_URL=")
            .to_string(),
        _ => panic!(
            "no test database server: run the tests with scripts/test, or start one with scripts/pg start \
             (or set TICKETOPS_TEST_ADMIN_URL)"
        ),
    }
}

/// The URL of another database on the same server.
fn url_for(admin: &str, database: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut url = format!("{}/{database}", &base[..path_start]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// The schema layout the suite runs on: `TICKETOPS_TEST_LAYOUT` (plain, partitioned,
/// distributed), plain when unset. `scripts/test` runs the suite once per layout; for
/// `distributed` the admin URL is a Citus coordinator's (`scripts/pg start --citus`).
pub fn layout() -> &'static str {
    static LAYOUT: OnceLock<String> = OnceLock::new();
    LAYOUT.get_or_init(|| std::env::var("TICKETOPS_TEST_LAYOUT").unwrap_or_else(|_| "plain".into()))
}

pub fn partitioned() -> bool {
    layout() == "partitioned"
}

/// An application's `INSERT INTO ticket_tags` of the ticket `ticket_id` (an SQL expression)
/// and the tags `tags` selects (`SELECT id FROM tags …`): on the partitioned layout a link
/// carries its ticket's created_at.
pub fn insert_links_sql(ticket_id: &str, tags: &str) -> String {
    let tags = tags
        .trim_start()
        .strip_prefix("SELECT id")
        .expect("SELECT id FROM tags …");
    if partitioned() {
        format!(
            "INSERT INTO ticket_tags (ticket_id, tag_id, ticket_created_at)
             SELECT {ticket_id}, id, (SELECT created_at FROM tickets WHERE id = {ticket_id}){tags}"
        )
    } else {
        format!("INSERT INTO ticket_tags (ticket_id, tag_id) SELECT {ticket_id}, id{tags}")
    }
}

/// An application's `INSERT INTO comments` of one comment on the ticket `ticket_id` by the
/// user `author_id` (SQL expressions): on the partitioned layout a comment carries its
/// ticket's created_at, read now.
pub fn insert_comment_sql(db: &TestDb, ticket_id: &str, author_id: &str, body: &str) -> String {
    if db.layout == "partitioned" {
        // As an application would: with the created_at it read with the ticket.
        let created_at = db
            .strings(&format!("SELECT created_at::text FROM tickets WHERE id = {ticket_id}"))
            .remove(0);
        format!(
            "INSERT INTO comments (ticket_id, author_id, body, ticket_created_at)
             SELECT {ticket_id}, {author_id}, '{body}', '{created_at}'"
        )
    } else {
        format!("INSERT INTO comments (ticket_id, author_id, body) SELECT {ticket_id}, {author_id}, '{body}'")
    }
}

pub fn distributed() -> bool {
    layout() == "distributed"
}

/// Runs a test only in the distributed suite: elsewhere there is no Citus cluster to run it on.
#[macro_export]
macro_rules! only_on_distributed {
    () => {
        if !$crate::support::distributed() {
            eprintln!("distributed layout only (TICKETOPS_TEST_LAYOUT=distributed)");
            return;
        }
    };
}

/// On a Citus coordinator: a new database exists on every node (the database is created with
/// propagation on), and in it the extension and the workers the admin database knows.
fn make_distributed(admin: &str, name: &str) {
    #[derive(QueryableByName)]
    struct Node {
        #[diesel(sql_type = Text)]
        host: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        port: i32,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        groupid: i32,
    }
    let mut conn = PgConnection::establish(admin).expect("connect to the Citus coordinator");
    let nodes: Vec<Node> = diesel::sql_query(
        "SELECT nodename AS host, nodeport AS port, groupid FROM pg_dist_node WHERE noderole = 'primary' ORDER BY groupid",
    )
    .load(&mut conn)
    .expect("the admin database of a Citus cluster has its nodes registered (scripts/pg start --citus)");
    let url = url_for(admin, name);
    let user = admin
        .split("://")
        .nth(1)
        .and_then(|r| r.split('@').next())
        .unwrap_or("postgres");
    for node in nodes.iter().filter(|n| n.groupid != 0) {
        let worker = format!("postgres://{user}@{}:{}/{name}", node.host, node.port);
        PgConnection::establish(&worker)
            .unwrap_or_else(|e| panic!("{worker}: {e}"))
            .batch_execute("CREATE EXTENSION IF NOT EXISTS citus")
            .unwrap_or_else(|e| panic!("{worker}: {e}"));
    }
    let mut conn = PgConnection::establish(&url).unwrap();
    conn.batch_execute("CREATE EXTENSION IF NOT EXISTS citus").unwrap();
    // Registering a node makes Citus write the role on it (ALTER ROLE): two tests doing it at
    // once failed with "tuple concurrently updated" on the shared catalog. One at a time.
    static REGISTERING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = REGISTERING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for node in &nodes {
        let sql = if node.groupid == 0 {
            format!("SELECT citus_set_coordinator_host('{}', {})", node.host, node.port)
        } else {
            format!("SELECT citus_add_node('{}', {})", node.host, node.port)
        };
        conn.batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Hash of the migrations and the layout scripts, so a changed schema gets a fresh template.
fn migrations_key() -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(project_dir().join("migrations"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).into_iter().flatten())
        .map(|f| f.unwrap().path())
        .chain(
            std::fs::read_dir(project_dir().join("src/layout"))
                .unwrap()
                .map(|f| f.unwrap().path()),
        )
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        for b in f.to_string_lossy().bytes().chain(std::fs::read(&f).unwrap_or_default()) {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// Creates (once per schema version and layout, under an advisory lock, so parallel test
/// processes agree) a template database migrated by the real binary.
fn template_name(layout: &str) -> String {
    static TEMPLATES: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, name)) = templates.iter().find(|(l, _)| l == layout) {
        return name.clone();
    }
    let name = {
        let admin = admin_url();
        let name = format!("ticketops_tpl_{layout}_{}", migrations_key());
        let mut conn = PgConnection::establish(&admin).expect("connect to the test server");
        conn.batch_execute("SELECT pg_advisory_lock(4242)").unwrap();
        let exists = query_json(
            &mut conn,
            &format!("SELECT 1 AS one FROM pg_database WHERE datname = '{name}'"),
        );
        if exists.is_empty() {
            conn.batch_execute(&format!("CREATE DATABASE {name}_tmp")).ok();
            let out = Command::new(BIN)
                .args(["migrate", "run", "--layout", layout])
                .env("DATABASE_URL", url_for(&admin, &format!("{name}_tmp")))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "migrating the template failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            conn.batch_execute(&format!("ALTER DATABASE {name}_tmp RENAME TO {name}"))
                .unwrap();
        }
        conn.batch_execute("SELECT pg_advisory_unlock(4242)").unwrap();
        name
    };
    templates.push((layout.to_string(), name.clone()));
    name
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
    /// The layout it was migrated with (plain for an empty one).
    pub layout: String,
}

impl TestDb {
    /// A login role named after this database and `suffix` that may read everything but
    /// update only tickets' `deleted_at` and `last_operation_id` — as a DBA may set up a cleanup
    /// job — and the URL to connect as it. `DROP OWNED BY role; DROP ROLE role` removes it.
    pub fn cleaner_role(&self, suffix: &str) -> (String, String) {
        let role = format!("{}_{suffix}", self.name);
        self.execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
             GRANT INSERT, UPDATE ON bulk_operations, audit_log TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
             GRANT UPDATE (deleted_at, last_operation_id) ON tickets TO {role};"
        ));
        let (scheme, rest) = self.url.split_once("://").unwrap();
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        let url = format!("{scheme}://{role}@{host}");
        (role, url)
    }
    /// A migrated database in the suite's layout.
    pub fn new() -> TestDb {
        Self::with_layout(layout())
    }

    /// A migrated database in `layout`, whatever the suite's.
    pub fn with_layout(layout: &str) -> TestDb {
        if layout == "distributed" {
            // No templates: the shards live on the workers, in a database of the same name.
            let mut db = Self::create("");
            make_distributed(&db.admin, &db.name);
            let out = Command::new(BIN)
                .args(["migrate", "run", "--layout", layout])
                .env("DATABASE_URL", &db.url)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "migrating failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            db.layout = layout.to_string();
            return db;
        }
        let template = template_name(layout);
        let mut db = Self::create(&format!("TEMPLATE {template}"));
        db.layout = layout.to_string();
        db
    }

    /// An empty database with no schema at all.
    pub fn empty() -> TestDb {
        Self::create("")
    }

    fn create(options: &str) -> TestDb {
        let admin = admin_url();
        let name = format!(
            "ticketops_t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut conn = PgConnection::establish(&admin).expect("connect to the test server");
        propagate_databases(&mut conn);
        conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        conn.batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .unwrap();
        let url = url_for(&admin, &name);
        TestDb {
            name,
            url,
            admin,
            layout: "plain".into(),
        }
    }

    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to the test database")
    }

    /// Runs SQL as an application would. On the partitioned layout an application that writes
    /// tickets writes their keys in the same transaction (the foreign key to ticket_keys is
    /// checked at commit): a test's own INSERT or UPDATE of tickets gets that statement added.
    pub fn execute(&self, sql: &str) {
        let lower = sql.to_lowercase();
        let writes_tickets = lower.contains("insert into tickets") || lower.contains("update tickets");
        let sql = if self.layout == "distributed" && writes_tickets {
            format!(
                "BEGIN; {sql};
                 INSERT INTO ticket_keys (external_id, ticket_id, created_at)
                 SELECT external_id, id, created_at FROM tickets
                 ON CONFLICT (external_id) DO UPDATE SET ticket_id = excluded.ticket_id, created_at = excluded.created_at
                 WHERE (ticket_keys.ticket_id, ticket_keys.created_at) IS DISTINCT FROM (excluded.ticket_id, excluded.created_at);
                 COMMIT;"
            )
        } else if self.layout == "partitioned" && writes_tickets {
            format!(
                "BEGIN; {sql};
                 INSERT INTO ticket_keys (ticket_id, external_id, created_at)
                 SELECT id, external_id, created_at FROM tickets
                 ON CONFLICT (ticket_id) DO UPDATE SET external_id = excluded.external_id, created_at = excluded.created_at
                 WHERE (ticket_keys.external_id, ticket_keys.created_at) IS DISTINCT FROM (excluded.external_id, excluded.created_at);
                 COMMIT;"
            )
        } else if self.layout == "distributed" && (lower.contains("create trigger") || lower.contains("drop trigger")) {
            // Citus creates triggers on the shards of a distributed table only when told to (the
            // tests' triggers touch no other table, which is what it calls safe), and propagates
            // DDL one statement at a time.
            let mut conn = self.conn();
            conn.batch_execute("SET citus.enable_unsafe_triggers TO on").unwrap();
            for statement in sql_statements(sql) {
                conn.batch_execute(statement)
                    .unwrap_or_else(|e| panic!("{statement}: {e}"));
            }
            return;
        } else {
            sql.to_string()
        };
        self.conn().batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `BEGIN; SELECT … FOR UPDATE` of one ticket, as an application holds it: by the ticket's
    /// id (looked up first), so that on Citus it is a one-shard statement, which may lock rows.
    pub fn lock_ticket_sql(&self, external_id: &str) -> String {
        let id = self.scalar(&format!("SELECT id FROM tickets WHERE external_id = '{external_id}'"));
        format!("BEGIN; SELECT * FROM tickets WHERE id = {id} FOR UPDATE")
    }

    /// Runs SQL and returns the server's error as text instead of panicking.
    pub fn conn_result(&self, sql: &str) -> Result<(), String> {
        self.conn().batch_execute(sql).map_err(|e| e.to_string())
    }

    /// Rows of a query as JSON objects.
    pub fn json(&self, sql: &str) -> Vec<Value> {
        query_json(&mut self.conn(), sql)
    }

    pub fn scalar(&self, sql: &str) -> i64 {
        let rows = self.json(&format!("SELECT ({sql})::bigint AS v"));
        rows[0]["v"].as_i64().unwrap_or_else(|| panic!("{sql} gave {rows:?}"))
    }

    /// One string per row: the value of a one-column query, the row's text form otherwise.
    pub fn strings(&self, sql: &str) -> Vec<String> {
        self.json(&format!(
            "{} SELECT row_to_json(q) AS j, (q.*)::text AS r FROM q",
            materialized(sql)
        ))
        .into_iter()
        .map(|row| match row["j"].as_object() {
            Some(obj) if obj.len() == 1 => match obj.values().next().unwrap() {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            },
            _ => row["r"].as_str().unwrap_or("").to_string(),
        })
        .collect()
    }

    /// Everything a ticket import decides, in a stable order: two databases with equal
    /// snapshots hold the same imported data (ids and audit rows aside).
    pub fn ticket_snapshot(&self) -> Vec<String> {
        self.strings(
            "SELECT t.external_id, t.subject, t.description, t.status, t.priority, t.channel,
                    r.email, r.name, r.role, a.email, a.role, o.name, t.created_at, t.updated_at, t.solved_at,
                    t.deleted_at IS NOT NULL AS deleted,
                    (SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
                      WHERE tt.ticket_id = t.id) AS tags
             FROM tickets t JOIN users r ON r.id = t.requester_id
             LEFT JOIN users a ON a.id = t.assignee_id LEFT JOIN organizations o ON o.id = t.organization_id
             ORDER BY t.external_id",
        )
    }

    /// Every user as the imports leave it: name, role and organization by e-mail.
    pub fn user_snapshot(&self) -> Vec<String> {
        self.strings(
            "SELECT u.email, u.name, u.role, o.name FROM users u
             LEFT JOIN organizations o ON o.id = u.organization_id ORDER BY u.email",
        )
    }

    /// The physical identity of every row version: changes whenever any row is rewritten.
    pub fn row_versions(&self, table: &str) -> Vec<String> {
        // (A ctid is unique per shard only: on Citus the order needs the xmin too.)
        self.strings(&format!(
            "SELECT ctid::text, xmin::text FROM {table} ORDER BY ctid, xmin::text"
        ))
    }

    /// An md5 over the whole content of a table, but a ticket's import fingerprint: the
    /// import's bookkeeping, which whatever changes a ticket forgets and an undo does not bring
    /// back (the next import compares that ticket in full).
    pub fn checksum(&self, table: &str) -> String {
        self.strings(&format!(
            "SELECT md5(coalesce(string_agg(r, '|' ORDER BY r), ''))
             FROM (SELECT (to_jsonb(t) - 'import_fingerprint')::text AS r FROM {table} t) rows"
        ))
        .remove(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin) {
            propagate_databases(&mut conn);
            let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// On the distributed suite's Citus coordinator, CREATE and DROP DATABASE reach the workers.
fn propagate_databases(conn: &mut PgConnection) {
    if distributed() {
        conn.batch_execute("SET citus.enable_create_database_propagation TO on")
            .unwrap();
    }
}

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = Text)]
    v: String,
}

/// `WITH q AS … (sql)`: on Citus the rows come to the coordinator first (MATERIALIZED), where a
/// row's JSON or text is made of the whole row; pushed down to the shards it came out empty.
fn materialized(sql: &str) -> String {
    if distributed() {
        format!("WITH q AS MATERIALIZED ({sql})")
    } else {
        format!("WITH q AS ({sql})")
    }
}

fn query_json(conn: &mut PgConnection, sql: &str) -> Vec<Value> {
    let wrapped = format!("{} SELECT row_to_json(q)::text AS v FROM q", materialized(sql));
    let rows: Vec<JsonRow> = diesel::sql_query(&wrapped)
        .load(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| serde_json::from_str(&r.v).unwrap()).collect()
}

/// A scratch directory under target/ for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = project_dir().join("target").join("test-scratch").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The result of running the binary, with everything needed to explain a failed assertion.
pub struct Run {
    pub command: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(command: String, out: Output) -> Run {
        Run {
            command,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn explain(&self) -> String {
        format!(
            "\n--- command: {}\n--- exit code: {}\n--- stdout:\n{}\n--- stderr:\n{}\n",
            self.command, self.code, self.stdout, self.stderr
        )
    }

    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code{}", self.explain());
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked{}",
            self.explain()
        );
        self
    }

    /// The one JSON object printed on stdout with --json.
    pub fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| {
                panic!("no JSON on stdout{}", self.explain());
            });
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e}){}", self.explain()))
    }

    pub fn stderr_has(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}{}",
            self.explain()
        );
        self
    }
}

/// Builds a run of the real binary.
pub struct Cmd {
    command: Command,
    shown: Vec<String>,
    stdin: Option<Vec<u8>>,
}

pub fn ticketops(db: Option<&TestDb>, dir: &Path, args: &[&str]) -> Cmd {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        // libpq's own variables would name a server too: each test says which it uses.
        .env_remove("PGHOST")
        .env_remove("PGHOSTADDR")
        .env_remove("PGPORT")
        .env_remove("PGDATABASE")
        .env_remove("PGUSER")
        .env_remove("PGSERVICE")
        .env_remove("PGPASSWORD")
        .env("NO_COLOR", "1");
    if let Some(db) = db {
        command.env("DATABASE_URL", &db.url);
    }
    Cmd {
        command,
        shown: args.iter().map(|s| s.to_string()).collect(),
        stdin: None,
    }
}

impl Cmd {
    pub fn env(mut self, key: &str, value: &str) -> Cmd {
        self.command.env(key, value);
        self
    }

    /// Runs the binary through `sh -c 'PREFIX; exec …'`, for a umask or a ulimit of its own.
    pub fn shell_prefix(mut self, prefix: &str) -> Cmd {
        let mut wrapped = Command::new("sh");
        wrapped
            .arg("-c")
            .arg(format!("{prefix}; exec \"$0\" \"$@\""))
            .arg(self.command.get_program())
            .args(self.command.get_args());
        if let Some(dir) = self.command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        for (key, value) in self.command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        self.command = wrapped;
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Cmd {
        self.stdin = Some(bytes);
        self
    }

    pub fn run(mut self) -> Run {
        use std::io::Write;
        let shown = format!("ticketops {}", self.shown.join(" "));
        self.command.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.command.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = self.command.spawn().expect("spawn ticketops");
        if let Some(bytes) = self.stdin.take() {
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let out = child.wait_with_output().unwrap();
        Run::from_output(shown, out)
    }

    pub fn spawn(mut self) -> std::process::Child {
        self.command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        self.command.spawn().expect("spawn ticketops")
    }
}

/// Runs an import with --json and checks the accounting identity on its summary.
pub fn import(db: &TestDb, dir: &Path, kind: &str, file: &Path, extra: &[&str]) -> (Run, Value) {
    let file = file.to_str().unwrap();
    let mut args = vec!["--json", "import", kind, file];
    args.extend_from_slice(extra);
    let run = ticketops(Some(db), dir, &args).run();
    let summary = run.json();
    assert_accounted(&summary, &run);
    (run, summary)
}

pub fn assert_accounted(summary: &Value, run: &Run) {
    let n = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in the summary{}", run.explain()))
    };
    let sum = n("inserted") + n("updated") + n("unchanged") + n("duplicate") + n("skipped_deleted") + n("rejected");
    assert_eq!(
        n("rows_read"),
        sum,
        "rows_read is not the sum of the outcomes: {summary}{}",
        run.explain()
    );
}

/// The counts of a summary, in the order inserted, updated, unchanged, duplicate,
/// skipped_deleted, rejected.
pub fn outcome(summary: &Value) -> [u64; 6] {
    [
        "inserted",
        "updated",
        "unchanged",
        "duplicate",
        "skipped_deleted",
        "rejected",
    ]
    .map(|k| summary[k].as_u64().unwrap())
}

/// Generates a synthetic dump with the repository's generator.
pub fn generate(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(GEN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "generator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// Reads a rejects file: (external_id or first field, _line, _error) per record.
pub fn read_rejects(path: &Path) -> Vec<(String, u64, String)> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(path).unwrap();
    let headers = reader.byte_headers().unwrap().clone();
    let line_col = headers.iter().position(|h| h == b"_line").expect("a _line column");
    let error_col = headers.iter().position(|h| h == b"_error").expect("an _error column");
    let mut out = Vec::new();
    for record in reader.byte_records() {
        let record = record.unwrap();
        // Short records carry _record/_line/_error at their own end.
        let (line, error) = if record.len() == headers.len() {
            (record.get(line_col).unwrap(), record.get(error_col).unwrap())
        } else {
            (
                record.get(record.len() - 2).unwrap(),
                record.get(record.len() - 1).unwrap(),
            )
        };
        out.push((
            String::from_utf8_lossy(record.get(0).unwrap()).into_owned(),
            String::from_utf8_lossy(line).parse().unwrap(),
            String::from_utf8_lossy(error).into_owned(),
        ));
    }
    out
}

/// Compares two long lists and reports only the first difference.
pub fn assert_same_rows(got: &[String], expected: &[String], what: &str) {
    if got == expected {
        return;
    }
    let first = got.iter().zip(expected).position(|(g, e)| g != e);
    match first {
        Some(i) => panic!(
            "{what}: {} vs {} rows; first difference at row {i}:\n got:      {}\n expected: {}",
            got.len(),
            expected.len(),
            got[i],
            expected[i]
        ),
        None => panic!(
            "{what}: {} rows vs {} expected (one is a prefix of the other); next expected: {:?}",
            got.len(),
            expected.len(),
            expected.get(got.len())
        ),
    }
}

/// Waits until a running import or job has committed a batch (its operation has a checkpoint).
pub fn wait_for_checkpoint(db: &TestDb, child: &mut std::process::Child) {
    wait_for_checkpoint_of(db, child, "%");
}

/// Waits until an operation whose kind is LIKE `kind` has committed a batch.
pub fn wait_for_checkpoint_of(db: &TestDb, child: &mut std::process::Child, kind: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = db.scalar(&format!(
            "SELECT count(*) FROM bulk_operations WHERE checkpoint IS NOT NULL AND status = 'running' AND kind LIKE '{kind}'"
        ));
        if n > 0 {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the import ended ({status}) before it could be interrupted");
        }
        assert!(Instant::now() < deadline, "no checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a signal (`-TERM`, `-KILL`, …) to a spawned binary.
pub fn kill(child: &std::process::Child, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Runs the binary and returns its result with its peak resident memory in KiB: the high-water
/// mark of its own address space (`VmHWM`), read from /proc while it runs. Not wait4's
/// ru_maxrss: a child forked from this (large, multi-threaded) test process carries the
/// parent's resident size into ru_maxrss across its exec.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which std does not know of
pub fn run_measured(cmd: Cmd) -> (Run, u64) {
    use std::io::Read;
    let shown = format!("ticketops {}", cmd.shown.join(" "));
    let mut child = cmd.spawn();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let pid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let hwm = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                    peak = peak.max(hwm.unwrap_or(0));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        }
    });
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let run = Run {
        command: shown,
        code,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    assert!(peak > 0, "no VmHWM was read for the child");
    (run, peak)
}

pub fn sample_db(name: &str) -> (TestDb, std::path::PathBuf) {
    let db = TestDb::new();
    let dir = scratch(name);
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"])
        .0
        .expect_code(3);
    (db, dir)
}

pub fn dataset() -> (TestDb, std::path::PathBuf) {
    let db = TestDb::new();
    let dir = scratch("cleanup");
    let file = dir.join("dataset.csv");
    std::fs::write(&file, DATASET).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    (db, dir)
}

/// Six tickets with known values, chosen so that every filter selects a different set.
pub const DATASET: &str = "\
external_id,subject,status,priority,channel,requester_email,assignee_email,organization,tags,created_at,updated_at
C-1,One,closed,low,email,ann@example.com,agent@corp.com,Acme,vip,2023-01-10,2023-02-01
C-2,Two,closed,high,web,bob@example.com,,Globex,,2023-06-01,2023-06-02
C-3,Three,open,normal,chat,ann@example.com,agent@corp.com,,vip;billing,2024-03-01T00:30:00+01:00,2024-03-05
C-4,Four,solved,urgent,phone,cid@example.com,other@corp.com,Acme,billing,2024-02-29T23:59:59Z,2024-06-01
C-5,Five,pending,normal,email,bob@example.com,,,,2025-01-01,2025-01-02
C-6,Six,closed,normal,api,ann@example.com,agent@corp.com,Acme,,2022-05-05,2022-05-06
";

pub fn set(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// Everything a ticket is, tags included, for the tickets that match `filter`.
pub fn tickets_and_tags(db: &TestDb, filter: &str) -> String {
    db.checksum(&format!(
        "(SELECT t.*, ARRAY(SELECT tag_id FROM ticket_tags x WHERE x.ticket_id = t.id ORDER BY tag_id) AS tag_ids
          FROM tickets t WHERE {filter})"
    ))
}

/// The arguments of `cleanup retention --created-before CUTOFF --archive ARCHIVE`, then `more`
/// (`--json`, `--apply`, `--archive-comments` and the like).
pub fn retention<'a>(cutoff: &'a str, archive: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["cleanup", "retention", "--created-before", cutoff, "--archive", archive];
    args.extend_from_slice(more);
    args
}

pub fn apply(db: &TestDb, dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--apply", "--yes"]);
    let run = ticketops(Some(db), dir, &all).run();
    run.expect_code(0).json()
}

/// The statements of a script: split at semicolons outside `$$` quoting.
fn sql_statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let (mut start, mut quoted) = (0, false);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"$$") {
            quoted = !quoted;
            i += 2;
            continue;
        }
        if bytes[i] == b';' && !quoted {
            statements.push(sql[start..i].trim());
            start = i + 1;
        }
        i += 1;
    }
    statements.push(sql[start..].trim());
    statements.retain(|s| !s.is_empty());
    statements
}

/// On the distributed layout every comment with an external_id has its key, and no key is left
/// without its comment.
pub fn assert_comment_keys_match(db: &TestDb) {
    if distributed() {
        assert_eq!(
            db.strings("SELECT external_id || ' ' || comment_id || ' ' || ticket_id FROM comment_keys ORDER BY 1"),
            db.strings(
                "SELECT external_id || ' ' || id || ' ' || ticket_id FROM comments
                 WHERE external_id IS NOT NULL ORDER BY 1"
            ),
        );
    }
}

/// A trigger `boom` that fails the `event` (INSERT or UPDATE) of one ticket with "injected
/// failure": a failure injected mid-run (`DROP TRIGGER boom ON tickets` lifts it).
pub fn inject_failure(db: &TestDb, event: &str, external_id: &str) {
    db.execute(&format!(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.external_id = '{external_id}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER boom BEFORE {event} ON tickets FOR EACH ROW EXECUTE FUNCTION boom();"
    ));
}
