//! What `doctor` shows of a Citus cluster on the distributed layout: the nodes with their
//! shard counts, and each of ticketops' tables with its kind next to the kind the layout
//! gives it.

use diesel::sql_types::{BigInt, Integer, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

/// The kind each table has on the distributed layout (src/layout/distributed.sql).
const DESIGN: &[(&str, &str)] = &[
    ("tickets", "distributed"),
    ("ticket_tags", "distributed"),
    ("comments", "distributed"),
    ("audit_log", "distributed"),
    ("ticket_keys", "distributed"),
    ("comment_keys", "distributed"),
    ("users", "reference"),
    ("organizations", "reference"),
    ("tags", "reference"),
    ("bulk_operations", "reference"),
    ("ticketops_layout", "reference"),
];

#[derive(Debug, QueryableByName, serde::Serialize)]
pub struct Node {
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Integer)]
    pub port: i32,
    /// `coordinator` or `worker`.
    #[diesel(sql_type = Text)]
    pub role: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub active: bool,
    #[diesel(sql_type = BigInt)]
    pub shards: i64,
}

#[derive(Debug, QueryableByName, serde::Serialize)]
pub struct Table {
    #[diesel(sql_type = Text)]
    pub table: String,
    /// `distributed`, `reference` or `local`.
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub distribution_column: Option<String>,
    #[diesel(sql_type = BigInt)]
    pub shards: i64,
    #[diesel(sql_type = Text)]
    pub expected: String,
}

#[derive(Debug, serde::Serialize)]
pub struct ClusterHealth {
    pub nodes: Vec<Node>,
    pub tables: Vec<Table>,
}

impl ClusterHealth {
    pub fn read(conn: &mut PgConnection) -> anyhow::Result<ClusterHealth> {
        let nodes: Vec<Node> = sql_query(
            "SELECT n.nodename AS name, n.nodeport AS port,
                    CASE WHEN n.groupid = 0 THEN 'coordinator' ELSE 'worker' END AS role,
                    n.isactive AS active,
                    (SELECT count(*) FROM pg_dist_placement p WHERE p.groupid = n.groupid) AS shards
             FROM pg_dist_node n WHERE n.noderole = 'primary' ORDER BY n.groupid",
        )
        .load(conn)?;
        let names: Vec<&str> = DESIGN.iter().map(|(t, _)| *t).collect();
        let kinds: Vec<&str> = DESIGN.iter().map(|(_, k)| *k).collect();
        let tables: Vec<Table> = sql_query(
            "SELECT d.name AS table,
                    coalesce(CASE WHEN c.citus_table_type = 'distributed' THEN 'distributed'
                                  WHEN c.citus_table_type = 'reference' THEN 'reference' END, 'local') AS kind,
                    nullif(c.distribution_column, '<none>') AS distribution_column,
                    coalesce(c.shard_count, 0)::bigint AS shards,
                    d.expected
             FROM unnest($1::text[], $2::text[]) AS d(name, expected)
             LEFT JOIN citus_tables c ON c.table_name = to_regclass(d.name)",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(&names)
        .bind::<diesel::sql_types::Array<Text>, _>(&kinds)
        .load(conn)?;
        Ok(ClusterHealth { nodes, tables })
    }

    /// What differs from the design: a table of another kind, no active worker.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .tables
            .iter()
            .filter(|t| t.kind != t.expected)
            .map(|t| {
                format!(
                    "table {} is {} on the cluster, the distributed layout has it {}",
                    t.table, t.kind, t.expected
                )
            })
            .collect();
        if !self.nodes.iter().any(|n| n.role == "worker" && n.active) {
            problems.push("no active worker is registered on the coordinator".into());
        }
        problems
    }
}
