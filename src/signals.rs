//! SIGINT/SIGTERM handling: a signal sets a flag, and long-running commands check it between
//! batches so that a batch is always either committed or rolled back, never cut in half.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::exit;

#[derive(Clone)]
pub struct StopFlags {
    sigint: Arc<AtomicBool>,
    sigterm: Arc<AtomicBool>,
}

impl StopFlags {
    /// Installs the handlers. A second Ctrl-C while stopping kills the process at once, as
    /// users expect when a stop takes too long.
    pub fn install() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let flags = StopFlags {
            sigint: Arc::new(AtomicBool::new(false)),
            sigterm: Arc::new(AtomicBool::new(false)),
        };
        flag::register_conditional_shutdown(SIGINT, exit::INTERRUPTED_SIGINT, flags.sigint.clone())?;
        flag::register(SIGINT, flags.sigint.clone())?;
        flag::register(SIGTERM, flags.sigterm.clone())?;
        Ok(flags)
    }

    /// Flags that never fire, for library callers and tests.
    pub fn none() -> Self {
        StopFlags {
            sigint: Arc::new(AtomicBool::new(false)),
            sigterm: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The exit code to stop with, if a stop was requested.
    pub fn requested(&self) -> Option<i32> {
        if self.sigterm.load(Ordering::Relaxed) {
            Some(exit::INTERRUPTED_SIGTERM)
        } else if self.sigint.load(Ordering::Relaxed) {
            Some(exit::INTERRUPTED_SIGINT)
        } else {
            None
        }
    }

    /// Pauses for `pause` (`--sleep` between batches; zero: not at all), ending early when a
    /// stop is requested: a cron job's long pause does not hold up its SIGTERM.
    pub fn sleep(&self, pause: std::time::Duration) {
        let until = std::time::Instant::now() + pause;
        while self.requested().is_none() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
        }
    }

    pub fn signal_name(code: i32) -> &'static str {
        if code == exit::INTERRUPTED_SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        }
    }
}
