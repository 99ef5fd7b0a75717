//! `fix apply FILE.csv`: a spreadsheet of corrections keyed by external_id.

use crate::cli::Context;

pub const HELP: &str = "";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The corrections file
    pub file: std::path::PathBuf,
}

pub fn run(_ctx: &Context, _args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
