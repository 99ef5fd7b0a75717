//! `--initial-load`: the schema work around a load into empty tables — drop the keys and
//! indexes (and the foreign keys pointing at them) so that rows go into bare heaps, reserve
//! id blocks, and rebuild everything once at the end.

use anyhow::Context as _;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{PgConnection, QueryResult, QueryableByName, RunQueryDsl, sql_query};

#[derive(QueryableByName)]
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
    let mut definitions: Vec<Definition> = sql_query(format!(
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
    for d in &mut definitions {
        // A partitioned index reads `CREATE INDEX … ON ONLY public.tickets …`: recreated so,
        // it would be an invalid index on the parent alone.
        d.definition = d.definition.replacen(" ON ONLY ", " ON ", 1);
    }
    if layout.partitioned() {
        // The foreign keys from each month of tag links to its month of tickets, which need
        // the tickets' primary key: back, every month's, after the load.
        drop_month_keys(conn)?;
    }
    let mut rebuild = drop_for_rebuild(conn, definitions)?;
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
    /// Last: each validation reads the rebuilt keys.
    pub foreign_keys: Vec<String>,
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
        sql_query(statement)
            .execute(conn)
            .with_context(|| format!("cannot recreate after the initial load: {statement}"))?;
    }
    Ok(())
}
