//! What every command gets: the global options and ways to act on them (connecting, progress,
//! messages, JSON). It lives below the commands, so that nothing it serves depends on the list
//! of commands.

use std::io::IsTerminal;

use anyhow::Context as _;

use crate::db;
use crate::exit::UsageError;

/// The options every command takes, as plain values.
#[derive(Debug, Clone, Default)]
pub struct GlobalOpts {
    pub database_url: Option<String>,
    pub json: bool,
    pub progress: ProgressMode,
    pub quiet: bool,
    pub verbose: u8,
}

/// When progress bars are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    #[default]
    Auto,
    Always,
    Never,
}

/// What every command gets: the global options and ways to act on them.
pub struct Context {
    pub global: GlobalOpts,
    /// When the command started, for the JSON summary.
    started_at: chrono::DateTime<chrono::Utc>,
    /// Whether the command printed its JSON object (with --json, a failure prints one too).
    json_printed: std::cell::Cell<bool>,
}

impl Context {
    pub fn new(global: GlobalOpts) -> Self {
        Context {
            global,
            started_at: chrono::Utc::now(),
            json_printed: std::cell::Cell::new(false),
        }
    }

    pub fn json_printed(&self) -> bool {
        self.json_printed.get()
    }

    /// The command writes its JSON object itself, piece by piece, and closes it also when it
    /// fails: no second object is printed after it.
    pub fn json_streamed(&self) {
        self.json_printed.set(true);
    }

    /// The connection string: `--database-url` or `DATABASE_URL`; without either, libpq's own
    /// environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSERVICE`, and
    /// `~/.pgpass`) as psql would use it, when any of those variables is set.
    pub fn database_url(&self) -> anyhow::Result<&str> {
        match self.global.database_url.as_deref() {
            Some(url) if !url.trim().is_empty() => Ok(url),
            _ if crate::conninfo::libpq_environment_set() => Ok(""),
            _ => Err(UsageError(
                "no database given: set DATABASE_URL, pass --database-url, or set libpq's PGHOST/PGDATABASE/PGSERVICE"
                    .into(),
            )
            .into()),
        }
    }

    /// A pool of `size` connections to the configured database, checked to be reachable and
    /// to have every migration of this binary applied.
    pub fn pool(&self, size: u32) -> anyhow::Result<db::Pool> {
        self.pool_checking(size, db::SchemaCheck::UpToDate)
    }

    /// A pool to a database whose schema may be behind (for `doctor`, which reports it).
    pub fn pool_any_schema(&self, size: u32) -> anyhow::Result<db::Pool> {
        self.pool_checking(size, db::SchemaCheck::None)
    }

    fn pool_checking(&self, size: u32, schema: db::SchemaCheck) -> anyhow::Result<db::Pool> {
        let (pool, warning) = db::connect_pool_noting(self.database_url()?, size, schema)?;
        if let Some(warning) = warning {
            self.info(format_args!("warning: {warning}"));
        }
        Ok(pool)
    }

    /// Where progress bars go: `--progress always` draws even when stderr is no terminal;
    /// `--quiet` draws nothing.
    pub fn progress(&self) -> crate::output::Draw {
        use crate::output::Draw;
        if self.global.quiet {
            return Draw::Hidden;
        }
        match self.global.progress {
            ProgressMode::Always => Draw::Always,
            ProgressMode::Never => Draw::Hidden,
            ProgressMode::Auto if std::io::stderr().is_terminal() => Draw::Terminal,
            ProgressMode::Auto => Draw::Hidden,
        }
    }

    /// Prints a human message on stderr unless `--quiet`.
    pub fn info(&self, message: impl std::fmt::Display) {
        if !self.global.quiet {
            eprintln!("{message}");
        }
    }

    /// Adds what a log line of a run needs besides its own keys: when it started and
    /// finished, and which database it worked on (host, port, name; never the password).
    pub fn stamp(&self, summary: &mut serde_json::Value) {
        if let Some(object) = summary.as_object_mut() {
            object.insert("started_at".into(), serde_json::json!(self.started_at));
            object.insert("finished_at".into(), serde_json::json!(chrono::Utc::now()));
            if let Ok(url) = self.database_url() {
                object.insert("database".into(), crate::conninfo::target_of(url));
            }
        }
    }

    /// Prints a JSON value as one line on stdout.
    pub fn print_json(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, value).context("cannot write to stdout")?;
        writeln!(out).context("cannot write to stdout")?;
        self.json_printed.set(true);
        Ok(())
    }

    /// Prints a batch job's summary (a human line on stderr, one JSON line on stdout with
    /// --json) and returns its exit code, or its error.
    pub fn finish_job(&self, summary: crate::job::JobSummary) -> anyhow::Result<i32> {
        self.info(summary.line());
        if self.global.json {
            let mut json = summary.json.clone();
            self.stamp(&mut json);
            self.print_json(&json)?;
        }
        if let Some(note) = &summary.end_not_recorded {
            eprintln!("warning: {note}");
        }
        summary.into_result()
    }

    /// A spinner and `-v` lines for a long job labelled `what`.
    pub fn watch(&self, what: &str) -> crate::output::Watch {
        crate::output::Watch::new(self.progress(), self.global.verbose > 0, what)
    }

    /// `watch`, with the rows the job will do as its total when someone sees the progress and
    /// `count` is cheap (`db::count_within`; a slow count leaves a spinner), capped by
    /// `--max-rows`.
    pub fn watch_counted(
        &self,
        what: &str,
        conn: &mut diesel::PgConnection,
        max_rows: Option<u64>,
        count: impl FnOnce(&mut diesel::PgConnection) -> diesel::QueryResult<i64>,
    ) -> crate::output::Watch {
        let watch = self.watch(what);
        if !watch.is_seen() {
            return watch;
        }
        let total = crate::db::count_within(conn, crate::db::COUNT_BUDGET, count);
        watch.with_total(total.map(|n| max_rows.map_or(n, |max| n.min(max))))
    }

    /// Where engines write their notes.
    pub fn log(&self) -> crate::output::Log {
        crate::output::Log {
            quiet: self.global.quiet,
            verbose: self.global.verbose > 0,
        }
    }

    /// Prints an import's summary (human on stderr unless --quiet, one JSON object with
    /// --json) and its notes, and returns its exit code or error.
    pub fn finish_import(&self, outcome: crate::import::ImportOutcome) -> anyhow::Result<i32> {
        if !self.global.quiet {
            outcome.report.print_human();
        }
        if self.global.json {
            let mut summary = outcome.report.to_json();
            if let (Some(s), Some(extra)) = (summary.as_object_mut(), outcome.extra.as_object()) {
                s.extend(extra.clone());
            }
            self.stamp(&mut summary);
            self.print_json(&summary)?;
        }
        for note in &outcome.notes {
            eprintln!("{note}");
        }
        outcome.result
    }
}
