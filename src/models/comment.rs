use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::schema::comments;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = comments, check_for_backend(diesel::pg::Pg))]
pub struct Comment {
    pub id: i64,
    pub external_id: Option<String>,
    pub ticket_id: i64,
    pub author_id: i64,
    pub body: String,
    pub public: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = comments)]
pub struct NewComment {
    pub external_id: Option<String>,
    pub ticket_id: i64,
    pub author_id: i64,
    pub body: String,
    pub public: bool,
    pub created_at: DateTime<Utc>,
}
