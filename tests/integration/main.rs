//! Integration tests against a real PostgreSQL (started by scripts/test). One test binary,
//! one database per test, the real `ticketops` binary for everything a user would run.

mod cleanup;
mod distributed;
mod everyday;
mod export;
mod fingerprint;
mod fix;
mod foundation;
mod hardening;
mod import;
mod jobs;
mod layers;
mod layouts;
mod partitioned;
mod report;
mod restore;
mod support;
mod undo;
