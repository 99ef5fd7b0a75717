//! One file per table: a read struct (`Queryable`, `Selectable`) and a `NewX` insertable.

pub mod audit_log;
pub mod bulk_operation;
pub mod comment;
pub mod enums;
pub mod organization;
pub mod tag;
pub mod ticket;
pub mod ticket_tag;
pub mod user;

pub use audit_log::{AuditEntry, NewAuditEntry};
pub use bulk_operation::{BulkOperation, NewBulkOperation};
pub use comment::{Comment, NewComment};
pub use enums::{OperationStatus, TicketChannel, TicketPriority, TicketStatus, UserRole};
pub use organization::{NewOrganization, Organization};
pub use tag::{NewTag, Tag};
pub use ticket::{NewTicket, Ticket};
pub use ticket_tag::TicketTag;
pub use user::{NewUser, User};
