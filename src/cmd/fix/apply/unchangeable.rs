//! The columns of an export that `fix apply` does not change: read from the file, compared
//! with the stored ticket, and a row that edits one is rejected rather than its edit dropped.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use anyhow::Context as _;

use std::collections::HashMap;

use super::{Correction, TicketRef};
use crate::import::Numbered;
use crate::layout::{Layout, probe_tickets};

/// The export's columns that fix apply does not change, as the file has them (`None` when
/// the file lacks the column; for the timestamps, `Some(None)` is a blank cell).
#[derive(Debug, Clone, Default)]
pub(super) struct Unchangeable {
    pub(super) requester_email: Option<String>,
    pub(super) requester_name: Option<String>,
    pub(super) created_at: Option<Option<DateTime<Utc>>>,
    pub(super) solved_at: Option<Option<DateTime<Utc>>>,
}

impl Unchangeable {
    pub(super) fn is_empty(&self) -> bool {
        self.requester_email.is_none()
            && self.requester_name.is_none()
            && self.created_at.is_none()
            && self.solved_at.is_none()
    }

    /// The first column whose value differs from the stored ticket's, with both values.
    pub(super) fn edited(&self, stored: &Stored) -> Option<(&'static str, String, String)> {
        let time = |t: &Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_default()
        };
        if let Some(email) = &self.requester_email
            && !email.eq_ignore_ascii_case(&stored.requester_email)
        {
            return Some(("requester_email", stored.requester_email.clone(), email.clone()));
        }
        let stored_name = stored.requester_name.clone().unwrap_or_default();
        if let Some(name) = &self.requester_name
            && name.trim() != stored_name.trim()
        {
            return Some(("requester_name", stored_name, name.clone()));
        }
        if let Some(created_at) = &self.created_at
            && *created_at != Some(stored.created_at)
        {
            return Some(("created_at", time(&Some(stored.created_at)), time(created_at)));
        }
        // A blank solved_at is never an edit: the status rule sets or clears it.
        if let Some(solved_at @ Some(_)) = &self.solved_at
            && *solved_at != stored.solved_at
        {
            return Some(("solved_at", time(&stored.solved_at), time(solved_at)));
        }
        None
    }
}

/// What a ticket stores in the columns fix apply does not change.
#[derive(QueryableByName)]
pub(super) struct Stored {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
    #[diesel(sql_type = Text)]
    requester_email: String,
    #[diesel(sql_type = Nullable<Text>)]
    requester_name: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    solved_at: Option<DateTime<Utc>>,
}

/// The stored values of the columns fix apply does not change, for the tickets of the rows
/// that have any of them (none when the file lacks those columns).
pub(super) fn stored_unchangeable(
    conn: &mut PgConnection,
    layout: Layout,
    rows: &[Numbered<Correction>],
    tickets: &HashMap<String, TicketRef>,
) -> anyhow::Result<HashMap<i64, Stored>> {
    let wanted: Vec<TicketRef> = rows
        .iter()
        .filter(|r| !r.row.unchangeable.is_empty())
        .filter_map(|r| tickets.get(&r.row.external_id).copied())
        .collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = wanted.iter().map(|t| t.id).collect();
    let created: Option<Vec<DateTime<Utc>>> = wanted.iter().map(|t| t.created_at).collect();
    let stored: Vec<Stored> = match created.filter(|_| layout.partitioned()) {
        // Each ticket in its one partition (see `probe_tickets`).
        Some(created) => sql_query(format!(
            "SELECT t.id, r.email AS requester_email, r.name AS requester_name, t.created_at, t.solved_at
             FROM unnest($1::bigint[], $2::timestamptz[]) k(id, created_at) {}
             JOIN users r ON r.id = t.requester_id",
            probe_tickets("k", "t")
        ))
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Timestamptz>, _>(created)
        .load(conn),
        None => sql_query(
            "SELECT t.id, r.email AS requester_email, r.name AS requester_name, t.created_at, t.solved_at
             FROM tickets t JOIN users r ON r.id = t.requester_id WHERE t.id = ANY($1)",
        )
        .bind::<Array<BigInt>, _>(ids)
        .load(conn),
    }
    .context("cannot read the tickets' stored values")?;
    Ok(stored.into_iter().map(|s| (s.id, s)).collect())
}
