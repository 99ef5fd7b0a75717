//! The initial load's months of tickets on the partitioned layout, staged: their rows go into
//! tables of their own on a second connection, committed there before the load ends, so that two
//! connections build their keys and indexes two months at a time — PostgreSQL 15 builds the index
//! of a partitioned table one partition after another in one backend, and a month is too small
//! for parallel workers to pay off. The load's transaction then puts each staged table in place of
//! its empty month (the month dropped, the table renamed to it and attached) and attaches its
//! indexes to the parent's.
//!
//! Until the load commits, the staged tables are no part of tickets: a load that fails leaves
//! tickets as it was. Its staged tables are dropped when the load ends either way (those of a
//! killed process by the next initial load, which finds them by their prefix while it holds
//! tickets, so that no other load is staging).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Context as _;
use diesel::connection::SimpleConnection as _;
use diesel::sql_types::{Array, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use crate::db::{Name, Pool, PooledConn};
use crate::import::initial_load::Definition;
use crate::layout::MonthlyPartition;
use crate::layout::STAGED_TABLE_PREFIX;

pub(super) struct StagedMonths {
    /// The staging connection: in the staging transaction until [`build`](Self::build).
    conn: PooledConn,
    pool: Pool,
    /// Whether `conn` is in the staging transaction.
    open: bool,
    /// This load's prefix.
    prefix: String,
    /// The schema of tickets, where the staged tables go (quoted).
    schema: String,
    /// The columns (and CHECK constraints) of tickets, as `CREATE TABLE` takes them.
    columns: String,
    /// The names of the columns of tickets, in their order.
    column_names: String,
    months: Vec<StagedMonth>,
    /// Index into `months` by the month's name.
    by_month: HashMap<String, usize>,
}

struct StagedMonth {
    /// The month of tickets, as the catalog names it.
    month: String,
    /// The staged table: its name, and with its schema.
    table: String,
    qualified: String,
    from: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
    rows: u64,
}

impl StagedMonths {
    /// Opens the staging connection and its transaction, once the load holds tickets: drops
    /// what a killed load left. `columns`: [`columns_of_tickets`], read before.
    pub(super) fn start(pool: &Pool, columns: TicketColumns) -> anyhow::Result<StagedMonths> {
        let mut conn = crate::db::get(pool)?;
        // (Any: a load that is staging holds tickets, which this one holds now.)
        let leftovers = crate::layout::staged_tables(&mut conn, false)?;
        for leftover in leftovers {
            sql_query(format!("DROP TABLE IF EXISTS {}", leftover))
                .execute(&mut conn)
                .with_context(|| format!("cannot drop {}, left by an initial load that did not end", leftover))?;
        }
        let prefix: Name = sql_query(format!(
            "SELECT '{STAGED_TABLE_PREFIX}' || pg_backend_pid() || '_' AS name"
        ))
        .get_result(&mut conn)?;
        let schema: Name = sql_query(
            "SELECT quote_ident(n.nspname) AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = 'tickets'::regclass",
        )
        .get_result(&mut conn)?;
        conn.batch_execute("BEGIN")?;
        Ok(StagedMonths {
            conn,
            pool: pool.clone(),
            open: true,
            prefix: prefix.name,
            schema: schema.name,
            columns: columns.definitions,
            column_names: columns.names,
            months: Vec::new(),
            by_month: HashMap::new(),
        })
    }

    /// The staged table of `month` (made on first use, in the staging transaction: its rows
    /// go in frozen), which is to get `rows` more rows.
    pub(super) fn table_for(&mut self, month: &MonthlyPartition, rows: usize) -> anyhow::Result<&str> {
        let index = match self.by_month.get(&month.name) {
            Some(&index) => index,
            None => {
                let table = format!("{}{}", self.prefix, self.months.len());
                let qualified = format!("{}.{table}", self.schema);
                // Autovacuum kept off until it is a month: it would hold up the index builds and
                // the swap (for up to deadlock_timeout, when it yields).
                sql_query(format!(
                    "CREATE TABLE {qualified} ({}) WITH (autovacuum_enabled = false)",
                    self.columns
                ))
                .execute(&mut *self.conn)
                .with_context(|| format!("cannot create a table for the rows of {}", month.name))?;
                self.months.push(StagedMonth {
                    month: month.name.clone(),
                    table,
                    qualified,
                    from: month.from,
                    until: month.until,
                    rows: 0,
                });
                self.by_month.insert(month.name.clone(), self.months.len() - 1);
                self.months.len() - 1
            }
        };
        self.months[index].rows += rows as u64;
        Ok(&self.months[index].qualified)
    }

    /// The staging connection, for the COPYs into the staged tables.
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Commits the staged rows, then builds the keys and indexes `definitions` gives for
    /// tickets on every staged month (with a CHECK of its bounds, so that attaching it reads
    /// nothing), on two connections, the largest months first; runs `meanwhile` on this thread
    /// the while.
    pub(super) fn build<R>(
        &mut self,
        definitions: &[Definition],
        meanwhile: impl FnOnce() -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        self.conn
            .batch_execute("COMMIT")
            .context("cannot commit the staged months")?;
        self.open = false;
        let mut order: Vec<usize> = (0..self.months.len()).collect();
        // Popped from the end: the largest last in the vector.
        order.sort_by_key(|&i| self.months[i].rows);
        let queue = Mutex::new(order);
        let mut second = crate::db::get(&self.pool)?;
        let months = &self.months;
        let definitions: Vec<(usize, &Definition)> = definitions
            .iter()
            .enumerate()
            .filter(|(_, d)| d.table() == "tickets")
            .collect();
        let side = |conn: &mut PgConnection| -> anyhow::Result<()> {
            loop {
                let Some(next) = queue.lock().expect("no builder panics holding it").pop() else {
                    return Ok(());
                };
                build_month(conn, &months[next], &definitions).inspect_err(|_| {
                    queue.lock().expect("no builder panics holding it").clear();
                })?;
            }
        };
        let first = &mut *self.conn;
        std::thread::scope(|scope| {
            let one = scope.spawn(|| side(first));
            let two = scope.spawn(|| side(&mut second));
            let result = meanwhile();
            let one = one.join().expect("a month's build does not panic");
            let two = two.join().expect("a month's build does not panic");
            one.and(two).and(result)
        })
    }

    /// In the load's transaction, after [`build`](Self::build): each staged table in place of
    /// its month, which is dropped (empty: the load writes the months' rows here), and its
    /// indexes named as the month's own would be. A month with anything of its own (an index,
    /// a trigger, a constraint, storage options, column statistics targets, grants, policies,
    /// statistics objects,
    /// a publication, a comment, another owner, something that depends on it such as a view)
    /// is kept, and gets the
    /// staged rows copied in instead, its indexes built by `recreate_by_month`. Returns the
    /// indexes ready for the parent's: by month and definition (its place in `definitions`).
    pub(super) fn swap_in(
        &mut self,
        conn: &mut PgConnection,
        definitions: &[Definition],
    ) -> anyhow::Result<HashMap<(String, usize), String>> {
        #[derive(QueryableByName)]
        struct Month {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            relname: String,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            plain: bool,
        }
        let names: Vec<&str> = self.months.iter().map(|m| m.month.as_str()).collect();
        let found: Vec<Month> = sql_query(
            "SELECT m.name, c.relname::text AS relname,
                    c.reloptions IS NULL AND c.relacl IS NULL AND NOT c.relrowsecurity
                    AND c.reltablespace = p.reltablespace AND c.relowner = u.oid
                    AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid)
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.conislocal)
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgparentid = 0)
                    AND NOT EXISTS (SELECT 1 FROM pg_policy po WHERE po.polrelid = c.oid)
                    AND NOT EXISTS (SELECT 1 FROM pg_statistic_ext x WHERE x.stxrelid = c.oid)
                    AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prrelid = c.oid)
                    AND NOT EXISTS (SELECT 1 FROM pg_description de
                                    WHERE de.classoid = 'pg_class'::regclass AND de.objoid = c.oid)
                    AND NOT EXISTS (SELECT 1 FROM pg_attribute at WHERE at.attrelid = c.oid AND at.attnum > 0
                                      AND at.attstattarget >= 0)
                    -- (a view on it, say: what would keep the month from being dropped)
                    AND NOT EXISTS (SELECT 1 FROM pg_depend dep
                                    WHERE dep.refclassid = 'pg_class'::regclass AND dep.refobjid = c.oid
                                      AND dep.deptype = 'n')
                    AS plain
             FROM unnest($1::text[]) m(name) JOIN pg_class c ON c.oid = m.name::regclass
             JOIN pg_class p ON p.oid = 'tickets'::regclass
             JOIN pg_roles u ON u.rolname = current_user",
        )
        .bind::<Array<Text>, _>(&names)
        .load(conn)?;
        let mut ready = HashMap::new();
        for staged in &self.months {
            let month = found
                .iter()
                .find(|m| m.name == staged.month)
                .with_context(|| format!("the month {} is gone", staged.month))?;
            let (table, qualified) = (&staged.table, &staged.qualified);
            let statements = if month.plain {
                let relname = quote_ident(&month.relname);
                let mut statements = vec![
                    format!("DROP TABLE {}", staged.month),
                    format!("ALTER TABLE {qualified} RENAME TO {relname}"),
                    format!(
                        "ALTER TABLE tickets ATTACH PARTITION {} FOR VALUES FROM ('{}') TO ('{}')",
                        staged.month,
                        staged.from.to_rfc3339(),
                        staged.until.to_rfc3339()
                    ),
                    format!(
                        "ALTER TABLE {} DROP CONSTRAINT {table}_bound, RESET (autovacuum_enabled)",
                        staged.month
                    ),
                ];
                let mut names = std::collections::HashSet::new();
                for (k, d) in definitions.iter().enumerate().filter(|(_, d)| d.table() == "tickets") {
                    let mut name = truncated(format!("{}_{}", month.relname, d.suffix()));
                    // (two long names cut to the same: the second numbered, as PostgreSQL does)
                    if !names.insert(name.clone()) {
                        name = truncated(format!("{}_{}{k}", month.relname, d.suffix()));
                        names.insert(name.clone());
                    }
                    let name = quote_ident(&name);
                    statements.push(format!("ALTER INDEX {}.{table}_{k} RENAME TO {name}", self.schema));
                    ready.insert((staged.month.clone(), k), format!("{}.{name}", self.schema));
                }
                statements
            } else {
                vec![format!(
                    "INSERT INTO {} ({columns}) SELECT {columns} FROM {qualified}",
                    staged.month,
                    columns = self.column_names
                )]
            };
            conn.batch_execute(&statements.join("; "))
                .with_context(|| format!("cannot put the staged rows of {} in place", staged.month))?;
        }
        Ok(ready)
    }
}

/// The columns of tickets as a staged month is made with them.
#[derive(QueryableByName)]
pub(super) struct TicketColumns {
    /// Each column as a partition has it, identity aside (a partition has none), and the CHECK
    /// constraints, which ATTACH PARTITION asks for by name: as `CREATE TABLE` takes them.
    #[diesel(sql_type = Text)]
    definitions: String,
    /// The names, in their order.
    #[diesel(sql_type = Text)]
    names: String,
    /// Whether tickets may have its months staged: not when it has insert triggers (which its
    /// rows must go through) or generated columns.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    stageable: bool,
}

/// Reads [`TicketColumns`] in the load's transaction before it locks tickets (the staging
/// connection would wait for that lock: `pg_get_expr` takes one); None where the months are
/// not to be staged.
pub(super) fn columns_of_tickets(conn: &mut PgConnection) -> anyhow::Result<Option<TicketColumns>> {
    let columns: TicketColumns = sql_query(
        "SELECT string_agg(format('%I %s%s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                        CASE WHEN a.attcollation <> t.typcollation
                             THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END,
                        CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                        CASE WHEN d.adbin IS NOT NULL AND a.attgenerated = ''
                             THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END),
                        ', ' ORDER BY a.attnum)
                    || coalesce((SELECT ', ' || string_agg(format('CONSTRAINT %I %s', k.conname,
                                                                  pg_get_constraintdef(k.oid)), ', ')
                                 FROM pg_constraint k WHERE k.conrelid = 'tickets'::regclass AND k.contype = 'c'), '')
                    AS definitions,
                    string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) AS names,
                    bool_and(a.attgenerated = '')
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                                    WHERE g.tgrelid = 'tickets'::regclass AND NOT g.tgisinternal
                                      AND g.tgtype & 4 <> 0) AS stageable
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = 'tickets'::regclass AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .get_result(conn)
    .context("cannot read the columns of tickets")?;
    Ok(columns.stageable.then_some(columns))
}

/// One staged month's bounds' CHECK, keys and indexes, in one transaction.
fn build_month(
    conn: &mut PgConnection,
    month: &StagedMonth,
    definitions: &[(usize, &Definition)],
) -> anyhow::Result<()> {
    let (table, qualified) = (&month.table, &month.qualified);
    let mut statements = vec![
        "BEGIN".to_owned(),
        "SET LOCAL statement_timeout = 0".to_owned(),
        "SET LOCAL maintenance_work_mem = '256MB'".to_owned(),
        // Two connections build at once: workers of their own would only take turns with them.
        "SET LOCAL max_parallel_maintenance_workers = 0".to_owned(),
        // (created_at, the partition key of tickets)
        format!(
            "ALTER TABLE {qualified} ADD CONSTRAINT {table}_bound CHECK (created_at >= '{}' AND created_at < '{}')",
            month.from.to_rfc3339(),
            month.until.to_rfc3339()
        ),
    ];
    for (k, d) in definitions {
        statements.push(d.on_staged(qualified, &format!("{table}_{k}"))?);
    }
    statements.push("COMMIT".to_owned());
    let result = conn.batch_execute(&statements.join("; "));
    if result.is_err() {
        let _ = conn.batch_execute("ROLLBACK");
    }
    result.with_context(|| format!("cannot build the indexes of the rows of {}", month.month))
}

impl Drop for StagedMonths {
    /// Drops the staged tables that were not put in place: those of a load that failed (a
    /// committed load renamed them). Best effort, bounded: what is left, the next initial load
    /// drops.
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.batch_execute("ROLLBACK");
            return;
        }
        let _ = self.conn.batch_execute("SET lock_timeout = '10s'");
        for staged in &self.months {
            let _ = self
                .conn
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", staged.qualified));
        }
        let _ = self.conn.batch_execute("RESET lock_timeout");
    }
}

/// `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `name` cut to PostgreSQL's 63 bytes, as it would cut it (at a character boundary).
fn truncated(mut name: String) -> String {
    const NAME_BYTES: usize = 63;
    if name.len() > NAME_BYTES {
        let mut end = NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}
