use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::{TicketChannel, TicketPriority, TicketStatus};
use crate::schema::tickets;

#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = tickets, check_for_backend(diesel::pg::Pg))]
pub struct Ticket {
    pub id: i64,
    pub external_id: String,
    pub subject: String,
    pub description: Option<String>,
    pub status: TicketStatus,
    pub priority: TicketPriority,
    pub channel: TicketChannel,
    pub requester_id: i64,
    pub assignee_id: Option<i64>,
    pub organization_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub solved_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub last_operation_id: Option<i64>,
}
