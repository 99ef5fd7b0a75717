//! Progress bars on stderr (indicatif) and small formatting helpers.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress bars go (`--progress`): nowhere, to stderr when it is a terminal, or to
/// stderr whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    Hidden,
    Terminal,
    Always,
}

impl Draw {
    fn target(self) -> ProgressDrawTarget {
        match self {
            Draw::Hidden => ProgressDrawTarget::hidden(),
            Draw::Terminal => ProgressDrawTarget::stderr(),
            // indicatif's stderr target draws nothing when stderr is not a terminal.
            Draw::Always => ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 10),
        }
    }
}

/// A bar over `total` bytes, or a spinner when the size is unknown (stdin). Hidden when
/// `draw` says so, so callers never need to branch on it.
pub fn byte_progress(draw: Draw, total: Option<u64>) -> ProgressBar {
    if draw == Draw::Hidden {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => {
            let bar = ProgressBar::with_draw_target(Some(total), draw.target());
            bar.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {msg} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        }
        None => {
            let bar = ProgressBar::with_draw_target(None, draw.target());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>10} {bytes} {msg}").expect("valid template"),
            );
            bar
        }
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// How a long job shows it is alive: on a terminal (`--progress`) a bar with rows done of the
/// total, rate and ETA when the total is known, else a spinner with rows and rate; with `-v`
/// a line per batch for logs.
#[derive(Debug, Clone)]
pub struct Watch {
    pub verbose: bool,
    pub progress: ProgressBar,
    /// The rows the job is expected to do, when known (counted first where that is cheap).
    pub total: Option<u64>,
    shown: bool,
}

impl Watch {
    /// A spinner labelled `what`, drawn as `draw` says.
    pub fn new(draw: Draw, verbose: bool, what: &str) -> Watch {
        let progress = if draw != Draw::Hidden {
            let bar = ProgressBar::with_draw_target(None, draw.target());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix}: {human_pos} rows {msg} ({elapsed})")
                    .expect("valid template"),
            );
            bar.set_prefix(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Watch {
            verbose,
            shown: draw != Draw::Hidden,
            progress,
            total: None,
        }
    }

    /// Whether anyone sees the progress (a bar, or `-v` lines): counting a total first is
    /// only worth its cost then.
    pub fn is_seen(&self) -> bool {
        self.shown || self.verbose
    }

    /// The rows the job will do: the spinner becomes a bar with done/total and an ETA.
    pub fn with_total(mut self, total: Option<u64>) -> Watch {
        if let Some(total) = total {
            self.total = Some(total);
            self.progress.set_length(total);
            self.progress.set_style(
                ProgressStyle::with_template(
                    "{prefix}: [{bar:30}] {human_pos}/{human_len} rows {msg} ({elapsed}, ETA {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        self
    }

    /// Counts `rows` more done, and shows the rate since `started`.
    pub fn advance(&self, rows: u64, total: u64, started: std::time::Instant) {
        self.progress.inc(rows);
        self.progress
            .set_message(format!("at {:.0} rows/s", rate(total, started.elapsed())));
    }

    /// A `-v` line: RFC 3339 time first, and never through the middle of the spinner.
    pub fn line(&self, message: impl std::fmt::Display) {
        if self.verbose {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            self.progress.suspend(|| eprintln!("{now} {message}"));
        }
    }
}

/// A writer that moves a byte progress bar by what goes through it.
pub struct ProgressWriter<W> {
    pub inner: W,
    pub progress: ProgressBar,
}

impl<W: std::io::Write> std::io::Write for ProgressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Rows per second, guarded against a zero duration.
pub fn rate(rows: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { rows as f64 / secs } else { rows as f64 }
}

/// One value in a [`Table`]: numbers are right-aligned, text left-aligned.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    /// A measure shown with `decimals` places; `None` prints as an empty cell.
    Float(Option<f64>, usize),
}

impl Cell {
    pub fn text(value: impl Into<String>) -> Self {
        Cell::Text(value.into())
    }

    fn render(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(n) => n.to_string(),
            Cell::Float(Some(x), decimals) => format!("{x:.decimals$}"),
            Cell::Float(None, _) => String::new(),
        }
    }

    fn is_number(&self) -> bool {
        !matches!(self, Cell::Text(_))
    }
}

/// Rows under named columns, printed as an aligned text table or as CSV.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    /// Rows that sum the others: shown under the table, left out of CSV, where a script or a
    /// spreadsheet would count them as data.
    pub totals: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = S>) -> Self {
        Table {
            columns: columns.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            totals: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// A row that sums the others (see `totals`).
    pub fn push_total(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.totals.push(row);
    }

    /// Columns padded to their widest value, two spaces apart, numbers right-aligned.
    pub fn write_aligned(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let rendered: Vec<Vec<String>> = self
            .rows
            .iter()
            .chain(&self.totals)
            .map(|r| r.iter().map(Cell::render).collect())
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|c| {
                rendered
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.columns[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|c| self.rows.iter().chain(&self.totals).any(|r| r[c].is_number()))
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    if numeric[c] {
                        format!("{v:>w$}", w = widths[c])
                    } else {
                        format!("{v:<w$}", w = widths[c])
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(out, "{}", line(&self.columns))?;
        for row in &rendered {
            writeln!(out, "{}", line(row))?;
        }
        Ok(())
    }

    /// RFC 4180 CSV with a header row; the data rows only, no totals.
    pub fn write_csv(&self, out: impl std::io::Write) -> anyhow::Result<()> {
        let mut writer = csv::Writer::from_writer(out);
        writer.write_record(&self.columns)?;
        for row in &self.rows {
            writer.write_record(row.iter().map(Cell::render))?;
        }
        writer.flush()?;
        Ok(())
    }
}

/// A one-line chart of `values` with block characters, scaled so that `max` is a full block.
pub fn sparkline(values: &[i64], max: i64) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    values
        .iter()
        .map(|&v| {
            if v <= 0 || max <= 0 {
                ' '
            } else {
                // Any non-zero value shows at least the lowest block.
                let level = ((v as f64 / max as f64) * 8.0).ceil() as usize;
                BLOCKS[level.clamp(1, 8) - 1]
            }
        })
        .collect()
}

/// Where an engine's notes go while it works (a resume, a warning about the input, `-v`
/// timings): stderr, unless quiet. Summaries are not notes: engines return those.
#[derive(Debug, Clone, Copy, Default)]
pub struct Log {
    pub quiet: bool,
    pub verbose: bool,
}

impl Log {
    pub fn info(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// Only with `-v`.
    pub fn detail(&self, message: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("{message}");
        }
    }
}

/// Text from outside (a header, a value, a server message) as it may be printed: control
/// characters (NUL, ESC, …) escaped like `\u{1b}`, so that a binary file given as input can
/// never drive the terminal. Newlines and tabs are escaped too: one message stays one line.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Creates (or truncates) a file for customer data: a new file is made readable by its owner
/// only (0600), whatever the umask, since it holds names, e-mails and ticket bodies. An
/// existing file keeps the mode its owner gave it.
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    open_private(path, false)
}

/// Opens a file for customer data to append to, made as [`create_private`] makes one.
pub fn append_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    open_private(path, true)
}

fn open_private(path: &std::path::Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).append(append).truncate(!append);
    match options.clone().create_new(true).mode(0o600).open(path) {
        Ok(file) => {
            // The umask may have taken bits away from 0600 (never added): set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(file)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => options.open(path),
        Err(err) => Err(err),
    }
}

/// `println!` for the commands' output: a reader that closed the pipe early (`ticketops ops
/// list | head`) is not an error — the rest of the output is dropped and the command goes on
/// to finish its work and its exit code (`println!` panicked there). Any other failure to write
/// is reported on stderr.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::stdout_line(format_args!($($arg)*))
    };
}

/// What [`outln!`] does: one line to stdout.
pub fn stdout_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(err) = out.write_fmt(line).and_then(|()| out.write_all(b"\n"))
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("warning: cannot write to stdout: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_table() {
        let mut t = Table::new(["name", "count"]);
        t.push(vec![Cell::text("open"), Cell::Int(12)]);
        t.push(vec![Cell::text("on_hold"), Cell::Int(3)]);
        let mut out = Vec::new();
        t.write_aligned(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "name     count\nopen        12\non_hold      3\n"
        );
    }

    #[test]
    fn sparkline_scales_to_max() {
        assert_eq!(sparkline(&[0, 1, 4, 8], 8), " ▁▄█");
    }
}
