//! The rows ticketops reads and writes through Diesel's typed API, one file per table (most
//! bulk work is set-based SQL and needs no struct), and the PostgreSQL enums.

pub mod audit_log;
pub mod bulk_operation;
pub mod enums;
pub mod ticket;

pub use audit_log::NewAuditEntry;
pub use bulk_operation::{BulkOperation, NewBulkOperation};
pub use enums::{OperationStatus, TicketChannel, TicketPriority, TicketStatus, UserRole};
pub use ticket::Ticket;
