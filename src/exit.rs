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
        let text = format!("{err:#}");
        let text = text.trim_end().replace("\n\t", " ");
        eprintln!("error: {}", crate::output::escape_controls(&text));
    }
    code
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
