use diesel::prelude::*;

use crate::schema::audit_log;

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_log, treat_none_as_default_value = false)]
pub struct NewAuditEntry<'a> {
    pub operation_id: i64,
    pub table_name: &'a str,
    pub row_id: i64,
    pub action: &'a str,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}
