//! `ticketops export tickets|users|comments`.
#[derive(Debug, clap::Args)]
pub struct Args {}
pub fn run(_ctx: &crate::cli::Context, _args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
