use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::UserRole;
use crate::schema::users;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: Option<String>,
    pub role: UserRole,
    pub organization_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser<'a> {
    /// Always lower-case (the table checks it).
    pub email: &'a str,
    pub name: Option<&'a str>,
    pub role: UserRole,
    pub organization_id: Option<i64>,
}
