use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::OperationStatus;
use crate::schema::bulk_operations;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = bulk_operations, check_for_backend(diesel::pg::Pg))]
pub struct BulkOperation {
    pub id: i64,
    pub kind: String,
    pub args: serde_json::Value,
    pub operator: String,
    pub source_file: Option<String>,
    pub source_sha256: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: OperationStatus,
    pub counts: serde_json::Value,
    pub checkpoint: Option<serde_json::Value>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = bulk_operations)]
pub struct NewBulkOperation<'a> {
    pub kind: &'a str,
    pub args: serde_json::Value,
    pub operator: &'a str,
    pub source_file: Option<&'a str>,
    pub source_sha256: Option<&'a str>,
}
