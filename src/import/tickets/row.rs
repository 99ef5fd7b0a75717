//! One valid ticket row, normalised, with its text values packed into one buffer.
//!
//! A row used to hold each value in a `String` of its own — nine or more allocations a row,
//! each with the allocator's header and rounding. With a batch parsed ahead, one read ahead and
//! one per writer alive at once, those were a few MiB of an import's peak, and allocating and
//! freeing them a good part of a re-import's client time. Packed, a row is one allocation.

use chrono::{DateTime, Utc};

use crate::models::{TicketChannel, TicketPriority, TicketStatus};

/// Where one value lies in a row's text.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

/// Separates the tags in a row's text: a NUL byte, which never reaches a row (the reader
/// rejects a field holding one, as PostgreSQL's text cannot store it).
const TAG_SEPARATOR: char = '\0';

#[derive(Debug, Clone)]
pub struct TicketRow {
    text: String,
    external_id: Span,
    subject: Span,
    description: Option<Span>,
    requester_email: Span,
    requester_name: Option<Span>,
    assignee_email: Option<Span>,
    organization: Option<Span>,
    /// Sorted, without repeats, joined by `TAG_SEPARATOR`; empty without tags.
    tags: Span,
    pub status: TicketStatus,
    pub priority: TicketPriority,
    pub channel: TicketChannel,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub solved_at: Option<DateTime<Utc>>,
}

/// The values of a row as parsed, borrowed; `TicketRow::new` packs them.
pub struct RowValues<'a> {
    pub external_id: &'a str,
    pub subject: &'a str,
    pub description: Option<&'a str>,
    pub requester_email: &'a str,
    pub requester_name: Option<&'a str>,
    pub assignee_email: Option<&'a str>,
    pub organization: Option<&'a str>,
    /// Sorted, without repeats.
    pub tags: &'a [String],
    pub status: TicketStatus,
    pub priority: TicketPriority,
    pub channel: TicketChannel,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub solved_at: Option<DateTime<Utc>>,
}

impl TicketRow {
    /// Packs `values`; fails only for a row of 4 GiB or more, which no field limit allows.
    pub fn new(values: RowValues<'_>) -> Result<TicketRow, String> {
        let optional = [
            values.description,
            values.requester_name,
            values.assignee_email,
            values.organization,
        ];
        let size = values.external_id.len()
            + values.subject.len()
            + values.requester_email.len()
            + optional.iter().flatten().map(|v| v.len()).sum::<usize>()
            + values.tags.iter().map(String::len).sum::<usize>()
            + values.tags.len().saturating_sub(1);
        if u32::try_from(size).is_err() {
            return Err(format!(
                "the row's values are {size} bytes long, more than an import row can hold"
            ));
        }
        let mut text = String::with_capacity(size);
        let mut push = |value: &str| {
            let start = text.len() as u32;
            text.push_str(value);
            Span {
                start,
                end: text.len() as u32,
            }
        };
        let external_id = push(values.external_id);
        let subject = push(values.subject);
        let description = values.description.map(&mut push);
        let requester_email = push(values.requester_email);
        let requester_name = values.requester_name.map(&mut push);
        let assignee_email = values.assignee_email.map(&mut push);
        let organization = values.organization.map(&mut push);
        let tags_start = text.len() as u32;
        for (i, tag) in values.tags.iter().enumerate() {
            if i > 0 {
                text.push(TAG_SEPARATOR);
            }
            text.push_str(tag);
        }
        let tags = Span {
            start: tags_start,
            end: text.len() as u32,
        };
        Ok(TicketRow {
            text,
            external_id,
            subject,
            description,
            requester_email,
            requester_name,
            assignee_email,
            organization,
            tags,
            status: values.status,
            priority: values.priority,
            channel: values.channel,
            created_at: values.created_at,
            updated_at: values.updated_at,
            solved_at: values.solved_at,
        })
    }

    fn at(&self, span: Span) -> &str {
        &self.text[span.start as usize..span.end as usize]
    }

    pub fn external_id(&self) -> &str {
        self.at(self.external_id)
    }

    pub fn subject(&self) -> &str {
        self.at(self.subject)
    }

    pub fn description(&self) -> Option<&str> {
        self.description.map(|s| self.at(s))
    }

    pub fn requester_email(&self) -> &str {
        self.at(self.requester_email)
    }

    pub fn requester_name(&self) -> Option<&str> {
        self.requester_name.map(|s| self.at(s))
    }

    pub fn assignee_email(&self) -> Option<&str> {
        self.assignee_email.map(|s| self.at(s))
    }

    pub fn organization(&self) -> Option<&str> {
        self.organization.map(|s| self.at(s))
    }

    /// The row's tags, sorted, each once.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        let tags = self.at(self.tags);
        tags.split(TAG_SEPARATOR).filter(move |_| !tags.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tags: &[String], description: Option<&str>) -> TicketRow {
        TicketRow::new(RowValues {
            external_id: "T-1",
            subject: "Printer on fire",
            description,
            requester_email: "ann@example.com",
            requester_name: None,
            assignee_email: Some("bob@example.com"),
            organization: Some(""),
            tags,
            status: TicketStatus::Open,
            priority: TicketPriority::Normal,
            channel: TicketChannel::Other,
            created_at: None,
            updated_at: None,
            solved_at: None,
        })
        .unwrap()
    }

    #[test]
    fn packed_values_read_back_as_given() {
        let tags = vec!["billing".to_string(), "vip".to_string()];
        let r = row(&tags, Some("line one\nline two"));
        assert_eq!(r.external_id(), "T-1");
        assert_eq!(r.subject(), "Printer on fire");
        assert_eq!(r.description(), Some("line one\nline two"));
        assert_eq!(r.requester_email(), "ann@example.com");
        assert_eq!(r.requester_name(), None);
        assert_eq!(r.assignee_email(), Some("bob@example.com"));
        assert_eq!(r.organization(), Some(""));
        assert_eq!(r.tags().collect::<Vec<_>>(), ["billing", "vip"]);
        assert_eq!(r.text.capacity(), r.text.len(), "one allocation of the exact size");
    }

    #[test]
    fn no_tags_and_one_tag() {
        assert_eq!(row(&[], None).tags().count(), 0);
        assert_eq!(row(&["x".to_string()], None).tags().collect::<Vec<_>>(), ["x"]);
    }
}
