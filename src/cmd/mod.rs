//! One module per subcommand: its clap `Args` and a `run` that parses, calls the engines and
//! prints their results. No command uses another command; what two share lives below.

pub mod cleanup;
pub mod completions;
pub mod doctor;
pub mod export;
pub mod fix;
pub mod import;
pub mod migrate;
pub mod ops;
pub mod report;
pub mod restore;
pub mod tickets;
pub mod undo;
