//! `ticketops doctor`: is the database reachable, migrated and healthy?

use anyhow::Context as _;
use diesel::sql_types::{BigInt, Double, Text};
use diesel::{QueryableByName, RunQueryDsl, sql_query};
use serde_json::json;

use crate::context::Context;
use crate::db;
use crate::exit;
use crate::layout::{Layout, PartitionHealth};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Shows the layout; on the partitioned one, the monthly partitions (how far ahead, rows in the\ndefault partition) and when pg_partman's maintenance last ran at the earliest (each run makes the\nmonths up to premake after its own). Also counts the tickets of this month and the last\nwithout their row in ticket_keys (written by something that does not write keys). Exits 1 when the\ndatabase is unreachable, migrations are pending, a foreign key lacks an index, the months ahead end\nwithin a month, the maintenance has not run for a whole month, rows sit in the default partition,\nrecent tickets lack their keys, pg_partman has a retention of its own for tickets (it would drop\nmonths without their keys, comments and tag links), or the months are so many that a statement over\nall of them takes more than half the server's lock table (max_locks_per_transaction)."
)]
pub struct Args {}

#[derive(QueryableByName)]
struct TableStats {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Double)]
    estimated_rows: f64,
    #[diesel(sql_type = BigInt)]
    total_bytes: i64,
    #[diesel(sql_type = BigInt)]
    dead_tuples: i64,
}

#[derive(QueryableByName)]
struct UnindexedForeignKey {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    constraint_name: String,
    #[diesel(sql_type = Text)]
    definition: String,
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

/// Foreign keys whose columns are not the leading columns of some index (nor hold all the
/// columns of a unique one, which finds the row by itself): every delete or key update on the
/// referenced table would scan the referencing one. A partition's copy of a partitioned
/// table's key is the partitioned table's.
const UNINDEXED_FOREIGN_KEYS_SQL: &str = "
SELECT c.conrelid::regclass::text AS table_name, c.conname::text AS constraint_name,
       pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c
WHERE c.contype = 'f'
  AND c.conparentid = 0
  AND c.connamespace = 'public'::regnamespace
  AND NOT EXISTS (
      SELECT 1 FROM pg_index i
      WHERE i.indrelid = c.conrelid
        AND (((string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)] @> c.conkey
              AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)] <@ c.conkey)
             OR (i.indisunique AND string_to_array(i.indkey::text, ' ')::int2[] <@ c.conkey)))
ORDER BY 1, 2";

/// One line per table; a partitioned table sums its partitions.
const TABLE_STATS_SQL: &str = "
SELECT t.relname::text AS table_name,
       sum(CASE WHEN c.reltuples < 0 THEN coalesce(s.n_live_tup, 0) ELSE c.reltuples END)::float8 AS estimated_rows,
       sum(pg_total_relation_size(c.oid))::bigint AS total_bytes,
       sum(coalesce(s.n_dead_tup, 0))::bigint AS dead_tuples
FROM pg_class t
CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(t.oid) WHERE isleaf AND t.relkind = 'p'
                    UNION ALL SELECT t.oid WHERE t.relkind = 'r') p
JOIN pg_class c ON c.oid = p.relid
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE t.relnamespace = 'public'::regnamespace AND t.relkind IN ('r', 'p') AND NOT t.relispartition
  AND t.relname <> '__diesel_schema_migrations'
GROUP BY t.relname
ORDER BY t.relname";

pub fn run(ctx: &Context, _args: Args) -> anyhow::Result<i32> {
    let url = ctx.database_url()?;
    let masked = db::mask_url(url);
    let pool = ctx.pool_any_schema(2)?;
    let mut conn = db::get(&pool)?;

    let version: Version = sql_query("SELECT current_setting('server_version') AS version")
        .get_result(&mut conn)
        .context("cannot read the server version")?;
    let migrations = db::migration_status(&mut conn)?;
    let pending: Vec<&str> = migrations
        .iter()
        .filter(|(_, applied)| !applied)
        .map(|(v, _)| v.as_str())
        .collect();
    let tables: Vec<TableStats> = sql_query(TABLE_STATS_SQL)
        .load(&mut conn)
        .context("cannot read table statistics")?;
    let unindexed: Vec<UnindexedForeignKey> = sql_query(UNINDEXED_FOREIGN_KEYS_SQL)
        .load(&mut conn)
        .context("cannot list foreign keys")?;
    let pool_state = pool.state();
    // Unknown while the layout's migration is pending.
    let layout = if pending.is_empty() {
        Layout::of(&mut conn).ok()
    } else {
        None
    };
    let partitions = match layout {
        Some(Layout::Partitioned) => Some(PartitionHealth::read(&mut conn)?),
        _ => None,
    };
    let cluster = match layout {
        Some(Layout::Distributed) => Some(crate::layout::cluster::ClusterHealth::read(&mut conn)?),
        _ => None,
    };

    let mut problems = Vec::new();
    if !pending.is_empty() {
        problems.push(format!(
            "{} migration(s) pending ({}): run `ticketops migrate run`",
            pending.len(),
            pending.join(", ")
        ));
    }
    if let Some(p) = &partitions {
        problems.extend(p.problems());
    }
    if let Some(c) = &cluster {
        problems.extend(c.problems());
    }
    for fk in &unindexed {
        problems.push(format!(
            "foreign key {} on {} has no supporting index: {}",
            fk.constraint_name, fk.table_name, fk.definition
        ));
    }

    if ctx.global.json {
        let tables_json: Vec<_> = tables
            .iter()
            .map(|t| {
                json!({
                    "table": t.table_name,
                    "estimated_rows": t.estimated_rows as i64,
                    "total_bytes": t.total_bytes,
                    "dead_tuples": t.dead_tuples,
                })
            })
            .collect();
        ctx.print_json(&json!({
            "database_url": masked,
            "server_version": version.version,
            "layout": layout,
            "partitions": partitions,
            "cluster": cluster,
            "pending_migrations": pending,
            "tables": tables_json,
            "unindexed_foreign_keys": unindexed.iter().map(|f| &f.constraint_name).collect::<Vec<_>>(),
            "pool": { "max_size": pool.max_size(), "connections": pool_state.connections,
                      "idle": pool_state.idle_connections,
                      "connection_timeout_ms": db::CONNECTION_TIMEOUT.as_millis() as u64 },
            "healthy": problems.is_empty(),
            "problems": problems,
        }))?;
    } else {
        crate::outln!("database       {masked}");
        crate::outln!("server         PostgreSQL {}", version.version);
        crate::outln!(
            "migrations     {} applied, {} pending",
            migrations.len() - pending.len(),
            pending.len()
        );
        if let Some(layout) = layout {
            crate::outln!("layout         {}", layout.as_str());
        }
        if let Some(p) = &partitions {
            let day = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            crate::outln!(
                "partitions     {} monthly, {} to {}, {} row(s) in tickets_default",
                p.partitions,
                day(p.first_from),
                day(p.last_until),
                p.default_rows
            );
            let ran = match p.maintenance_ran_since {
                Some(since) => format!("so its maintenance last ran in {} or later", since.format("%Y-%m")),
                None => "when its maintenance last ran cannot be told".into(),
            };
            crate::outln!(
                "maintenance    pg_partman premake {}: months made ahead to {}, {ran}",
                p.premake.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                day(p.ahead_until),
            );
            crate::outln!(
                "keys           {} ticket(s) created since {} without their row in ticket_keys",
                p.recent_without_key,
                day(Some(p.recent_since))
            );
            crate::outln!(
                "locks          ~{} for a statement over every month, of ~{} in the server's lock table",
                p.statement_locks(),
                p.lock_table
            );
            crate::outln!(
                "statistics     {} month(s) with rows not analyzed yet{}",
                p.months_without_statistics,
                match (p.months_without_statistics, p.autovacuum_analyzes_months) {
                    (0, _) => "",
                    (_, true) => " (autovacuum analyzes them, within a minute of a load)",
                    (_, false) => " (autovacuum will not: run ANALYZE tickets, ticket_tags)",
                }
            );
        }
        if let Some(c) = &cluster {
            for n in &c.nodes {
                crate::outln!(
                    "node           {}:{} {}{}, {} shard placement(s)",
                    n.name,
                    n.port,
                    n.role,
                    if n.active { "" } else { " (inactive)" },
                    n.shards
                );
            }
            for t in &c.tables {
                let by = t
                    .distribution_column
                    .as_deref()
                    .map(|c| format!(" by {c}, {} shards", t.shards))
                    .unwrap_or_default();
                let differs = if t.kind == t.expected {
                    String::new()
                } else {
                    format!(" (the layout has it {})", t.expected)
                };
                crate::outln!("table kind     {:<17} {}{by}{differs}", t.table, t.kind);
            }
        }
        crate::outln!(
            "pool           max {} connections, {} open, checkout timeout {} s, checked on checkout",
            pool.max_size(),
            pool_state.connections,
            db::CONNECTION_TIMEOUT.as_secs()
        );
        crate::outln!();
        crate::outln!(
            "{:<20} {:>12} {:>12} {:>12}",
            "table",
            "est. rows",
            "size",
            "dead tuples"
        );
        for t in &tables {
            crate::outln!(
                "{:<20} {:>12} {:>12} {:>12}",
                t.table_name,
                t.estimated_rows as i64,
                human_bytes(t.total_bytes),
                t.dead_tuples
            );
        }
        crate::outln!();
        if unindexed.is_empty() {
            crate::outln!("foreign keys   every foreign key has a supporting index");
        }
        if problems.is_empty() {
            crate::outln!("status         healthy");
        } else {
            for p in &problems {
                crate::outln!("problem        {p}");
            }
        }
    }
    if problems.is_empty() {
        Ok(exit::SUCCESS)
    } else {
        eprintln!("error: {}", problems.join("; "));
        Ok(exit::FAILURE)
    }
}

fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
