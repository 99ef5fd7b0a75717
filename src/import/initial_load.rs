//! `--initial-load`: the schema work around a load into empty tables — drop the keys and
//! indexes (and the foreign keys pointing at them) so that rows go into bare heaps, reserve
//! id blocks, and rebuild everything once at the end.

use anyhow::Context as _;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{PgConnection, QueryResult, QueryableByName, RunQueryDsl, sql_query};

#[derive(QueryableByName, Clone)]
pub(super) struct Definition {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    definition: String,
    #[diesel(sql_type = Nullable<Text>)]
    kind: Option<String>,
}

/// `--initial-load`: with tickets and ticket_tags empty, lock them and drop every index and
/// key on them — primary keys and the external_id key too, with the foreign keys of other
/// tables that reference them — so that the load writes bare heaps. The keys stay when
/// `keep_keys` (the scan could not track the keys: the load then looks them up and may merge
/// a repeated one). Then truncates the tables, so that the load may `COPY … FREEZE`. Returns the
/// statements that recreate everything.
/// On the partitioned layout ticket_keys is one of the tables, and the definitions of the
/// partitioned indexes (`ON ONLY tickets`) are recreated on the whole table, every partition.
pub(super) fn drop_indexes_and_keys(
    conn: &mut PgConnection,
    keep_keys: bool,
    layout: crate::layout::Layout,
) -> anyhow::Result<Rebuild> {
    #[derive(QueryableByName)]
    struct Empty {
        #[diesel(sql_type = Bool)]
        empty: bool,
    }
    let tables: &[&str] = if layout.keyed() {
        &["tickets", "ticket_tags", "ticket_keys"]
    } else {
        &["tickets", "ticket_tags"]
    };
    let tables_sql = tables
        .iter()
        .map(|t| format!("'{t}'::regclass"))
        .collect::<Vec<_>>()
        .join(", ");
    // Said before anything is locked, with what to do instead of PostgreSQL's "must be owner".
    #[derive(QueryableByName)]
    struct NotOwned {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let not_owned: Vec<NotOwned> = sql_query(format!(
        "SELECT c.oid::regclass::text AS name FROM pg_class c
         WHERE c.oid IN ({tables_sql}) AND NOT pg_has_role(c.relowner, 'USAGE') ORDER BY 1"
    ))
    .load(conn)?;
    if !not_owned.is_empty() {
        let names: Vec<String> = not_owned.into_iter().map(|t| t.name).collect();
        anyhow::bail!(
            "--initial-load drops and rebuilds the indexes, keys and foreign keys of {}, which takes their owner, \
             and this role does not own {}: run it as the owner, or import without --initial-load",
            tables.join(", "),
            names.join(", ")
        );
    }
    crate::db::lock_tables(conn, tables, "ACCESS EXCLUSIVE")
        .context("the initial load needs tickets and ticket_tags to itself")?;
    let empty: Empty =
        sql_query("SELECT NOT EXISTS (SELECT 1 FROM tickets) AND NOT EXISTS (SELECT 1 FROM ticket_tags) AS empty")
            .get_result(conn)?;
    if !empty.empty {
        anyhow::bail!(
            "--initial-load needs empty tickets and ticket_tags tables, and they hold rows; import without --initial-load"
        );
    }
    // Constraints of the tables themselves (conparentid = 0: not a partition's copy of one).
    let definitions: Vec<Definition> = sql_query(format!(
        "SELECT c.conname::text AS name, c.conrelid::regclass::text AS table_name,
                pg_get_constraintdef(c.oid) AS definition, c.contype::text AS kind
         FROM pg_constraint c
         WHERE c.conparentid = 0
           AND ((c.contype = 'f' AND (c.conrelid IN ({tables_sql}) OR c.confrelid IN ({tables_sql})))
                OR (c.contype IN ('p', 'u') AND c.conrelid IN ({tables_sql}) AND NOT $1))
         UNION ALL
         SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid), NULL
         FROM pg_index i
         WHERE i.indrelid IN ({tables_sql})
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
    ))
    .bind::<Bool, _>(keep_keys)
    .load(conn)?;
    // The keys and indexes of partitioned tables are rebuilt month by month (`recreate_by_month`).
    let partitioned: Vec<TableName> = sql_query(format!(
        "SELECT c.oid::regclass::text AS name FROM pg_class c WHERE c.oid IN ({tables_sql}) AND c.relkind = 'p'"
    ))
    .load(conn)?;
    let (by_month, definitions): (Vec<Definition>, Vec<Definition>) = definitions
        .into_iter()
        .partition(|d| d.kind.as_deref() != Some("f") && partitioned.iter().any(|t| t.name == d.table_name));
    if layout.partitioned() {
        // The foreign keys from each month of tag links to its month of tickets, which need
        // the tickets' primary key: back, every month's, after the load.
        drop_month_keys(conn)?;
    }
    // The foreign keys first (among `definitions`): they depend on the keys.
    let mut rebuild = drop_for_rebuild(conn, definitions)?;
    drop_for_rebuild(conn, by_month.clone())?;
    rebuild.by_month = by_month;
    if layout.partitioned() {
        rebuild.foreign_keys.push("SELECT ticketops_month_keys()".into());
    }
    // Empty, and no foreign key points at them any more: COPY FREEZE needs the tables
    // created or truncated in the current transaction.
    sql_query(format!("TRUNCATE {}", tables.join(", ")))
        .execute(conn)
        .context("cannot truncate the empty tickets and ticket_tags for the initial load")?;
    Ok(rebuild)
}

/// Drops the foreign keys of the months of ticket_tags and comments (partitioned layout).
fn drop_month_keys(conn: &mut PgConnection) -> QueryResult<()> {
    #[derive(QueryableByName)]
    struct MonthKey {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Text)]
        name: String,
    }
    let keys: Vec<MonthKey> = sql_query(
        "SELECT c.conrelid::regclass::text AS table_name, quote_ident(c.conname) AS name
         FROM pg_constraint c JOIN pg_inherits i ON i.inhrelid = c.conrelid
         WHERE i.inhparent IN ('ticket_tags'::regclass, 'comments'::regclass) AND c.contype = 'f' AND c.conparentid = 0
           AND c.confrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'tickets'::regclass)",
    )
    .load(conn)?;
    for key in keys {
        sql_query(format!("ALTER TABLE {} DROP CONSTRAINT {}", key.table_name, key.name)).execute(conn)?;
    }
    Ok(())
}

/// Reserves `n` consecutive ids of `table`'s id sequence in one call, for a table this
/// transaction holds against other inserters: whatever inserts takes the table's lock before
/// it calls the sequence, so nobody else draws an id from the block.
pub(super) fn reserve_id_block(
    conn: &mut PgConnection,
    table: &str,
    n: usize,
) -> QueryResult<std::ops::RangeInclusive<i64>> {
    let last: crate::db::Id = sql_query(
        "SELECT setval(s, nextval(s) + $2 - 1) AS id FROM (SELECT pg_get_serial_sequence($1, 'id')::regclass AS s) q",
    )
    .bind::<Text, _>(table)
    .bind::<BigInt, _>(n as i64)
    .get_result(conn)?;
    Ok(last.id - n as i64 + 1..=last.id)
}

/// The statements that recreate what a load dropped.
#[derive(Default)]
pub(super) struct Rebuild {
    /// Keys first (a duplicate fails the load before the long part), then indexes.
    pub keys_and_indexes: Vec<String>,
    /// How many of `keys_and_indexes` are keys.
    pub keys: usize,
    /// The keys and indexes of partitioned tables (as the catalog gives them: `ON ONLY`), after
    /// `keys_and_indexes`: see [`recreate_by_month`].
    pub by_month: Vec<Definition>,
    /// Last: each validation reads the rebuilt keys.
    pub foreign_keys: Vec<String>,
}

#[derive(QueryableByName)]
struct TableName {
    #[diesel(sql_type = Text)]
    name: String,
}

/// Recreates the keys and indexes of partitioned tables that a load dropped, month by month:
/// each on the parent alone (invalid until every partition has its own), then for each
/// partition all of them, each attached to the parent's — valid once the last is. Built index
/// by index over every partition (`CREATE INDEX` on the parent), each index read every month
/// again, the months (11 MiB each at 1M tickets) long gone from shared buffers since the last
/// index; month by month they are read from there: the nine secondary indexes of 1M tickets'
/// 41 months 3.1-3.2 s → 2.9-3.0 s. The partitions' indexes are named by PostgreSQL as the
/// parent's `CREATE INDEX` names them. `ready`: indexes built already (the staged months of
/// tickets), by partition and place in `definitions`, attached instead.
pub(super) fn recreate_by_month(
    conn: &mut PgConnection,
    definitions: &[Definition],
    ready: &std::collections::HashMap<(String, usize), String>,
) -> anyhow::Result<()> {
    for d in definitions {
        recreate_one(conn, &d.on_parent_alone()?)?;
    }
    let mut tables: Vec<&str> = definitions.iter().map(|d| d.table_name.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        let partitions: Vec<TableName> = sql_query(
            "SELECT inhrelid::regclass::text AS name FROM pg_inherits WHERE inhparent = $1::regclass ORDER BY 1",
        )
        .bind::<Text, _>(table)
        .load(conn)?;
        for partition in &partitions {
            // The partition's indexes not attached to one of the parent's: those of its own
            // (made on it alone), and after each statement below the one it made.
            let unattached = |conn: &mut PgConnection| -> QueryResult<Vec<String>> {
                let names: Vec<TableName> = sql_query(
                    "SELECT i.indexrelid::regclass::text AS name FROM pg_index i
                     WHERE i.indrelid = $1::regclass
                       AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)",
                )
                .bind::<Text, _>(&partition.name)
                .load(conn)?;
                Ok(names.into_iter().map(|n| n.name).collect())
            };
            let own = unattached(conn)?;
            for (k, d) in definitions.iter().enumerate().filter(|(_, d)| d.table_name == table) {
                if let Some(built) = ready.get(&(partition.name.clone(), k)) {
                    recreate_one(conn, &format!("ALTER INDEX {} ATTACH PARTITION {built}", d.name))?;
                    continue;
                }
                recreate_one(conn, &d.on_partition(&partition.name)?)?;
                let made = unattached(conn)?
                    .into_iter()
                    .find(|name| !own.contains(name))
                    .with_context(|| format!("cannot find the index just made on {}", partition.name))?;
                recreate_one(conn, &format!("ALTER INDEX {} ATTACH PARTITION {made}", d.name))?;
            }
        }
    }
    Ok(())
}

impl Definition {
    /// The table it belongs to, as the catalog names it.
    pub(super) fn table(&self) -> &str {
        &self.table_name
    }

    /// Its name after the table's (`status_idx` of `tickets_status_idx`), with which a
    /// partition's copy is named after the partition; the whole name when it does not start
    /// with the table's.
    pub(super) fn suffix(&self) -> String {
        let name = match self.name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => self.name.clone(),
        };
        match name.strip_prefix(&format!("{}_", self.table_name)) {
            Some(suffix) if !suffix.is_empty() => suffix.to_owned(),
            _ => name,
        }
    }

    /// The same key or index on a table of its own (a staged month), named `name`.
    pub(super) fn on_staged(&self, table: &str, name: &str) -> anyhow::Result<String> {
        if self.kind.is_some() {
            return Ok(format!("ALTER TABLE {table} ADD CONSTRAINT {name} {}", self.definition));
        }
        let on_table = self.on_partition(table)?;
        let (create, rest) = on_table.split_once(" ON ").expect("on_partition's shape");
        Ok(format!("{create} {name} ON {rest}"))
    }

    /// The key or index on the partitioned table alone.
    fn on_parent_alone(&self) -> anyhow::Result<String> {
        Ok(match self.kind {
            Some(_) => format!(
                "ALTER TABLE ONLY {} ADD CONSTRAINT {} {}",
                self.table_name, self.name, self.definition
            ),
            // `CREATE INDEX name ON ONLY table …` as the catalog gives it.
            None if self.definition.contains(" ON ONLY ") => self.definition.clone(),
            None => anyhow::bail!("not the index of a partitioned table: {}", self.definition),
        })
    }

    /// The same key or index on one partition, unnamed: PostgreSQL names it as it names a
    /// partition's copy of the parent's.
    fn on_partition(&self, partition: &str) -> anyhow::Result<String> {
        if self.kind.is_some() {
            return Ok(format!("ALTER TABLE {partition} ADD {}", self.definition));
        }
        let unexpected = || anyhow::anyhow!("an index definition of unexpected shape: {}", self.definition);
        let (head, rest) = self.definition.split_once(" ON ONLY ").ok_or_else(unexpected)?;
        let (_, method_and_columns) = rest.split_once(" USING ").ok_or_else(unexpected)?;
        let create = if head.starts_with("CREATE UNIQUE INDEX ") {
            "CREATE UNIQUE INDEX"
        } else {
            "CREATE INDEX"
        };
        Ok(format!("{create} ON {partition} USING {method_and_columns}"))
    }
}

/// Drops the constraints and indexes `definitions` describes; returns the statements that
/// recreate them. Dropped the other way round, since the foreign keys depend on the keys.
pub(super) fn drop_for_rebuild(conn: &mut PgConnection, mut definitions: Vec<Definition>) -> QueryResult<Rebuild> {
    let recreate_order = |d: &Definition| match d.kind.as_deref() {
        Some("f") => 2,
        Some(_) => 0,
        None => 1,
    };
    definitions.sort_by_key(|d| std::cmp::Reverse(recreate_order(d)));
    let mut rebuild = Rebuild::default();
    for d in &definitions {
        if d.kind.is_some() {
            sql_query(format!("ALTER TABLE {} DROP CONSTRAINT {}", d.table_name, d.name)).execute(conn)?;
            let statement = format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}",
                d.table_name, d.name, d.definition
            );
            if d.kind.as_deref() == Some("f") {
                rebuild.foreign_keys.push(statement);
            } else {
                rebuild.keys_and_indexes.push(statement);
                rebuild.keys += 1;
            }
        } else {
            sql_query(format!("DROP INDEX {}", d.name)).execute(conn)?;
            rebuild.keys_and_indexes.push(d.definition.clone());
        }
    }
    rebuild.keys_and_indexes.reverse();
    rebuild.foreign_keys.reverse();
    Ok(rebuild)
}

pub(super) fn recreate(conn: &mut PgConnection, statements: &[String]) -> anyhow::Result<()> {
    for statement in statements {
        recreate_one(conn, statement)?;
    }
    Ok(())
}

fn recreate_one(conn: &mut PgConnection, statement: &str) -> anyhow::Result<()> {
    sql_query(statement)
        .execute(conn)
        .with_context(|| format!("cannot recreate after the initial load: {statement}"))?;
    Ok(())
}
