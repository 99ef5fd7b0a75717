//! Rust enums for the PostgreSQL enum types, with their text labels.

use std::io::Write;

use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};

use crate::schema::sql_types;

/// Declares a Rust enum mapped to a PostgreSQL enum type, with `as_str`/`from_label`.
macro_rules! pg_enum {
    ($(#[$meta:meta])* $name:ident, $sql:ty, { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, AsExpression, FromSqlRow)]
        #[diesel(sql_type = $sql)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label PostgreSQL stores.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }

            /// The enum for an exact PostgreSQL label.
            pub fn from_label(label: &str) -> Option<Self> {
                match label { $($label => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql<$sql, Pg> for $name {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                out.write_all(self.as_str().as_bytes())?;
                Ok(IsNull::No)
            }
        }

        impl FromSql<$sql, Pg> for $name {
            fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
                let label = std::str::from_utf8(bytes.as_bytes())?;
                $name::from_label(label)
                    .ok_or_else(|| format!("unknown {} label {label:?}", stringify!($name)).into())
            }
        }
    };
}

pg_enum!(
    /// `user_role`
    UserRole, sql_types::UserRole, {
    Customer => "customer",
    Agent => "agent",
    Admin => "admin",
});

pg_enum!(
    /// `ticket_status`
    TicketStatus, sql_types::TicketStatus, {
    New => "new",
    Open => "open",
    Pending => "pending",
    OnHold => "on_hold",
    Solved => "solved",
    Closed => "closed",
});

pg_enum!(
    /// `ticket_priority`
    TicketPriority, sql_types::TicketPriority, {
    Low => "low",
    Normal => "normal",
    High => "high",
    Urgent => "urgent",
});

pg_enum!(
    /// `ticket_channel`
    TicketChannel, sql_types::TicketChannel, {
    Email => "email",
    Web => "web",
    Chat => "chat",
    Phone => "phone",
    Social => "social",
    Api => "api",
    Other => "other",
});

pg_enum!(
    /// `operation_status`
    OperationStatus, sql_types::OperationStatus, {
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Interrupted => "interrupted",
    RolledBack => "rolled_back",
    Abandoned => "abandoned",
});
