//! Migrations, schema.rs, doctor, exit codes, URL masking, help texts, locks.

use std::collections::BTreeMap;

use clap::CommandFactory;
use ticketops::cli::Cli;

use crate::support::*;

#[test]
fn clap_definition_is_valid() {
    Cli::command().debug_assert();
}

#[test]
fn every_help_renders() {
    let dir = scratch("help");
    let top = ticketops(None, &dir, &["--help"]).run();
    top.expect_code(0);
    assert!(
        top.stdout.contains("Exit codes:") && top.stdout.contains("75"),
        "{}",
        top.explain()
    );
    // Walk the whole command tree, so a new subcommand is covered without editing this test.
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            out.push(p.clone());
            walk(sub, p, out);
        }
    }
    let mut paths = Vec::new();
    walk(&Cli::command(), Vec::new(), &mut paths);
    assert!(paths.len() >= 10, "expected the whole tree, got {paths:?}");
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let run = ticketops(None, &dir, &args).run();
        run.expect_code(0);
        assert!(run.stdout.contains("Usage:"), "{}", run.explain());
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = scratch("usage");
    ticketops(None, &dir, &["no-such-command"]).run().expect_code(2);
    ticketops(None, &dir, &["import", "tickets"]).run().expect_code(2);
    ticketops(None, &dir, &["import", "tickets", "x.csv", "--max-rejects", "lots"])
        .run()
        .expect_code(2);
    // No database configured at all is a usage error with a hint, not a crash.
    ticketops(None, &dir, &["doctor"])
        .run()
        .expect_code(2)
        .stderr_has("DATABASE_URL");
}

#[test]
fn migrations_run_revert_and_run_again() {
    let db = TestDb::empty();
    let dir = scratch("migrations");
    ticketops(Some(&db), &dir, &["migrate", "status"]).run().expect_code(0);
    let pending = ticketops(Some(&db), &dir, &["doctor"]).run();
    pending.expect_code(1).stderr_has("pending");

    ticketops(Some(&db), &dir, &["migrate", "run"]).run().expect_code(0);
    let tables =
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations'";
    assert_eq!(db.scalar(tables), 9);
    let status = ticketops(Some(&db), &dir, &["--json", "migrate", "status"]).run();
    assert!(
        status.expect_code(0).json()["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["applied"] == true)
    );

    ticketops(Some(&db), &dir, &["migrate", "revert", "--all"])
        .run()
        .expect_code(0);
    assert_eq!(db.scalar(tables), 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_type WHERE typname IN ('ticket_status', 'user_role')"),
        0
    );

    ticketops(Some(&db), &dir, &["migrate", "run"]).run().expect_code(0);
    assert_eq!(db.scalar(tables), 9);
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
}

/// Parses `diesel::table!` blocks: table → column → type as written.
fn schema_rs_columns() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = std::fs::read_to_string(project_dir().join("src/schema.rs")).unwrap();
    let mut tables = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_suffix(") {")
            .and_then(|l| l.split_once(" ("))
            .map(|(n, _)| n)
        {
            current = Some(name.to_string());
            tables.insert(name.to_string(), BTreeMap::new());
        } else if line == "}" {
            current = None;
        } else if let (Some(table), Some((col, ty))) = (&current, line.split_once(" -> ")) {
            let col = col.trim_start_matches("#[sql_name = ").to_string();
            tables
                .get_mut(table)
                .unwrap()
                .insert(col, ty.trim_end_matches(',').to_string());
        }
    }
    tables
}

#[test]
fn schema_rs_matches_the_migrated_database() {
    let db = TestDb::new();
    let rows = db.json(
        "SELECT c.table_name::text AS t, c.column_name::text AS c, c.is_nullable = 'YES' AS nullable,
                c.udt_name::text AS udt, c.data_type::text AS dt
         FROM information_schema.columns c
         WHERE c.table_schema = 'public' AND c.table_name <> '__diesel_schema_migrations'
           -- the partitioned layout's own: its partitions, ticket_keys and comment_keys (written
           -- by SQL alone, as on the distributed layout), and the tag links' and comments'
           -- partition key (likewise)
           AND c.table_name NOT IN ('ticket_keys', 'comment_keys')
           AND NOT (c.table_name IN ('ticket_tags', 'comments') AND c.column_name = 'ticket_created_at')
           AND NOT EXISTS (SELECT 1 FROM pg_class r WHERE r.relname = c.table_name AND r.relispartition)",
    );
    let mut database: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for r in rows {
        let udt = r["udt"].as_str().unwrap();
        let base = match udt {
            "int8" => "Int8".to_string(),
            "text" => "Text".into(),
            "varchar" => "Varchar".into(),
            "timestamptz" => "Timestamptz".into(),
            "bool" => "Bool".into(),
            "jsonb" => "Jsonb".into(),
            // Enums: diesel names them in CamelCase.
            other => other.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect(),
        };
        let ty = if r["nullable"] == true {
            format!("Nullable<{base}>")
        } else {
            base
        };
        database
            .entry(r["t"].as_str().unwrap().to_string())
            .or_default()
            .insert(r["c"].as_str().unwrap().to_string(), ty);
    }
    assert_eq!(
        schema_rs_columns(),
        database,
        "src/schema.rs is out of date: run `diesel print-schema`"
    );
}

#[test]
fn doctor_reports_a_healthy_schema() {
    let db = TestDb::new();
    let dir = scratch("doctor");
    let run = ticketops(Some(&db), &dir, &["doctor"]).run();
    run.expect_code(0);
    for table in [
        "tickets",
        "users",
        "organizations",
        "comments",
        "tags",
        "ticket_tags",
        "bulk_operations",
        "audit_log",
    ] {
        assert!(
            run.stdout.contains(table),
            "doctor does not list {table}{}",
            run.explain()
        );
    }
    assert!(
        run.stdout.contains("every foreign key has a supporting index"),
        "{}",
        run.explain()
    );
    assert!(run.stdout.contains("PostgreSQL 1"), "{}", run.explain());

    let json = ticketops(Some(&db), &dir, &["doctor", "--json"]).run();
    let v = json.expect_code(0).json();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["unindexed_foreign_keys"].as_array().unwrap().len(), 0);
    assert_eq!(v["pending_migrations"].as_array().unwrap().len(), 0);

    // And it notices a foreign key without an index.
    db.execute("DROP INDEX tickets_assignee_id_idx");
    let broken = ticketops(Some(&db), &dir, &["doctor"]).run();
    broken.expect_code(1).stderr_has("tickets_assignee_id_fkey");
}

#[test]
fn an_ids_file_that_cannot_serve_is_said_before_connecting() {
    // The server named is unreachable: the file's problem must come first, as a usage error.
    let dir = scratch("ids-file-checked-first");
    let with_ids_file = |command: &[&str], file: &std::path::Path| {
        let mut args = command.to_vec();
        args.extend(["--ids-file", file.to_str().unwrap()]);
        ticketops(None, &dir, &args)
            .env("DATABASE_URL", "postgres://u@127.0.0.1:1/nowhere")
            .run()
    };
    let run = with_ids_file(&["cleanup", "soft-delete"], &dir.join("missing.csv"));
    run.expect_code(2).stderr_has("cannot open the ids file");
    assert!(!run.stderr.contains("cannot connect"), "{}", run.explain());
    let no_id_column = dir.join("emails.csv");
    std::fs::write(&no_id_column, "email\na@example.com\n").unwrap();
    with_ids_file(&["export", "tickets"], &no_id_column)
        .expect_code(2)
        .stderr_has("has no external_id or id column");
    // A readable file gets as far as the connection.
    let listed = dir.join("ids.csv");
    std::fs::write(&listed, "id\n7\n").unwrap();
    with_ids_file(&["export", "tickets"], &listed)
        .expect_code(1)
        .stderr_has("cannot connect");
}

#[test]
fn unreachable_database_is_a_clear_error_with_a_masked_url() {
    let dir = scratch("unreachable");
    let url = "postgres://alice:s3cret-pw@127.0.0.1:1/nowhere";
    let run = ticketops(None, &dir, &["doctor"]).env("DATABASE_URL", url).run();
    run.expect_code(1);
    run.stderr_has("cannot connect to postgres://alice:***@127.0.0.1:1/nowhere");
    run.stderr_has("is the server running?");
    assert!(
        !run.stderr.contains("s3cret-pw") && !run.stdout.contains("s3cret-pw"),
        "{}",
        run.explain()
    );
    assert!(
        run.stderr.lines().count() <= 2,
        "the error should fit on one or two lines{}",
        run.explain()
    );
}

#[test]
fn printed_urls_hide_the_password() {
    let db = TestDb::new();
    let dir = scratch("mask");
    // The local server trusts loopback connections, so any password connects.
    let with_password = db.url.replacen("://ticketops@", "://ticketops:hunter2@", 1);
    assert_ne!(with_password, db.url, "test URL has an unexpected shape: {}", db.url);
    let run = ticketops(None, &dir, &["doctor", "--json"])
        .env("DATABASE_URL", &with_password)
        .run();
    let v = run.expect_code(0).json();
    assert!(
        v["database_url"].as_str().unwrap().contains("ticketops:***@"),
        "{}",
        run.explain()
    );
    assert!(
        !run.stdout.contains("hunter2") && !run.stderr.contains("hunter2"),
        "{}",
        run.explain()
    );
    let help = ticketops(None, &dir, &["--help"])
        .env("DATABASE_URL", &with_password)
        .run();
    assert!(!help.stdout.contains("hunter2"), "{}", help.explain());
}

#[test]
fn dotenv_in_the_working_directory_is_honoured() {
    let db = TestDb::new();
    let dir = scratch("dotenv");
    std::fs::write(dir.join(".env"), format!("DATABASE_URL={}\n", db.url)).unwrap();
    ticketops(None, &dir, &["doctor"]).run().expect_code(0);
}

#[test]
fn advisory_lock_is_exclusive_and_released() {
    let db = TestDb::new();
    let pool = ticketops::db::connect_pool(&db.url, 3, ticketops::db::SchemaCheck::UpToDate).unwrap();
    let first = ticketops::db::AdvisoryLock::try_acquire(&pool, "cleanup").unwrap();
    let second = ticketops::db::AdvisoryLock::try_acquire(&pool, "cleanup");
    let err = second.err().expect("a second holder must be refused");
    assert!(err.downcast_ref::<ticketops::exit::LockHeld>().is_some(), "{err:#}");
    assert_eq!(ticketops::exit::report(&err), 75);
    // Another name is independent.
    let _other = ticketops::db::AdvisoryLock::try_acquire(&pool, "import").unwrap();
    drop(first);
    ticketops::db::AdvisoryLock::try_acquire(&pool, "cleanup").expect("released on drop");
}

#[test]
fn a_second_import_of_the_same_file_exits_75_while_the_first_runs() {
    let db = TestDb::new();
    let dir = scratch("lock75");
    let file = fixture("tickets.csv");
    // Hold the lock the import takes (by file content) from a connection of our own.
    let pool = ticketops::db::connect_pool(&db.url, 2, ticketops::db::SchemaCheck::UpToDate).unwrap();
    let sha = {
        use sha2::Digest;
        let bytes = std::fs::read(&file).unwrap();
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let held = ticketops::db::AdvisoryLock::try_acquire(&pool, &format!("import:{sha}")).unwrap();
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", file.to_str().unwrap(), "--rejects", "r.csv"],
    )
    .run();
    run.expect_code(75).stderr_has("another ticketops run holds the lock");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    drop(held);
    ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", file.to_str().unwrap(), "--rejects", "r.csv"],
    )
    .run()
    .expect_code(3);
}

#[test]
fn broken_pipe_on_stdout_exits_0() {
    let db = TestDb::new();
    let dir = scratch("pipe");
    let data = generate(&dir, "t.csv", &["tickets", "--rows", "3000", "--seed", "5"]);
    import(&db, &dir, "tickets", &data, &[]).0.expect_code(0);
    // `head` closes the pipe after a few bytes; PIPESTATUS tells ticketops' own exit code. The
    // commands that print with `println!` once panicked there, and `--json` lines ended in an
    // error.
    for command in [
        "export tickets",
        "ops list",
        "ops list --json",
        "ops show 1",
        "doctor",
        "tickets list",
        "report summary",
        "--json report agents",
    ] {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "'{BIN}' {command} | head -c 5 >/dev/null; echo ${{PIPESTATUS[0]}}"
            ))
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stdout.trim(),
            "0",
            "{command} into a closed pipe should exit 0; stderr: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("error"),
            "{command}: {stderr}"
        );
    }
}
