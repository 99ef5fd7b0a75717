use diesel::prelude::*;

use crate::schema::ticket_tags;

/// A link between a ticket and a tag; read and insertable alike (it has no other columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ticket_tags, check_for_backend(diesel::pg::Pg), treat_none_as_default_value = false)]
pub struct TicketTag {
    pub ticket_id: i64,
    pub tag_id: i64,
}
