//! `ticketops export tickets|users|comments [-o FILE]`: CSV in exactly the import format,
//! streamed from PostgreSQL with `COPY (SELECT …) TO STDOUT` through Diesel's `copy_to`, so
//! memory stays constant whatever the table size.

use std::io::{self, BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use diesel::pg::{CopyFormat, CopyTarget, Pg};
use diesel::query_builder::AstPass;
use diesel::{QueryResult, sql_types};

use crate::cli::Context;
use crate::db;
use crate::exit;
use crate::schema;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Timestamps are written in UTC as RFC 3339 with microseconds, tags joined with ';', so that
`export` then `import` into an empty database reproduces the data, and into the same database
reports every row unchanged.

Examples:
  ticketops export tickets -o tickets.csv
  ticketops export users --include-deleted | gzip > users.csv.gz")]
pub struct Args {
    /// What to export
    #[arg(value_enum)]
    pub what: What,
    /// Write to this file instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Include soft-deleted rows
    #[arg(long)]
    pub include_deleted: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Tickets,
    Users,
    Comments,
}

/// RFC 3339 in UTC with microseconds: exact, and read back by every import.
macro_rules! utc {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

pub(crate) const TICKETS_SELECT: &str = concat!(
    "SELECT t.external_id, t.subject, t.description, t.status, t.priority, t.channel,
            r.email AS requester_email, r.name AS requester_name, a.email AS assignee_email,
            o.name AS organization,
            (SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
              WHERE tt.ticket_id = t.id) AS tags, ",
    utc!("t.created_at"),
    " AS created_at, ",
    utc!("t.updated_at"),
    " AS updated_at, ",
    utc!("t.solved_at"),
    " AS solved_at
     FROM tickets t
     JOIN users r ON r.id = t.requester_id
     LEFT JOIN users a ON a.id = t.assignee_id
     LEFT JOIN organizations o ON o.id = t.organization_id"
);

const USERS_SELECT: &str = "SELECT u.email, u.name, u.role, o.name AS organization
     FROM users u LEFT JOIN organizations o ON o.id = u.organization_id";

pub(crate) const COMMENTS_SELECT: &str = concat!(
    "SELECT c.external_id, t.external_id AS ticket_external_id, u.email AS author_email, c.body, c.public, ",
    utc!("c.created_at"),
    " AS created_at
     FROM comments c JOIN tickets t ON t.id = c.ticket_id JOIN users u ON u.id = c.author_id"
);

/// A `COPY` source that is a query rather than a table: Diesel's `copy_to` renders whatever
/// `walk_target` writes after `COPY `.
macro_rules! export_query {
    ($name:ident, $table:ty, $sql:expr) => {
        struct $name<const INCLUDE_DELETED: bool>;

        impl<const INCLUDE_DELETED: bool> CopyTarget for $name<INCLUDE_DELETED> {
            type Table = $table;
            type SqlType = sql_types::Text;

            fn walk_target(mut pass: AstPass<'_, '_, Pg>) -> QueryResult<()> {
                pass.push_sql("(");
                pass.push_sql($sql.0);
                if !INCLUDE_DELETED {
                    pass.push_sql($sql.1);
                }
                pass.push_sql($sql.2);
                pass.push_sql(")");
                Ok(())
            }
        }
    };
}

export_query!(
    TicketsExport,
    schema::tickets::table,
    (TICKETS_SELECT, " WHERE t.deleted_at IS NULL", " ORDER BY t.id")
);
export_query!(
    UsersExport,
    schema::users::table,
    (USERS_SELECT, " WHERE u.deleted_at IS NULL", " ORDER BY u.id")
);
export_query!(
    CommentsExport,
    schema::comments::table,
    (COMMENTS_SELECT, " WHERE t.deleted_at IS NULL", " ORDER BY c.id")
);

fn copy_out<T: CopyTarget>(target: T, conn: &mut diesel::PgConnection, out: &mut dyn Write) -> anyhow::Result<u64> {
    let mut reader = diesel::copy_to(target)
        .with_format(CopyFormat::Csv)
        .with_header(true)
        .load_raw(conn)
        .context("cannot start COPY … TO STDOUT")?;
    let mut bytes = 0u64;
    loop {
        let chunk = reader.fill_buf().context("cannot read from the COPY stream")?;
        if chunk.is_empty() {
            break;
        }
        out.write_all(chunk)?;
        let n = chunk.len();
        bytes += n as u64;
        reader.consume(n);
    }
    Ok(bytes)
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let pool = ctx.pool(1)?;
    let mut conn = db::get(&pool)?;
    let (mut out, target_name): (Box<dyn Write>, String) = match &args.output {
        Some(path) => (
            Box::new(BufWriter::with_capacity(
                1 << 20,
                crate::output::create_private(path).with_context(|| format!("cannot create {}", path.display()))?,
            )),
            path.display().to_string(),
        ),
        None => (
            Box::new(BufWriter::with_capacity(1 << 16, io::stdout().lock())),
            "stdout".into(),
        ),
    };
    let started = std::time::Instant::now();
    let result = match (args.what, args.include_deleted) {
        (What::Tickets, false) => copy_out(TicketsExport::<false>, &mut conn, &mut out),
        (What::Tickets, true) => copy_out(TicketsExport::<true>, &mut conn, &mut out),
        (What::Users, false) => copy_out(UsersExport::<false>, &mut conn, &mut out),
        (What::Users, true) => copy_out(UsersExport::<true>, &mut conn, &mut out),
        (What::Comments, false) => copy_out(CommentsExport::<false>, &mut conn, &mut out),
        (What::Comments, true) => copy_out(CommentsExport::<true>, &mut conn, &mut out),
    };
    let result = result.and_then(|b| {
        out.flush().with_context(|| format!("cannot write {target_name}"))?;
        Ok(b)
    });
    drop(out);
    let bytes = match (result, &args.output) {
        (Ok(bytes), _) => bytes,
        // A partial export looks like a whole one to whoever reads it next: remove it.
        (Err(err), Some(path)) => {
            let removed = match std::fs::remove_file(path) {
                Ok(()) => "the partial file was removed".to_string(),
                Err(e) => format!("the partial file could not be removed ({e}): it is incomplete"),
            };
            return Err(err.context(format!("export to {} failed; {removed}", path.display())));
        }
        (Err(err), None) => return Err(err),
    };
    let what = format!("{:?}", args.what).to_lowercase();
    if ctx.global.json && args.output.is_some() {
        ctx.print_json(&serde_json::json!({
            "kind": format!("export {what}"),
            "file": target_name,
            "bytes": bytes,
            "duration_ms": started.elapsed().as_millis() as u64,
        }))?;
    }
    ctx.info(format!(
        "exported {what} to {target_name} ({bytes} bytes in {:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(exit::SUCCESS)
}
