//! Faults and hostile input an ops engineer can hit on a production database: secrets in
//! connection errors, file modes, lost connections, lock waits, huge fields, full disks.

use std::time::{Duration, Instant};

use crate::support::*;

/// Every spelling of the password must be absent from everything the binary prints.
fn assert_no_secret(run: &Run, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "{secret:?} leaked{}",
            run.explain()
        );
    }
}

#[test]
fn connection_errors_never_show_the_password() {
    let dir = scratch("secrets");
    let cases: &[(&str, &[&str])] = &[
        ("postgres://u:s3cr3tPW%zz@127.0.0.1:1/x", &["s3cr3tPW"]),
        ("postgresql://u:s3cr3tPW@[::1:5432/x", &["s3cr3tPW"]),
        ("postgres://u:s3cr3tPW@t3tPW@127.0.0.1:1/x", &["s3cr3tPW", "t3tPW"]),
        ("postgres://u:s3cr%00tPW@127.0.0.1:1/x", &["s3cr", "tPW"]),
        ("postgres://u:s3cr3tPW@127.0.0.1:1/x", &["s3cr3tPW"]),
        ("postgres://127.0.0.1:1/x?password=s3cr3tPW&port=zz", &["s3cr3tPW"]),
        ("host=127.0.0.1 port=zz password=s3cr3tPW", &["s3cr3tPW"]),
        ("host=127.0.0.1 password='s3cr3t PW", &["s3cr3t"]),
    ];
    for (url, secrets) in cases {
        for args in [&["--json", "report", "summary"][..], &["migrate", "run"], &["doctor"]] {
            let run = ticketops(None, &dir, args).env("DATABASE_URL", url).run();
            assert_ne!(run.code, 0, "{}", run.explain());
            assert!(!run.stderr.contains("panicked"), "{}", run.explain());
            assert_no_secret(&run, secrets);
        }
    }
}

#[test]
fn an_empty_user_in_a_keyvalue_string_stays_empty() {
    let db = TestDb::new();
    let dir = scratch("empty-user");
    // The test URL's host and port, as a key/value string ending in `user=`.
    let rows = db.json("SELECT inet_server_port() AS port");
    let port = rows[0]["port"].as_i64().unwrap();
    let url = format!("host=127.0.0.1 port={port} dbname={} user=", db.name);
    let run = ticketops(None, &dir, &["report", "summary"])
        .env("DATABASE_URL", &url)
        .run();
    assert!(
        !run.stderr.contains("application_name"),
        "the empty user swallowed the next parameter{}",
        run.explain()
    );
}

#[test]
fn extreme_dates_ages_and_durations_are_usage_errors_never_panics() {
    let db = TestDb::new();
    let dir = scratch("extremes");
    let when_values = [
        "99999999d",
        "99999999999999999999d",
        "9999999999999w",
        "0d",
        "-1d",
        "10000-01-01",
        "0000-01-01",
        "2024-13-45",
    ];
    let when_flags: &[&[&str]] = &[
        &["cleanup", "soft-delete", "--dry-run", "--updated-before"],
        &["cleanup", "soft-delete", "--dry-run", "--created-before"],
        &["cleanup", "purge", "--dry-run", "--deleted-before"],
        &["cleanup", "purge-users", "--dry-run", "--deleted-before"],
        &["report", "summary", "--created-after"],
        &["report", "summary", "--updated-after"],
        &["restore", "--dry-run", "--created-before"],
    ];
    for flag in when_flags {
        for value in when_values {
            let mut args = flag.to_vec();
            args.push(value);
            let run = ticketops(Some(&db), &dir, &args).run();
            assert!(run.code == 0 || run.code == 2, "{}", run.explain());
            assert!(!run.stderr.contains("panicked"), "{}", run.explain());
        }
    }
    let durations = ["0", "0s", "0.1ms", "30d", "99999999999999999999999h", "1e9s", "-5s"];
    let duration_flags: &[&[&str]] = &[
        &["cleanup", "soft-delete", "--dry-run", "--all", "--lock-timeout"],
        &["cleanup", "soft-delete", "--dry-run", "--all", "--statement-timeout"],
        &["cleanup", "soft-delete", "--dry-run", "--all", "--sleep"],
        &["cleanup", "soft-delete", "--dry-run", "--all", "--max-runtime"],
        &["import", "tickets", "nofile.csv", "--lock-timeout"],
        &["import", "tickets", "nofile.csv", "--statement-timeout"],
    ];
    for flag in duration_flags {
        for value in durations {
            let mut args = flag.to_vec();
            args.push(value);
            let run = ticketops(Some(&db), &dir, &args).run();
            assert!(!run.stderr.contains("panicked"), "{}", run.explain());
            assert_ne!(run.code, 101, "{}", run.explain());
        }
    }
    // A lock timeout of 0 means "wait forever" to PostgreSQL: refused, with the reason.
    let run = ticketops(
        Some(&db),
        &dir,
        &["cleanup", "soft-delete", "--all", "--lock-timeout", "0"],
    )
    .run();
    run.expect_code(2).stderr_has("wait forever");
    let run = ticketops(Some(&db), &dir, &["report", "summary", "--created-after", "99999999d"]).run();
    run.expect_code(2).stderr_has("out of range");
}

#[test]
fn a_map_naming_a_column_the_file_lacks_is_an_error_before_anything_is_written() {
    let db = TestDb::new();
    let dir = scratch("map-typo");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            fixture("tickets.csv").to_str().unwrap(),
            "--map",
            "Nope=subject",
        ],
    )
    .run();
    run.expect_code(2).stderr_has("\"Nope\"");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM bulk_operations"), 0);
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn files_of_customer_data_are_created_for_the_owner_only() {
    let db = TestDb::new();
    let dir = scratch("modes");
    // The default rejects file beside the input, and one named with --rejects.
    let input = dir.join("dump.csv");
    std::fs::copy(fixture("bad/unknown_status.csv"), &input).unwrap();
    let run = ticketops(Some(&db), &dir, &["import", "tickets", input.to_str().unwrap()])
        .shell_prefix("umask 022")
        .run();
    run.expect_code(3);
    assert_eq!(mode_of(&dir.join("dump.rejects.csv")), 0o600);
    let named = dir.join("named-rejects.csv");
    ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            fixture("bad/unknown_status.csv").to_str().unwrap(),
            "--rejects",
            named.to_str().unwrap(),
        ],
    )
    .shell_prefix("umask 000")
    .run()
    .expect_code(3);
    assert_eq!(mode_of(&named), 0o600);

    ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            fixture("tickets.csv").to_str().unwrap(),
            "--rejects",
            "r.csv",
        ],
    )
    .run();
    ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "comments",
            fixture("comments.csv").to_str().unwrap(),
            "--rejects",
            "c.csv",
        ],
    )
    .run();
    let export = dir.join("export.csv");
    ticketops(Some(&db), &dir, &["export", "tickets", "-o", export.to_str().unwrap()])
        .shell_prefix("umask 022")
        .run()
        .expect_code(0);
    assert_eq!(mode_of(&export), 0o600);

    // Archives: a new one is 0600; an existing one the owner made 0640 keeps its mode.
    let archive = dir.join("archive.csv");
    let comments_archive = dir.join("archive-comments.csv");
    std::fs::write(&comments_archive, "").unwrap();
    std::fs::set_permissions(&comments_archive, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    db.execute("UPDATE tickets SET deleted_at = now() - interval '100 days' WHERE status = 'closed'");
    ticketops(
        Some(&db),
        &dir,
        &[
            "cleanup",
            "purge",
            "--deleted-before",
            "90d",
            "--archive",
            archive.to_str().unwrap(),
            "--archive-comments",
            comments_archive.to_str().unwrap(),
        ],
    )
    .shell_prefix("umask 022")
    .run()
    .expect_code(0);
    assert_eq!(mode_of(&archive), 0o600);
    assert_eq!(mode_of(&comments_archive), 0o640);
    assert!(std::fs::metadata(&comments_archive).unwrap().len() > 0);
}

/// Terminates every session ticketops holds on the test database, as a DBA or a failover would.
fn terminate_ticketops_sessions(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'ticketops'",
    )
}

#[test]
fn a_lost_connection_mid_import_is_named_recorded_as_failed_and_resumed() {
    let dir = scratch("lost-import");
    let file = generate(&dir, "big.csv", &["tickets", "--rows", "40000", "--seed", "21"]);
    let db = TestDb::new();
    let path = file.to_str().unwrap();
    let mut child = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", path, "--batch-size", "500"],
    )
    .spawn();
    wait_for_checkpoint(&db, &mut child);
    assert!(terminate_ticketops_sessions(&db) > 0);
    let run = Run::from_output(
        "import tickets (connection lost)".into(),
        child.wait_with_output().unwrap(),
    );
    run.expect_code(1).stderr_has("connection to the database was lost");
    assert!(
        !run.stderr.contains("type oid"),
        "a follow-up error hid the real one{}",
        run.explain()
    );
    let summary = run.json();
    assert_eq!(summary["status"], "failed", "{summary}");
    assert!(summary["error"].as_str().unwrap().contains("lost"), "{summary}");
    let committed = db.scalar("SELECT count(*) FROM tickets");
    assert_eq!(summary["inserted"].as_i64().unwrap(), committed);
    // Recorded on a fresh connection: failed, with the counts of what was committed.
    let op = &db.json("SELECT status::text, counts, message FROM bulk_operations")[0];
    assert_eq!(op["status"], "failed");
    assert_eq!(op["counts"]["inserted"].as_i64().unwrap(), committed);
    assert!(op["message"].as_str().unwrap().contains("lost"));
    let (run, summary) = import(&db, &dir, "tickets", &file, &["--resume", "--batch-size", "500"]);
    run.expect_code(0);
    assert_eq!(summary["inserted"], 40000);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 40000);
}

#[test]
fn a_killed_run_is_marked_abandoned_never_left_running() {
    let dir = scratch("abandoned");
    let file = generate(&dir, "big.csv", &["tickets", "--rows", "40000", "--seed", "22"]);
    let db = TestDb::new();
    let path = file.to_str().unwrap();
    let mut child = ticketops(Some(&db), &dir, &["import", "tickets", path, "--batch-size", "500"]).spawn();
    wait_for_checkpoint(&db, &mut child);
    kill(&child, "-KILL");
    child.wait().unwrap();
    // The server ends the killed client's sessions (and so its locks) as soon as it sees the
    // sockets close; until then the run still counts as alive.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let run = ticketops(Some(&db), &dir, &["--json", "ops", "list"]).run();
        let status = run.expect_code(0).json()["operations"][0]["status"].clone();
        if status != "running" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, "abandoned");
    let (run, summary) = import(&db, &dir, "tickets", &file, &["--resume", "--batch-size", "500"]);
    run.expect_code(0).stderr_has("resuming operation");
    assert_eq!(
        summary["inserted"].as_u64().unwrap() + summary["unchanged"].as_u64().unwrap(),
        40000
    );
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 40000);
    // A live run is not touched: the resumed one finished as succeeded.
    assert_eq!(
        db.strings("SELECT status::text FROM bulk_operations ORDER BY id"),
        vec!["succeeded"]
    );
}

#[test]
fn the_servers_idle_timeouts_end_neither_a_jobs_lock_nor_a_transaction_waiting_for_input() {
    // A DBA may end idle sessions, and idle transactions, after a while; a run's own sessions wait
    // idle by design.
    let (db, dir) = dataset();
    db.execute(&format!(
        "ALTER DATABASE {0} SET idle_session_timeout = '1s';
         ALTER DATABASE {0} SET idle_in_transaction_session_timeout = '1s'",
        db.name
    ));
    // The session holding a job's lock sits idle for the whole run: ended by the server, its
    // lock would let a second cron run start beside the first.
    let pool = ticketops::db::connect_pool(&db.url, 2, ticketops::db::SchemaCheck::UpToDate).unwrap();
    let held = ticketops::db::AdvisoryLock::try_acquire(&pool, "cleanup soft-delete").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let run = ticketops(Some(&db), &dir, &["cleanup", "soft-delete", "--status", "closed"]).run();
    run.expect_code(75).stderr_has("another ticketops run holds the lock");
    drop(held);
    // Batches with pauses between them longer than the timeouts.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--status",
            "closed",
            "--batch-size",
            "1",
            "--sleep",
            "1500ms",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 3, "{}", run.explain());

    // An import in one transaction whose input pauses for longer than the timeouts.
    let part = |from: usize| -> String {
        (from..from + 30)
            .map(|i| format!("P-{i},pause {i},open,p{i}@example.com\n"))
            .collect()
    };
    let before = dir.join("before.csv");
    let after = dir.join("after.csv");
    std::fs::write(
        &before,
        format!("external_id,subject,status,requester_email\n{}", part(0)),
    )
    .unwrap();
    std::fs::write(&after, part(30)).unwrap();
    let fifo = dir.join("paused.fifo");
    let _ = std::fs::remove_file(&fifo);
    let prefix = format!(
        "mkfifo {fifo}; (cat {before}; sleep 2; cat {after}) > {fifo} & exec < {fifo}",
        fifo = fifo.display(),
        before = before.display(),
        after = after.display()
    );
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            "-",
            "--atomic",
            "--batch-size",
            "10",
            "--rejects",
            "paused-rejects.csv",
        ],
    )
    .shell_prefix(&prefix)
    .run();
    assert_eq!(run.expect_code(0).json()["inserted"], 60, "{}", run.explain());
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE external_id LIKE 'P-%'"),
        60
    );
}

#[test]
fn a_database_that_reads_backslashes_in_strings_as_escapes_works_the_same() {
    // standard_conforming_strings = off, as some old databases keep it: the SQL that reads a
    // month's bounds with a regular expression broke every import on the partitioned layout.
    let db = TestDb::new();
    db.execute(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off",
        db.name
    ));
    let dir = scratch("escapes");
    let file = dir.join("dataset.csv");
    std::fs::write(&file, DATASET).unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(0);
    assert_eq!(summary["inserted"], 6, "{}", run.explain());
    let (run, again) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(0);
    assert_eq!(again["unchanged"], 6, "{}", run.explain());
    let archive = dir.join("escapes-archive.csv");
    ticketops(
        Some(&db),
        &dir,
        &retention("2024-01-01", archive.to_str().unwrap(), &["--apply", "--yes"]),
    )
    .run()
    .expect_code(0);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 3);
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
}

#[test]
fn a_lost_connection_mid_cleanup_records_what_was_committed() {
    let dir = scratch("lost-cleanup");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "3000", "--seed", "23"]);
    let db = TestDb::new();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let mut child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--all",
            "--batch-size",
            "20",
            "--sleep",
            "20ms",
        ],
    )
    .spawn();
    wait_for_checkpoint_of(&db, &mut child, "cleanup%");
    assert!(terminate_ticketops_sessions(&db) > 0);
    let run = Run::from_output(
        "cleanup soft-delete (connection lost)".into(),
        child.wait_with_output().unwrap(),
    );
    let summary = run
        .expect_code(1)
        .stderr_has("connection to the database was lost")
        .json();
    assert_eq!(summary["status"], "failed", "{summary}");
    let deleted = db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL");
    assert!(deleted > 0 && deleted < 3000, "{deleted}");
    assert_eq!(summary["soft_deleted"].as_i64().unwrap(), deleted);
    let op = &db.json("SELECT status::text, counts FROM bulk_operations WHERE kind = 'cleanup soft-delete'")[0];
    assert_eq!(op["status"], "failed");
    assert_eq!(op["counts"]["soft_deleted"].as_i64().unwrap(), deleted);
}

#[test]
fn initial_load_gives_up_on_its_table_lock_after_the_lock_timeout_and_names_the_holder() {
    use diesel::connection::SimpleConnection;
    let db = TestDb::new();
    let dir = scratch("initial-lock");
    // The application reads tickets in an open transaction.
    let mut app = db.conn();
    app.batch_execute("SET application_name = 'support-app'; BEGIN; SELECT count(*) FROM tickets")
        .unwrap();
    let app_pid = db.json(
        // Other tests hold locks as 'support-app' too, in their own databases.
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'support-app' AND datname = current_database()",
    )[0]["pid"]
        .as_i64()
        .unwrap();
    let started = Instant::now();
    let file = fixture("tickets.csv");
    let load = std::thread::spawn({
        let url = db.url.clone();
        let dir = dir.clone();
        move || {
            let mut cmd = std::process::Command::new(BIN);
            cmd.args([
                "import",
                "tickets",
                file.to_str().unwrap(),
                "--initial-load",
                "--lock-timeout",
                "1s",
            ])
            .current_dir(&dir)
            .env("DATABASE_URL", url);
            cmd.output().unwrap()
        }
    });
    // While the load waits for its lock, another reader of tickets waits at most that long.
    std::thread::sleep(Duration::from_millis(300));
    let reader_started = Instant::now();
    let mut reader = db.conn();
    reader
        .batch_execute("SET statement_timeout = '10s'; SELECT count(*) FROM tickets")
        .unwrap();
    assert!(
        reader_started.elapsed() < Duration::from_secs(3),
        "a reader queued {:?} behind the load's lock request",
        reader_started.elapsed()
    );
    let run = Run::from_output("import tickets --initial-load".into(), load.join().unwrap());
    run.expect_code(1)
        .stderr_has("cannot lock tickets, ticket_tags")
        .stderr_has(&format!("pid {app_pid} (support-app, idle in transaction"));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    app.batch_execute("ROLLBACK").unwrap();
    // Nothing was changed: the keys and indexes are all there, and a load now works.
    assert!(db.scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'tickets'") > 5);
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &fixture("tickets.csv"),
        &["--initial-load", "--rejects", "r.csv"],
    );
    run.expect_code(3); // the sample dump has deliberately bad rows
    assert_eq!(
        summary["inserted"].as_i64().unwrap(),
        db.scalar("SELECT count(*) FROM tickets")
    );
}

/// Holds a row lock on one ticket, as the application would, until the returned sender is
/// dropped or signalled (or `hold` passes).
fn hold_ticket_lock(db: &TestDb, external_id: &str, hold: Duration) -> std::thread::JoinHandle<()> {
    use diesel::connection::SimpleConnection;
    let mut app = db.conn();
    app.batch_execute(&format!(
        "SET application_name = 'support-app'; {}",
        db.lock_ticket_sql(external_id)
    ))
    .unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        app.batch_execute("COMMIT").unwrap();
    })
}

#[test]
fn an_import_batch_waiting_on_a_held_row_is_retried_with_backoff() {
    let db = TestDb::new();
    let dir = scratch("import-retry");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "300", "--seed", "4"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    db.execute("UPDATE tickets SET subject = 'changed by the app' WHERE external_id = 'T-000005'");
    let holder = hold_ticket_lock(&db, "T-000005", Duration::from_millis(1500));
    let (run, summary) = import(&db, &dir, "tickets", &file, &["--lock-timeout", "200ms", "-v"]);
    run.expect_code(0).stderr_has("retry 1 of 5");
    holder.join().unwrap();
    assert_eq!(summary["updated"], 1);
    assert_eq!(summary["unchanged"], 299);
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'T-000005'"),
        db.strings("SELECT subject FROM tickets WHERE external_id = 'T-000005' AND subject <> 'changed by the app'")
    );
}

/// ticketops tells a lock timeout by its English text (Diesel's errors carry no SQLSTATE). On a
/// server whose messages are translated its sessions ask for untranslated ones, so the batch is
/// still retried; a role that may not choose is warned, until it is granted the setting. Needs
/// the de_DE.UTF-8 locale on the server's machine (scripts/test makes it).
#[test]
fn lock_timeouts_are_retried_on_a_server_whose_messages_are_translated() {
    let db = TestDb::new();
    db.conn_result(&format!("ALTER DATABASE {} SET lc_messages = 'de_DE.UTF-8'", db.name))
        .unwrap_or_else(|e| {
            panic!(
                "{e}: the server's machine needs the de_DE.UTF-8 locale, made before the server started \
                 (scripts/test makes it: localedef -i de_DE -f UTF-8 de_DE.UTF-8)"
            )
        });
    assert!(
        db.conn_result("SELECT 1/0")
            .unwrap_err()
            .contains("Division durch Null"),
        "the database's messages are not translated"
    );
    let dir = scratch("import-retry-translated");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "300", "--seed", "4"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    db.execute("UPDATE tickets SET subject = 'changed by the app' WHERE external_id = 'T-000005'");
    let holder = hold_ticket_lock(&db, "T-000005", Duration::from_millis(1500));
    let (run, summary) = import(&db, &dir, "tickets", &file, &["--lock-timeout", "200ms", "-v"]);
    run.expect_code(0)
        .stderr_has("canceling statement due to lock timeout; retry 1 of 5");
    holder.join().unwrap();
    assert_eq!(summary["updated"], 1);
    assert!(!run.stderr.contains("lc_messages"), "{}", run.explain());

    let (role, url) = db.cleaner_role("translated");
    let doctor = |url: &str| ticketops(None, &dir, &["doctor"]).env("DATABASE_URL", url).run();
    doctor(&url).stderr_has("warning: the server's messages are in \"de_DE.UTF-8\" (lc_messages)");
    db.execute(&format!("GRANT SET ON PARAMETER lc_messages TO {role}"));
    let granted = doctor(&url);
    assert!(!granted.stderr.contains("lc_messages"), "{}", granted.explain());
    // Its batches run (on Citus without `SET LOCAL lc_messages`, which the workers may refuse it).
    let deleted = ticketops(None, &dir, &["--json", "cleanup", "soft-delete", "--status", "closed"])
        .env("DATABASE_URL", &url)
        .run();
    assert!(deleted.expect_code(0).json()["soft_deleted"].as_u64().unwrap() > 0);
    db.execute(&format!(
        "REVOKE SET ON PARAMETER lc_messages FROM {role}; DROP OWNED BY {role}; DROP ROLE {role}"
    ));
}

#[test]
fn an_import_that_cannot_get_its_rows_names_them_and_resumes_from_that_batch() {
    let db = TestDb::new();
    let dir = scratch("import-held");
    let file = generate(
        &dir,
        "t.csv",
        &["tickets", "--rows", "300", "--seed", "4", "--bad-share", "0.05"],
    );
    import(&db, &dir, "tickets", &file, &["--rejects", "first.csv"])
        .0
        .expect_code(3);
    // The last ticket of the file, in its third batch.
    let last = db.strings("SELECT max(external_id) FROM tickets").remove(0);
    db.execute(&format!(
        "UPDATE tickets SET subject = 'changed by the app' WHERE external_id IN ('T-000005', '{last}')"
    ));
    let holder = hold_ticket_lock(&db, &last, Duration::from_secs(8));
    let rejects = dir.join("rejects.csv");
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &[
            "--lock-timeout",
            "200ms",
            "--retries",
            "1",
            "--batch-size",
            "100",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    );
    run.expect_code(1).stderr_has(&last).stderr_has("--resume");
    assert_eq!(summary["status"], "failed");
    // The batches before the held row's stay committed, and so do their rejects; the failed
    // batch's rejects are cut off.
    assert_eq!(summary["updated"], 1, "{summary}");
    let rejected_so_far = summary["rejected"].as_u64().unwrap();
    assert_eq!(read_rejects(&rejects).len() as u64, rejected_so_far);
    holder.join().unwrap();
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &[
            "--resume",
            "--batch-size",
            "100",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    );
    run.expect_code(3);
    assert_eq!(summary["updated"], 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE subject = 'changed by the app'"),
        0
    );
    // Every rejected row once, as in the first import.
    let first = read_rejects(&dir.join("first.csv"));
    assert_eq!(read_rejects(&rejects), first);
}

/// The comments' keys have no index on the comments table of the keyed layouts: the comment
/// another session holds is found by its key and named all the same.
#[test]
fn a_comments_import_that_cannot_get_a_held_comment_names_it() {
    let db = TestDb::new();
    let dir = scratch("comments-held");
    let tickets = generate(&dir, "t.csv", &["tickets", "--rows", "50", "--seed", "4"]);
    import(&db, &dir, "tickets", &tickets, &[]).0.expect_code(0);
    let comments = generate(
        &dir,
        "c.csv",
        &["comments", "--rows", "200", "--tickets", "50", "--seed", "4"],
    );
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    let held = db
        .json("SELECT external_id, ticket_id, id FROM comments ORDER BY external_id DESC LIMIT 1")
        .remove(0);
    let (key, ticket, id) = (
        held["external_id"].as_str().unwrap().to_string(),
        held["ticket_id"].as_i64().unwrap(),
        held["id"].as_i64().unwrap(),
    );
    db.execute(&format!(
        "UPDATE comments SET body = 'changed by the app' WHERE ticket_id = {ticket} AND id = {id}"
    ));
    // By its ticket too: on Citus a one-shard statement, which may lock rows.
    use diesel::connection::SimpleConnection;
    let mut app = db.conn();
    app.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM comments WHERE ticket_id = {ticket} AND id = {id} FOR UPDATE"
    ))
    .unwrap();
    let (run, summary) = import(
        &db,
        &dir,
        "comments",
        &comments,
        &["--lock-timeout", "200ms", "--retries", "0"],
    );
    run.expect_code(1)
        .stderr_has("another session held 1 of the batch's rows past --lock-timeout")
        .stderr_has(&key);
    assert_eq!(summary["status"], "failed", "{summary}");
    app.batch_execute("ROLLBACK").unwrap();
    let (run, summary) = import(&db, &dir, "comments", &comments, &["--resume"]);
    run.expect_code(0);
    assert_eq!(summary["updated"], 1, "{summary}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM comments WHERE body = 'changed by the app'"),
        0
    );
}

/// A shell prefix that lets the binary write files of at most `kib` KiB: past that a write
/// fails as it would on a full disk (EFBIG instead of ENOSPC; the same path in ticketops).
fn disk_full_after(kib: u32) -> String {
    format!("trap '' XFSZ; ulimit -f {}", kib * 2)
}

#[test]
fn a_full_disk_for_the_rejects_rolls_the_batch_back_and_resume_continues_exactly() {
    let dir = scratch("full-rejects");
    let file = generate(
        &dir,
        "t.csv",
        &["tickets", "--rows", "3000", "--seed", "31", "--bad-share", "0.2"],
    );
    let reference = TestDb::new();
    let clean_rejects = dir.join("clean-rejects.csv");
    import(
        &reference,
        &dir,
        "tickets",
        &file,
        &["--rejects", clean_rejects.to_str().unwrap()],
    )
    .0
    .expect_code(3);

    let db = TestDb::new();
    let rejects = dir.join("rejects.csv");
    let args = [
        "--json",
        "import",
        "tickets",
        file.to_str().unwrap(),
        "--batch-size",
        "200",
        "--rejects",
        rejects.to_str().unwrap(),
    ];
    let run = ticketops(Some(&db), &dir, &args)
        .shell_prefix(&disk_full_after(24))
        .run();
    run.expect_code(1).stderr_has("rejects file");
    let summary = run.json();
    assert_eq!(summary["status"], "failed");
    assert!(summary["error"].as_str().unwrap().contains("rejects"), "{summary}");
    // The file is cut back to what the committed batches rejected: whole records only.
    let op = &db.json("SELECT status::text, checkpoint FROM bulk_operations")[0];
    assert_eq!(op["status"], "failed");
    let committed_len = op["checkpoint"]["rejects_bytes"].as_u64().unwrap();
    assert!(committed_len > 0);
    assert_eq!(std::fs::metadata(&rejects).unwrap().len(), committed_len);
    assert_eq!(
        read_rejects(&rejects).len() as u64,
        summary["rejected"].as_u64().unwrap()
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets"),
        summary["inserted"].as_i64().unwrap()
    );

    // Space freed: --resume continues exactly, to the same tables and the same rejects.
    let mut resume = args.to_vec();
    resume.push("--resume");
    let run = ticketops(Some(&db), &dir, &resume).run();
    run.expect_code(3);
    assert_same_rows(&db.ticket_snapshot(), &reference.ticket_snapshot(), "after resume");
    assert_eq!(read_rejects(&rejects), read_rejects(&clean_rejects));
}

#[test]
fn an_export_that_runs_out_of_disk_names_the_file_and_removes_it() {
    let db = TestDb::new();
    let dir = scratch("full-export");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "2000", "--seed", "32"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let out = dir.join("export.csv");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "export", "tickets", "-o", out.to_str().unwrap()],
    )
    .shell_prefix(&disk_full_after(64))
    .run();
    run.expect_code(1)
        .stderr_has(out.to_str().unwrap())
        .stderr_has("removed");
    assert_eq!(run.json()["status"], "failed");
    assert!(!out.exists(), "a partial export was left behind");
}

#[test]
fn a_huge_field_is_rejected_without_being_held_in_memory() {
    use std::io::Write;
    let db = TestDb::new();
    let dir = scratch("huge-field");
    let path = dir.join("huge.csv");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(out, "external_id,subject,description,status,requester_email").unwrap();
        for i in 0..1000 {
            if i == 500 {
                write!(out, "T-BIG,Huge,\"").unwrap();
                let chunk = vec![b'x'; 1 << 20];
                for _ in 0..300 {
                    out.write_all(&chunk).unwrap();
                }
                writeln!(out, "\",open,big@example.com").unwrap();
            }
            writeln!(out, "T-{i:05},Subject {i},Text {i},open,user{}@example.com", i % 50).unwrap();
        }
    }
    let rejects = dir.join("huge.rejects.csv");
    for (pass, expected) in [("import", [1000, 0, 0, 0, 0, 1]), ("re-import", [0, 0, 1000, 0, 0, 1])] {
        let (run, peak_kib) = run_measured(ticketops(
            Some(&db),
            &dir,
            &["--json", "import", "tickets", path.to_str().unwrap()],
        ));
        run.expect_code(3).stderr_has("field too large");
        let summary = run.json();
        assert_accounted(&summary, &run);
        assert_eq!(outcome(&summary), expected, "{pass}: {summary}");
        assert!(peak_kib <= 128 * 1024, "{pass}: peak RSS {} MiB", peak_kib / 1024);
    }
    // The rejects file holds the record cut at the limit, and says so.
    let rejected = read_rejects(&rejects);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, "T-BIG");
    assert_eq!(rejected[0].1, 502);
    assert!(
        rejected[0].2.contains("314572800 bytes") && rejected[0].2.contains("cut"),
        "{:?}",
        rejected[0]
    );
    let size = std::fs::metadata(&rejects).unwrap().len();
    assert!(size > 16 << 20 && size < 17 << 20, "{size}");
    // A smaller limit is a flag away.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            path.to_str().unwrap(),
            "--max-field-size",
            "4KiB",
            "--rejects",
            "small.csv",
        ],
    )
    .run();
    assert_eq!(run.expect_code(3).json()["rejected"], 1);
    assert!(std::fs::metadata(dir.join("small.csv")).unwrap().len() < 16 << 10);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_input_that_ends_mid_record_warns_from_a_file_and_rejects_from_a_pipe() {
    let db = TestDb::new();
    let dir = scratch("truncated");
    let complete = "external_id,subject,status,requester_email,solved_at\n\
                    T-1,One,solved,a@example.com,2024-05-01 10:00:00\n\
                    T-2,Two,solved,b@example.com,2024-05-02 10:00:00\n";
    let cut = format!("{complete}T-3,Three,solved,c@example.com,2024-05-0");
    let path = dir.join("cut.csv");
    std::fs::write(&path, &cut).unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &path, &[]);
    run.stderr_has("does not end with a line end");
    let warnings = summary["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w.as_str().unwrap().contains("line 4")),
        "{summary}"
    );
    // From a pipe, the same bytes: the cut record is rejected as truncated.
    let db = TestDb::new();
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", "-", "--rejects", "pipe.csv"],
    )
    .stdin(cut.into_bytes())
    .run();
    run.expect_code(3).stderr_has("truncated record");
    let summary = run.json();
    assert_eq!(outcome(&summary), [2, 0, 0, 0, 0, 1]);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'T-3'"), 0);
    // A complete stream is taken whole, its last record too.
    let db = TestDb::new();
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", "-", "--rejects", "pipe2.csv"],
    )
    .stdin(complete.as_bytes().to_vec())
    .run();
    assert_eq!(outcome(&run.expect_code(0).json()), [2, 0, 0, 0, 0, 0]);
}

#[test]
fn the_wrong_encoding_is_refused_or_hinted_not_silently_garbled() {
    let db = TestDb::new();
    let dir = scratch("encodings");
    let utf8 = dir.join("utf8.csv");
    std::fs::write(
        &utf8,
        "external_id,subject,status,requester_email\nT-1,Café crème,open,a@example.com\n",
    )
    .unwrap();
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", utf8.to_str().unwrap(), "--encoding", "latin1"],
    )
    .run();
    run.expect_code(2).stderr_has("looks like UTF-8");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    // From a pipe nothing can be refused up front: the summary warns.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            "-",
            "--encoding",
            "latin1",
            "--rejects",
            "r.csv",
        ],
    )
    .stdin(std::fs::read(&utf8).unwrap())
    .run();
    let summary = run.json();
    assert!(
        summary["warnings"][0].as_str().unwrap().contains("looks like UTF-8"),
        "{summary}"
    );
    // A Latin-1 file read as UTF-8: the hint is in the summary, not only in the rejects file.
    let latin1 = dir.join("latin1.csv");
    let mut bytes = b"external_id,subject,status,requester_email\nT-2,Caf".to_vec();
    bytes.extend_from_slice(b"\xe9,open,b@example.com\n");
    std::fs::write(&latin1, bytes).unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &latin1, &[]);
    run.expect_code(3).stderr_has("try --encoding windows-1252");
    assert!(
        summary["warnings"].to_string().contains("try --encoding windows-1252"),
        "{summary}"
    );
    // A Windows program's "ANSI" export: typographic quotes, dashes and the euro sign are at
    // 0x80-0x9F, where Latin-1 has control characters.
    let windows = dir.join("windows-1252.csv");
    let mut bytes = b"external_id,subject,status,requester_email\nT-3,\x93Quoted\x94 \x96 costs \x80".to_vec();
    bytes.extend_from_slice(b"5 \x85 M\xfcller\x92s,open,c@example.com\n");
    std::fs::write(&windows, bytes).unwrap();
    let (run, _) = import(&db, &dir, "tickets", &windows, &["--encoding", "windows-1252"]);
    run.expect_code(0);
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'T-3'"),
        vec!["\u{201c}Quoted\u{201d} \u{2013} costs \u{20ac}5 \u{2026} M\u{fc}ller\u{2019}s"]
    );
}

#[test]
fn control_characters_from_the_input_never_reach_the_terminal_raw() {
    let db = TestDb::new();
    let dir = scratch("controls");
    let path = dir.join("evil.csv");
    std::fs::write(
        &path,
        b"external_id,subject,status,requester_email,\x1b[31mred\x1b]0;title\x07\n\
          T-1,One,open,a@example.com,x\n",
    )
    .unwrap();
    let run = ticketops(Some(&db), &dir, &["import", "tickets", path.to_str().unwrap()]).run();
    run.expect_code(0).stderr_has("ignoring unknown column");
    assert!(
        !run.stderr.contains('\x1b') && !run.stderr.contains('\x07'),
        "{:?}",
        run.stderr
    );
    // A binary file as input: the error quotes its "header", escaped.
    let binary = dir.join("binary.csv");
    std::fs::write(
        &binary,
        b"\x7fELF\x02\x01\x01\x00\x1b[2J\x00\x00,\x03\x00>\x00\n\x00\x1b[H",
    )
    .unwrap();
    let run = ticketops(Some(&db), &dir, &["import", "tickets", binary.to_str().unwrap()]).run();
    assert_ne!(run.code, 0);
    assert!(
        !run.stderr.bytes().any(|b| b < 0x20 && b != b'\n'),
        "raw control bytes on stderr: {:?}",
        run.stderr
    );
}

#[test]
fn every_command_checks_the_migrations_first_and_says_what_to_run() {
    let dir = scratch("pending");
    let tickets = fixture("tickets.csv");
    let commands: &[&[&str]] = &[
        &["import", "tickets", tickets.to_str().unwrap(), "--rejects", "r.csv"],
        &["cleanup", "soft-delete", "--all"],
        &["cleanup", "purge", "--deleted-before", "90d"],
        &["fix", "set", "--all", "priority=high", "--apply", "--yes"],
        &["report", "summary"],
        &["export", "tickets"],
        &["ops", "list"],
        &["undo", "1"],
        &["restore", "--operation", "1"],
    ];
    // A database that was never migrated: nothing is created in it, not even bookkeeping.
    let empty = TestDb::empty();
    for args in commands {
        let run = ticketops(Some(&empty), &dir, args).run();
        run.expect_code(1).stderr_has("run 'ticketops migrate run'");
    }
    assert_eq!(
        empty.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        0
    );
    // A database one migration behind this binary.
    let db = TestDb::new();
    ticketops(Some(&db), &dir, &["migrate", "revert"]).run().expect_code(0);
    let before = db.scalar("SELECT count(*) FROM bulk_operations");
    for args in commands {
        let run = ticketops(Some(&db), &dir, args).run();
        run.expect_code(1)
            .stderr_has("missing 1 migration")
            .stderr_has("run 'ticketops migrate run'");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM bulk_operations"), before);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    // doctor reports it rather than refusing to look.
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("pending");
}

#[test]
fn an_export_the_server_ends_midway_is_an_error_not_a_short_file() {
    // Diesel does not read the status that ends a COPY: a statement timeout in the middle of
    // the data used to look like its end (exit 0, a file cut short).
    let db = TestDb::new();
    let dir = scratch("export-cut");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "40000", "--seed", "5"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let run = ticketops(Some(&db), &dir, &["export", "tickets", "-o", "cut.csv"])
        .env("PGOPTIONS", "-c statement_timeout=50")
        .run();
    run.expect_code(1);
    assert!(
        run.stderr.contains("stopped before the end of the data") || run.stderr.contains("statement timeout"),
        "{}",
        run.explain()
    );
    assert!(!dir.join("cut.csv").exists(), "the partial file is removed");
    // To stdout too: an error, whatever was written before it.
    ticketops(Some(&db), &dir, &["export", "tickets"])
        .env("PGOPTIONS", "-c statement_timeout=50")
        .run()
        .expect_code(1);
}

/// `ops show --changes --json` of an operation that changed a great many rows streams its
/// JSON a page at a time: its memory does not grow with the operation.
#[test]
fn ops_show_changes_of_a_large_operation_streams_its_json() {
    let (db, dir) = dataset();
    let op = db.scalar("SELECT max(operation_id) FROM audit_log");
    // 240 batches of 250 inserted ids each (as an import records them): 60,000 changed rows,
    // ids past the stored tickets (shown as `id N`).
    db.execute(&format!(
        "INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
         SELECT {op}, 'tickets', 1000000 + g, 'insert_ids', NULL,
                jsonb_build_object('ids', jsonb_build_array(jsonb_build_array(1000000 + g * 250, 1000000 + g * 250 + 249)))
         FROM generate_series(0, 239) g"
    ));
    let (base, base_kib) = run_measured(ticketops(Some(&db), &dir, &["--json", "ops", "show", &op.to_string()]));
    base.expect_code(0);
    let (run, peak_kib) = run_measured(ticketops(
        Some(&db),
        &dir,
        &["--json", "ops", "show", &op.to_string(), "--changes"],
    ));
    let shown = run.expect_code(0).json();
    let changes = shown["changes"].as_array().unwrap();
    assert_eq!(shown["operation_id"], op);
    assert_eq!(
        changes.len(),
        6 + 60_000,
        "the dataset's six tickets and the planted ids"
    );
    assert_eq!(changes[6]["key"], "id 1000000");
    assert_eq!(changes[6]["field"], "(inserted)");
    // Held whole, the 60,000 values took ~40 MiB more than the summary; a page of them, a few.
    assert!(
        peak_kib < base_kib + 12 * 1024,
        "peak RSS {} MiB against {} MiB for the operation's summary",
        peak_kib / 1024,
        base_kib / 1024
    );
}

#[test]
fn an_initial_loads_rebuilds_are_not_cut_by_the_statement_timeout_of_its_batches() {
    // An index whose build takes longer than --statement-timeout (its expression sleeps 20 ms a
    // row), as the largest tables' builds do: the load's batches are bound by the timeout, its
    // rebuilds at the end are not.
    let db = TestDb::new();
    let dir = scratch("rebuild-timeout");
    db.execute(
        "CREATE FUNCTION slow_id(bigint) RETURNS bigint LANGUAGE sql IMMUTABLE
             AS 'SELECT $1 + 0 * length(pg_sleep(0.02)::text)'",
    );
    db.execute("CREATE INDEX tickets_slow_idx ON tickets (slow_id(id))");
    let file = generate(&dir, "rebuild.csv", &["tickets", "--rows", "60", "--seed", "41"]);
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &["--initial-load", "--statement-timeout", "500ms"],
    );
    run.expect_code(0);
    assert_eq!(summary["inserted"], 60, "{}", run.explain());
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_indexes WHERE indexdef LIKE '%slow_id(id)%'"),
        1 + if partitioned() {
            db.scalar("SELECT count(*) FROM pg_partition_tree('tickets') WHERE isleaf")
        } else {
            0
        },
        "the slow index is back"
    );
}
