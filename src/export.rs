//! Export in exactly the import format: `COPY (SELECT …) TO STDOUT` streamed through Diesel's
//! `copy_to`, so memory stays constant whatever the table size. The queries also feed purge's
//! archives, so that an archive imports back like an export.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use diesel::pg::{CopyFormat, CopyTarget, Pg};
use diesel::query_builder::AstPass;
use diesel::{QueryResult, sql_types};

use crate::filters::ResolvedFilters;
use crate::schema;

/// What can be exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
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

/// The tickets in the import format; `$tags` is the tag list of ticket `t`, `$joins` any
/// joins it needs.
macro_rules! tickets_select {
    ($tags:expr, $joins:expr) => {
        concat!(
            "SELECT t.external_id, t.subject, t.description, t.status, t.priority, t.channel,
            r.email AS requester_email, r.name AS requester_name, a.email AS assignee_email,
            o.name AS organization, ",
            $tags,
            " AS tags, ",
            utc!("t.created_at"),
            " AS created_at, ",
            utc!("t.updated_at"),
            " AS updated_at, ",
            utc!("t.solved_at"),
            " AS solved_at
     FROM tickets t
     JOIN users r ON r.id = t.requester_id
     LEFT JOIN users a ON a.id = t.assignee_id
     LEFT JOIN organizations o ON o.id = t.organization_id",
            $joins
        )
    };
}

/// Some tickets (archives, filtered exports): each one's tags looked up by its id.
pub const TICKETS_SELECT: &str = tickets_select!(
    "(SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
              WHERE tt.ticket_id = t.id)",
    ""
);

/// [`TICKETS_SELECT`] for `layout`: on partitions each ticket's tags are read in its month of
/// links alone.
pub fn tickets_select(layout: crate::layout::Layout) -> String {
    if layout.partitioned() {
        TICKETS_SELECT.replacen(
            "WHERE tt.ticket_id = t.id)",
            "WHERE tt.ticket_id = t.id AND tt.ticket_created_at = t.created_at)",
            1,
        )
    } else {
        TICKETS_SELECT.to_owned()
    }
}

/// Every ticket (the unfiltered export): the tag lists aggregated in one pass over the tag
/// links and joined, about a third faster than a lookup per ticket (docs/performance.md).
const ALL_TICKETS_SELECT: &str = tickets_select!(
    "tg.tags",
    "
     LEFT JOIN (SELECT tt.ticket_id, string_agg(g.name, ';' ORDER BY g.name) AS tags
                FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id GROUP BY tt.ticket_id) tg ON tg.ticket_id = t.id"
);

const USERS_SELECT: &str = "SELECT u.email, u.name, u.role, o.name AS organization
     FROM users u LEFT JOIN organizations o ON o.id = u.organization_id";

pub const COMMENTS_SELECT: &str = concat!(
    "SELECT c.external_id, t.external_id AS ticket_external_id, u.email AS author_email, c.body, c.public::text AS public, ",
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
    (ALL_TICKETS_SELECT, " WHERE t.deleted_at IS NULL", " ORDER BY t.id")
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
    copy_csv(target, conn, true, out)
}

fn copy_csv<T: CopyTarget>(
    target: T,
    conn: &mut diesel::PgConnection,
    header: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut reader = diesel::copy_to(target)
        .with_format(CopyFormat::Csv)
        .with_header(header)
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
    drop(reader);
    end_of_copy(conn)?;
    Ok(bytes)
}

/// Collects the status that ends a `COPY … TO`, which Diesel leaves unread: an error the
/// server raised in the middle of the data (a cancel, a statement timeout) arrives there and
/// would otherwise look like the end of the data. libpq's simple-query path (PQexec) discards
/// it, but the error has aborted the transaction every COPY here runs in, so the statement
/// after it fails — and says so.
fn end_of_copy(conn: &mut diesel::PgConnection) -> anyhow::Result<()> {
    diesel::connection::SimpleConnection::batch_execute(conn, "SELECT 1").context(
        "the COPY stopped before the end of the data: the server ended it with an error \
             (a statement_timeout, a cancel, a terminated session)",
    )
}

/// Writes `dataset` as CSV with a header to `out`; returns the bytes written.
pub fn export_all(
    conn: &mut diesel::PgConnection,
    dataset: Dataset,
    include_deleted: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    // In a transaction, so that an error ending the COPY is seen (see `end_of_copy`).
    conn.build_transaction()
        .read_only()
        .repeatable_read()
        .run(|conn| match (dataset, include_deleted) {
            (Dataset::Tickets, false) => copy_out(TicketsExport::<false>, conn, out),
            (Dataset::Tickets, true) => copy_out(TicketsExport::<true>, conn, out),
            (Dataset::Users, false) => copy_out(UsersExport::<false>, conn, out),
            (Dataset::Users, true) => copy_out(UsersExport::<true>, conn, out),
            (Dataset::Comments, false) => copy_out(CommentsExport::<false>, conn, out),
            (Dataset::Comments, true) => copy_out(CommentsExport::<true>, conn, out),
        })
}

// The tickets a filtered export selects, staged on the server: COPY cannot take bound
// parameters, and the filters' values are never rendered into SQL text.
diesel::table! {
    export_selection (id) {
        id -> BigInt,
    }
}

export_query!(
    SelectedTicketsExport,
    schema::tickets::table,
    (
        TICKETS_SELECT,
        "",
        " WHERE t.id IN (SELECT id FROM export_selection) ORDER BY t.id"
    )
);
export_query!(
    SelectedCommentsExport,
    schema::comments::table,
    (
        COMMENTS_SELECT,
        "",
        " WHERE c.ticket_id IN (SELECT id FROM export_selection) ORDER BY c.id"
    )
);

/// Writes the tickets the filters select, or their comments, as CSV with a header; returns
/// the bytes written. The selection is one `INSERT … SELECT` of ids into a temporary table
/// (bound parameters, on the server), then one `COPY` that joins it, in one REPEATABLE READ
/// transaction so that both see the same snapshot. Client memory stays constant.
pub fn export_selected(
    conn: &mut diesel::PgConnection,
    dataset: Dataset,
    filters: &ResolvedFilters,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    use diesel::prelude::*;
    conn.build_transaction().repeatable_read().run(|conn| {
        diesel::sql_query("CREATE TEMPORARY TABLE export_selection (id bigint PRIMARY KEY) ON COMMIT DROP")
            .execute(conn)
            .context("cannot create the temporary table of selected tickets")?;
        diesel::insert_into(export_selection::table)
            .values(filters.query(filters.deleted_scope()).select(schema::tickets::id))
            .into_columns(export_selection::id)
            .execute(conn)
            .context("cannot select the tickets to export")?;
        // Temporary tables are never analyzed by autovacuum; the planner needs their size.
        diesel::sql_query("ANALYZE export_selection").execute(conn)?;
        match dataset {
            Dataset::Tickets => copy_out(SelectedTicketsExport::<true>, conn, out),
            Dataset::Comments => copy_out(SelectedCommentsExport::<true>, conn, out),
            Dataset::Users => anyhow::bail!("users are not selected by ticket filters"),
        }
    })
}

/// The temporary views `cleanup retention` archives a whole partition through (made by
/// [`stage_partition`]): COPY takes no table name as a parameter.
const STAGED_TICKETS: &str = "ticketops_retention_tickets";
const STAGED_COMMENTS: &str = "ticketops_retention_comments";
/// The rows the two views must show, counted without their joins to users (22 ms a month of
/// 42,000 tickets against 1.4): a ticket or comment whose user went missing would fall out of
/// an inner join in both the COPY and its count, but not out of this one.
const STAGED_TICKET_ROWS: &str = "ticketops_retention_ticket_rows";
const STAGED_COMMENT_ROWS: &str = "ticketops_retention_comment_rows";

export_query!(
    StagedTicketsExport,
    schema::tickets::table,
    ("SELECT * FROM ticketops_retention_tickets", "", "")
);
export_query!(
    StagedCommentsExport,
    schema::comments::table,
    ("SELECT * FROM ticketops_retention_comments", "", "")
);

/// Makes the temporary views that show the tickets of `partition` (a partition of tickets, as
/// the catalog names it) and their comments (read from `comments_month`, their month of
/// comments, when it exists) in the export format, and the rows they must show, for
/// [`copy_staged`]. Dropped by [`unstage`] (temporary views outlive a transaction).
pub fn stage_partition(
    conn: &mut diesel::PgConnection,
    partition: &str,
    comments_month: Option<&str>,
) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    let tickets = tickets_select(crate::layout::Layout::Partitioned).replacen(
        "FROM tickets t",
        &format!("FROM {partition} t"),
        1,
    );
    let comments_of = comments_month.unwrap_or("comments");
    let comments = COMMENTS_SELECT.replacen(
        "FROM comments c JOIN tickets t",
        &format!("FROM {comments_of} c JOIN {partition} t"),
        1,
    );
    let ticket_rows = format!("SELECT t.id FROM {partition} t");
    let comment_rows = match comments_month {
        Some(month) => format!("SELECT c.id FROM {month} c"),
        None => format!("SELECT c.id FROM comments c JOIN {partition} t ON t.id = c.ticket_id"),
    };
    for (view, select) in [
        (STAGED_TICKETS, tickets),
        (STAGED_COMMENTS, comments),
        (STAGED_TICKET_ROWS, ticket_rows),
        (STAGED_COMMENT_ROWS, comment_rows),
    ] {
        diesel::sql_query(format!("DROP VIEW IF EXISTS {view}")).execute(conn)?;
        // In the partition's own order: an archive needs no sort.
        diesel::sql_query(format!("CREATE TEMPORARY VIEW {view} AS {select}"))
            .execute(conn)
            .with_context(|| format!("cannot stage {partition} for its archive"))?;
    }
    Ok(())
}

/// Drops the views of [`stage_partition`] (temporary views last as long as the session).
pub fn unstage(conn: &mut diesel::PgConnection) -> anyhow::Result<()> {
    diesel::connection::SimpleConnection::batch_execute(
        conn,
        &format!(
            "DROP VIEW IF EXISTS {STAGED_TICKETS}, {STAGED_COMMENTS}, {STAGED_TICKET_ROWS}, {STAGED_COMMENT_ROWS}"
        ),
    )?;
    Ok(())
}

/// Writes the staged tickets (or their comments) as CSV to `out`, with a header when asked,
/// and checks that every row arrived: Diesel does not read the status that ends a `COPY … TO`,
/// so a server-side error in the middle (a cancel, a timeout) would otherwise look like the end
/// of the data. The records written are counted as they pass and compared with the count of
/// the partition's rows (or their comments) in the same transaction. Returns the records written.
pub fn copy_staged(
    conn: &mut diesel::PgConnection,
    dataset: Dataset,
    header: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    use diesel::RunQueryDsl;
    let mut counted = RecordCounter::new(out);
    let (_, view, rows) = match dataset {
        Dataset::Tickets => (
            copy_csv(StagedTicketsExport::<true>, conn, header, &mut counted)?,
            STAGED_TICKETS,
            STAGED_TICKET_ROWS,
        ),
        Dataset::Comments => (
            copy_csv(StagedCommentsExport::<true>, conn, header, &mut counted)?,
            STAGED_COMMENTS,
            STAGED_COMMENT_ROWS,
        ),
        Dataset::Users => anyhow::bail!("users are not archived by partition"),
    };
    // Belt and braces for an archive: the rows counted as they passed against the rows there
    // are, in the same transaction (and snapshot: retention's is REPEATABLE READ).
    let expected: crate::db::Count = diesel::sql_query(format!("SELECT count(*) AS n FROM {rows}"))
        .get_result(conn)
        .context("cannot check the archive against the rows")?;
    let records = counted.records() - u64::from(header);
    if records != expected.n as u64 {
        anyhow::bail!(
            "the COPY of {view} ended after {records} of {} rows; nothing is removed",
            expected.n
        );
    }
    Ok(records)
}

/// A writer that counts the CSV records passing through it.
struct RecordCounter<'w> {
    inner: &'w mut dyn Write,
    reader: csv_core::Reader,
    output: [u8; 4096],
    ends: [usize; 64],
    records: u64,
}

impl<'w> RecordCounter<'w> {
    fn new(inner: &'w mut dyn Write) -> RecordCounter<'w> {
        RecordCounter {
            inner,
            reader: csv_core::Reader::new(),
            output: [0; 4096],
            ends: [0; 64],
            records: 0,
        }
    }

    fn records(&self) -> u64 {
        self.records
    }
}

impl Write for RecordCounter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut input = &buf[..n];
        loop {
            let (result, read, _, _) = self.reader.read_record(input, &mut self.output, &mut self.ends);
            input = &input[read..];
            match result {
                csv_core::ReadRecordResult::Record => self.records += 1,
                // The fields themselves are not kept: a full buffer is simply reused.
                csv_core::ReadRecordResult::OutputFull | csv_core::ReadRecordResult::OutputEndsFull => {}
                csv_core::ReadRecordResult::InputEmpty | csv_core::ReadRecordResult::End => break,
            }
            if input.is_empty() && !matches!(result, csv_core::ReadRecordResult::Record) {
                break;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
