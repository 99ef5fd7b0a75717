//! Exit codes (documented in `--help` and the README) and how errors become them.

use std::io;

pub const SUCCESS: i32 = 0;
pub const FAILURE: i32 = 1;
pub const USAGE: i32 = 2;
/// The command finished but some input rows were rejected.
pub const REJECTED_ROWS: i32 = 3;
/// Another run holds the job's lock (EX_TEMPFAIL: cron can simply try again later).
pub const LOCKED: i32 = 75;
pub const INTERRUPTED_SIGINT: i32 = 130;
pub const INTERRUPTED_SIGTERM: i32 = 143;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    failure (the message says what and why)
  2    usage error
  3    finished, but some input rows were rejected (see the rejects file)
  75   another run holds this job's lock; nothing was done
  130  interrupted by SIGINT (Ctrl-C) after finishing the current batch
  143  interrupted by SIGTERM after finishing the current batch";

/// A mistake in how the command was called, found after argument parsing (exit 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

/// Another run holds the advisory lock of this job (exit 75).
#[derive(Debug)]
pub struct LockHeld(pub String);

impl std::fmt::Display for LockHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "another ticketops run holds the lock '{}'; nothing was done", self.0)
    }
}
impl std::error::Error for LockHeld {}

/// Prints an error with its whole cause chain on one line and returns the exit code for it.
pub fn report(err: &anyhow::Error) -> i32 {
    let code = code_of(err);
    if code != SUCCESS {
        // Messages quote input (headers, values, server text): never raw control bytes. libpq
        // continues its own messages on further lines ("…unexpectedly\n\tThis probably means…\n"):
        // those go on the one line as words, not as escapes.
        let text = error_text(err);
        let text = text.trim_end().replace("\n\t", " ");
        eprintln!("error: {}", crate::output::escape_controls(&text));
    }
    code
}

/// An error as one line of text for the person running the command (`{err:#}`, the whole chain),
/// with the server's HINT where it gave one: Diesel's message leaves it out, and it is often the
/// remedy ("out of shared memory" — "You might need to increase max_locks_per_transaction.").
/// And with the grant a missing privilege of ticketops' own making needs.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = format!("{err:#}");
    // Imports stage their rows, and exports and retention their selections, in temporary
    // tables: a database hardened with REVOKE TEMPORARY … FROM PUBLIC refuses them.
    if text.contains("permission denied to create temporary tables") {
        text.push_str(
            " — ticketops keeps a run's working rows in temporary tables: the database's owner can \
             GRANT TEMPORARY ON DATABASE to this role",
        );
    }
    let hint = err
        .chain()
        .find_map(|cause| match cause.downcast_ref::<diesel::result::Error>() {
            Some(diesel::result::Error::DatabaseError(_, info)) => info.hint().map(str::to_owned),
            _ => None,
        });
    match hint {
        Some(hint) if !text.contains(&hint) => format!("{text} (HINT: {hint})"),
        _ => text,
    }
}

/// The exit code for an error.
pub fn code_of(err: &anyhow::Error) -> i32 {
    // `ticketops export | head` closes our stdout early; that is the reader's choice, not a
    // failure, so it exits 0 quietly (as ripgrep and xsv do).
    let broken_pipe = err.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().map(io::Error::kind).or_else(|| {
            cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
        }) == Some(io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return SUCCESS;
    }
    if err.downcast_ref::<UsageError>().is_some() {
        USAGE
    } else if err.downcast_ref::<LockHeld>().is_some() {
        LOCKED
    } else {
        FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server error as libpq reports it to Diesel.
    struct ServerError {
        message: &'static str,
        hint: Option<&'static str>,
    }

    impl diesel::result::DatabaseErrorInformation for ServerError {
        fn message(&self) -> &str {
            self.message
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            self.hint
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn failed(message: &'static str, hint: Option<&'static str>) -> anyhow::Error {
        let err = diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(ServerError { message, hint }),
        );
        anyhow::Error::from(err).context("cannot recreate after the initial load: CREATE INDEX …")
    }

    #[test]
    fn an_error_text_carries_the_servers_hint_once() {
        let hint = Some("You might need to increase max_locks_per_transaction.");
        assert_eq!(
            error_text(&failed("out of shared memory", hint)),
            "cannot recreate after the initial load: CREATE INDEX …: out of shared memory \
             (HINT: You might need to increase max_locks_per_transaction.)"
        );
        assert_eq!(
            error_text(&failed("out of shared memory", None)),
            "cannot recreate after the initial load: CREATE INDEX …: out of shared memory"
        );
        let already = "out of shared memory; HINT: You might need to increase max_locks_per_transaction.";
        assert!(!error_text(&failed(already, hint)).contains("(HINT"));
        let denied = error_text(&failed(
            "permission denied to create temporary tables in database \"support\"",
            None,
        ));
        assert!(denied.ends_with("GRANT TEMPORARY ON DATABASE to this role"), "{denied}");
    }
}
