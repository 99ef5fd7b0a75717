//! `ticketops completions SHELL` and `ticketops man`: shell completion scripts and manual pages,
//! generated from the command line's own definition so that they never drift from it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::context::Context;
use crate::exit;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ticketops completions bash > /etc/bash_completion.d/ticketops
  ticketops completions zsh > \"${fpath[1]}/_ticketops\"
  ticketops completions fish > ~/.config/fish/completions/ticketops.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  ticketops man | man -l -
  ticketops man --out /usr/local/share/man/man1   # ticketops.1 and one page per subcommand")]
pub struct ManArgs {
    /// Write ticketops.1 and a page for every subcommand (ticketops-import.1, …) into this
    /// directory instead of printing the main page on stdout
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Prints the completion script for `args.shell`, built from `command`.
pub fn completions(_ctx: &Context, args: CompletionsArgs, mut command: clap::Command) -> anyhow::Result<i32> {
    // Into memory first: the generator panics on a write error (`| head` closing the pipe).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "ticketops", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script).context("cannot write to stdout")?;
    out.flush().context("cannot write to stdout")?;
    Ok(exit::SUCCESS)
}

/// Prints the main manual page, or writes every page into a directory.
pub fn man(ctx: &Context, args: ManArgs, command: clap::Command) -> anyhow::Result<i32> {
    match args.out {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .context("cannot write to stdout")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
            ctx.info(format!("manual pages written to {}", dir.display()));
        }
    }
    Ok(exit::SUCCESS)
}
