//! `cleanup`, `restore` and `ops` against a real database: filters, batching, locks,
//! signals, archive, restore.

use std::time::{Duration, Instant};

use crate::support::*;

/// The external ids a soft-delete with these filters would touch (from its dry run).
fn selected(db: &TestDb, dir: &std::path::Path, filters: &[&str]) -> Vec<String> {
    let mut args = vec!["--json", "cleanup", "soft-delete", "--dry-run"];
    args.extend_from_slice(filters);
    let run = ticketops(Some(db), dir, &args).run();
    let v = run.expect_code(0).json();
    let mut ids: Vec<String> = v["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["external_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        v["would_affect"].as_u64().unwrap() as usize,
        ids.len(),
        "{}",
        run.explain()
    );
    ids.sort();
    ids
}

#[test]
fn each_filter_selects_exactly_the_right_rows() {
    let (db, dir) = dataset();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--status", "closed"], &["C-1", "C-2", "C-6"]),
        (&["--status", "closed,solved"], &["C-1", "C-2", "C-4", "C-6"]),
        (
            &["--status", "closed", "--status", "pending"],
            &["C-1", "C-2", "C-5", "C-6"],
        ),
        (&["--priority", "high,urgent"], &["C-2", "C-4"]),
        (&["--channel", "email"], &["C-1", "C-5"]),
        (&["--assignee", "agent@corp.com"], &["C-1", "C-3", "C-6"]),
        (&["--assignee", "AGENT@corp.com"], &["C-1", "C-3", "C-6"]),
        (&["--assignee", "none"], &["C-2", "C-5"]),
        (&["--requester", "bob@example.com"], &["C-2", "C-5"]),
        (&["--organization", "Acme"], &["C-1", "C-4", "C-6"]),
        (&["--tag", "vip"], &["C-1", "C-3"]),
        (&["--tag", "VIP"], &["C-1", "C-3"]),
        // C-3 was created at 00:30 in UTC+1, i.e. 23:30 UTC the day before.
        (
            &["--created-before", "2024-03-01"],
            &["C-1", "C-2", "C-3", "C-4", "C-6"],
        ),
        (
            &["--created-before", "2024-03-01T00:00:00+01:00"],
            &["C-1", "C-2", "C-6"],
        ),
        (&["--created-after", "2024-03-01"], &["C-5"]),
        (&["--updated-before", "2023-06-02"], &["C-1", "C-6"]),
        (&["--updated-after", "2024-06-01"], &["C-4", "C-5"]),
        (
            &["--updated-after", "36500d"],
            &["C-1", "C-2", "C-3", "C-4", "C-5", "C-6"],
        ),
        (&["--updated-before", "36500d"], &[]),
        (&["--status", "closed", "--organization", "Acme"], &["C-1", "C-6"]),
    ];
    for (filters, expected) in cases {
        assert_eq!(selected(&db, &dir, filters), set(expected), "filters {filters:?}");
    }
    // --ids-file, by external_id or by id.
    let by_external = dir.join("ext.csv");
    std::fs::write(&by_external, "external_id\nC-2\nC-5\nC-404\n").unwrap();
    assert_eq!(
        selected(&db, &dir, &["--ids-file", by_external.to_str().unwrap()]),
        set(&["C-2", "C-5"])
    );
    // The value that matches nothing is named on stderr.
    let dry_run_of = |ids_file: &std::path::Path| {
        let args = [
            "cleanup",
            "soft-delete",
            "--dry-run",
            "--ids-file",
            ids_file.to_str().unwrap(),
        ];
        ticketops(Some(&db), &dir, &args).run()
    };
    dry_run_of(&by_external)
        .expect_code(0)
        .stderr_has("1 of the 3 values in the ids file match no ticket: C-404");
    let id_of_c4 = db.scalar("SELECT id FROM tickets WHERE external_id = 'C-4'");
    let by_id = dir.join("ids.csv");
    std::fs::write(&by_id, format!("id,note\n{id_of_c4},x\n")).unwrap();
    assert_eq!(
        selected(&db, &dir, &["--ids-file", by_id.to_str().unwrap()]),
        set(&["C-4"])
    );
    let run = dry_run_of(&by_id);
    assert!(
        !run.expect_code(0).stderr.contains("match no ticket"),
        "{}",
        run.explain()
    );
    // Both columns: a row names its ticket by external_id, or by id where that is blank (such
    // rows were once skipped without a word); an unknown id is named as one.
    let mixed = dir.join("mixed.csv");
    std::fs::write(&mixed, format!("id,external_id\n,C-2\n{id_of_c4},\n999999,\n")).unwrap();
    assert_eq!(
        selected(&db, &dir, &["--ids-file", mixed.to_str().unwrap()]),
        set(&["C-2", "C-4"])
    );
    dry_run_of(&mixed)
        .expect_code(0)
        .stderr_has("1 of the 3 values in the ids file match no ticket: id 999999");
    // An id that is not a number is named by record, line and column, as a usage error.
    let bad_id = dir.join("bad-id.csv");
    std::fs::write(&bad_id, format!("id,note\n{id_of_c4},\"two\nlines\"\nC-2,x\n")).unwrap();
    dry_run_of(&bad_id)
        .expect_code(2)
        .stderr_has("bad-id.csv record 2 (line 4), column id: \"C-2\" is not a number");
    // A file longer than one lookup (10,000 values), unsorted, with a value twice: the
    // warning counts the values read and names the first unknown ones in sorted order.
    let long = dir.join("long.csv");
    let mut text = String::from("external_id\nC-5\n");
    for n in (0..12_000).rev() {
        text.push_str(&format!("Z-{n:05}\n"));
    }
    text.push_str("C-5\n");
    std::fs::write(&long, text).unwrap();
    assert_eq!(
        selected(&db, &dir, &["--ids-file", long.to_str().unwrap()]),
        set(&["C-5"])
    );
    dry_run_of(&long).expect_code(0).stderr_has(
        "12000 of the 12002 values in the ids file match no ticket: Z-00000, Z-00001, Z-00002, Z-00003, Z-00004, …",
    );
    // Soft-deleted rows are out of scope unless asked for.
    db.execute("UPDATE tickets SET deleted_at = now() WHERE external_id = 'C-6'");
    assert_eq!(selected(&db, &dir, &["--status", "closed"]), set(&["C-1", "C-2"]));
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "restore", "--only-deleted", "--status", "closed", "--dry-run"],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["would_affect"], 1);
}

#[test]
fn filter_values_that_look_like_sql_are_plain_data() {
    let (db, dir) = dataset();
    for (flag, value) in [
        ("--requester", "x'; DROP TABLE tickets; --"),
        ("--tag", "vip' OR '1'='1"),
        ("--organization", "Acme' OR 1=1 --"),
        ("--assignee", "\" OR true --"),
    ] {
        assert_eq!(
            selected(&db, &dir, &[flag, value]),
            Vec::<String>::new(),
            "{flag} {value}"
        );
    }
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 6);
}

#[test]
fn an_unfiltered_run_needs_all() {
    let (db, dir) = dataset();
    let before = db.checksum("tickets");
    ticketops(Some(&db), &dir, &["cleanup", "soft-delete"])
        .run()
        .expect_code(2)
        .stderr_has("--all");
    assert_eq!(db.checksum("tickets"), before);
    let run = ticketops(Some(&db), &dir, &["--json", "cleanup", "soft-delete", "--all"]).run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 6);
}

#[test]
fn dry_run_changes_nothing() {
    let (db, dir) = dataset();
    let tables = ["tickets", "bulk_operations", "audit_log"];
    let before: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    ticketops(
        Some(&db),
        &dir,
        &["cleanup", "soft-delete", "--status", "closed", "--dry-run"],
    )
    .run()
    .expect_code(0);
    ticketops(
        Some(&db),
        &dir,
        &["cleanup", "purge", "--deleted-before", "1d", "--dry-run"],
    )
    .run()
    .expect_code(0);
    ticketops(
        Some(&db),
        &dir,
        &["cleanup", "purge-users", "--deleted-before", "1d", "--dry-run"],
    )
    .run()
    .expect_code(0);
    let after: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    assert_eq!(before, after);
}

/// The columns a soft-delete must leave as they were, per ticket.
const UNTOUCHED: &str = "SELECT string_agg(concat_ws(',', id, external_id, subject, status, priority, channel,
        requester_id, assignee_id, organization_id, created_at, updated_at, solved_at), ';' ORDER BY id) FROM tickets";

#[test]
fn soft_delete_changes_only_deleted_at_and_fires_no_column_trigger() {
    let (db, dir) = dataset();
    let before = db.strings(UNTOUCHED);
    let soft_delete = |extra: &[&str]| {
        let mut args = vec!["--json", "-v", "cleanup", "soft-delete", "--batch-size", "2"];
        args.extend_from_slice(extra);
        ticketops(Some(&db), &dir, &args).run()
    };
    let run = soft_delete(&["--status", "closed"]);
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 3, "{}", run.explain());
    assert_eq!(db.strings(UNTOUCHED), before);

    // A production database may have triggers limited to columns, which fire whenever their
    // column is named in an UPDATE's SET list, changed or not.
    db.execute(
        "CREATE TABLE assignee_changes (ticket_id bigint);
         CREATE FUNCTION note_assignee_change() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN INSERT INTO assignee_changes VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER assignee_changed AFTER UPDATE OF assignee_id, status ON tickets
             FOR EACH ROW EXECUTE FUNCTION note_assignee_change();",
    );
    let run = soft_delete(&["--status", "open,solved"]);
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 2, "{}", run.explain());
    assert_eq!(db.scalar("SELECT count(*) FROM assignee_changes"), 0);
    run.stderr_has("column triggers");
    assert_eq!(db.strings(UNTOUCHED), before);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NULL"), 1);
    // The trigger works: a real change of the assignee is noted.
    db.execute("UPDATE tickets SET assignee_id = NULL WHERE external_id = 'C-1'");
    assert_eq!(db.scalar("SELECT count(*) FROM assignee_changes"), 1);
}

#[test]
fn soft_delete_runs_with_update_rights_on_its_own_columns_only() {
    let (db, dir) = dataset();
    // A DBA may let the cleanup job update nothing of tickets but the columns it writes.
    let (role, url) = db.cleaner_role("cleaner");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "-v", "cleanup", "soft-delete", "--status", "closed"],
    )
    .env("DATABASE_URL", &url)
    .run();
    let summary = run.expect_code(0).json();
    assert_eq!(summary["soft_deleted"], 3, "{}", run.explain());
    run.stderr_has("column privileges");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        3
    );
    db.execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

#[test]
fn a_second_concurrent_run_exits_75() {
    let (db, dir) = dataset();
    let pool = ticketops::db::connect_pool(&db.url, 2, ticketops::db::SchemaCheck::UpToDate).unwrap();
    let held = ticketops::db::AdvisoryLock::try_acquire(&pool, "cleanup soft-delete").unwrap();
    let run = ticketops(Some(&db), &dir, &["cleanup", "soft-delete", "--status", "closed"]).run();
    run.expect_code(75).stderr_has("another ticketops run holds the lock");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM bulk_operations WHERE kind = 'cleanup soft-delete'"),
        0
    );
    drop(held);
    ticketops(Some(&db), &dir, &["cleanup", "soft-delete", "--status", "closed"])
        .run()
        .expect_code(0);
}

#[test]
fn a_locked_row_is_skipped_not_waited_on_and_taken_by_the_next_run() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = dataset();
    let mut app = db.conn();
    app.batch_execute(&db.lock_ticket_sql("C-2")).unwrap();
    let started = Instant::now();
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--status",
            "closed",
            "--lock-timeout",
            "30s",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 2);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it waited on the locked row"
    );
    app.batch_execute("COMMIT").unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'C-2' AND deleted_at IS NULL"),
        1
    );
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--status", "closed"],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 1);
}

#[test]
fn purge_skips_a_locked_row_without_waiting_and_the_next_run_takes_it() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = dataset();
    db.execute("UPDATE tickets SET deleted_at = now() - interval '100 days' WHERE status = 'closed'");
    let closed = db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed'");
    assert!(closed >= 3, "the dataset has closed tickets around the locked one");
    let mut app = db.conn();
    app.batch_execute(&db.lock_ticket_sql("C-2")).unwrap();
    let purge = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "cleanup",
            "purge",
            "--deleted-before",
            "90d",
            "--batch-size",
            "1",
        ];
        args.extend_from_slice(extra);
        ticketops(Some(&db), &dir, &args).run()
    };
    let started = Instant::now();
    let run = purge(&["--lock-timeout", "30s"]);
    assert_eq!(run.expect_code(0).json()["purged"].as_i64().unwrap(), closed - 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it waited on the locked row"
    );
    app.batch_execute("COMMIT").unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed'"), 1);
    assert_eq!(purge(&[]).expect_code(0).json()["purged"], 1);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed'"), 0);
}

/// An application inserting a comment holds a KEY SHARE lock on its ticket (the foreign-key
/// check). Soft-delete locks FOR NO KEY UPDATE, which does not conflict with it: the ticket
/// is taken, and neither side waits.
#[test]
fn a_comment_being_added_does_not_keep_its_ticket_from_a_soft_delete() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = dataset();
    let mut app = db.conn();
    app.batch_execute(&format!(
        "BEGIN; {}",
        insert_comment_sql(
            &db,
            "(SELECT id FROM tickets WHERE external_id = 'C-2')",
            "(SELECT requester_id FROM tickets WHERE external_id = 'C-2')",
            "still typing"
        )
    ))
    .unwrap();
    let started = Instant::now();
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--status",
            "closed",
            "--lock-timeout",
            "30s",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 3, "{}", run.explain());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it waited on the comment's lock"
    );
    app.batch_execute("COMMIT").unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'C-2' AND deleted_at IS NOT NULL"),
        1
    );
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), 1);
}

#[test]
fn a_failing_batch_leaves_earlier_batches_committed() {
    let (db, dir) = dataset();
    // The closed ticket the soft-delete reaches last fails: by id, on partitions month by month.
    let order = if partitioned() {
        "date_trunc('month', created_at AT TIME ZONE 'UTC'), id"
    } else {
        "id"
    };
    let closed = db.strings(&format!(
        "SELECT external_id FROM tickets WHERE status = 'closed' ORDER BY {order}"
    ));
    let (last, earlier) = closed.split_last().expect("closed tickets");
    assert_eq!(earlier.len(), 2);
    inject_failure(&db, "UPDATE", last);
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
        ],
    )
    .run();
    run.expect_code(1).stderr_has("injected failure");
    assert_eq!(run.json()["status"], "failed");
    let mut earlier: Vec<&str> = earlier.iter().map(String::as_str).collect();
    earlier.sort_unstable();
    assert_eq!(
        db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL ORDER BY 1"),
        set(&earlier)
    );
}

#[test]
fn sigterm_stops_between_batches_and_marks_the_operation_interrupted() {
    let db = TestDb::new();
    let dir = scratch("cleanup-sigterm");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "300", "--seed", "4"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--all",
            "--batch-size",
            "10",
            "--sleep",
            "200ms",
        ],
    )
    .spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while db
        .scalar("SELECT count(*) FROM bulk_operations WHERE kind = 'cleanup soft-delete' AND checkpoint IS NOT NULL")
        == 0
    {
        assert!(Instant::now() < deadline, "no batch committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let run = Run::from_output(
        "cleanup soft-delete (SIGTERM)".into(),
        child.wait_with_output().unwrap(),
    );
    let summary = run.expect_code(143).json();
    assert_eq!(summary["status"], "interrupted", "{summary}");
    let deleted = db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL");
    assert!(deleted > 0 && deleted < 300, "{deleted}");
    assert_eq!(deleted % 10, 0, "whole batches only");
    assert_eq!(deleted, summary["soft_deleted"].as_i64().unwrap());
    let audited = db.scalar(
        "SELECT coalesce(sum(jsonb_array_length(after->'ids')), 0) FROM audit_log WHERE action = 'soft_delete'",
    );
    assert_eq!(audited, deleted, "the audit trail lists exactly the deleted rows");
    assert_eq!(
        db.strings("SELECT status::text FROM bulk_operations WHERE kind = 'cleanup soft-delete'"),
        set(&["interrupted"])
    );
}

#[test]
fn max_rows_and_max_runtime_stop_cleanly() {
    let (db, dir) = dataset();
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--all",
            "--max-rows",
            "4",
            "--batch-size",
            "3",
        ],
    )
    .run();
    let s = run.expect_code(0).json();
    assert_eq!(s["soft_deleted"], 4);
    assert_eq!(s["stopped"], "max-rows");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--all", "--max-runtime", "0s"],
    )
    .run();
    let s = run.expect_code(0).json();
    assert_eq!(s["soft_deleted"], 0);
    assert_eq!(s["stopped"], "max-runtime");
}

#[test]
fn batch_time_shrinks_slow_batches_and_never_grows_them_past_the_batch_size() {
    let db = TestDb::new();
    let dir = scratch("batch-time");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "1500", "--seed", "9"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let total = db.scalar("SELECT count(*) FROM tickets");
    assert!(total > 1300, "{total} tickets");
    let soft_delete = |extra: &[&str]| {
        let mut args = vec!["--json", "cleanup", "soft-delete", "--all"];
        args.extend_from_slice(extra);
        let run = ticketops(Some(&db), &dir, &args).run();
        run.expect_code(0).json()
    };
    // Every batch far quicker than an hour: none grows past --batch-size.
    let s = soft_delete(&["--batch-size", "200", "--batch-time", "1h", "--max-rows", "600"]);
    assert_eq!(
        (s["soft_deleted"].as_i64(), s["batches"].as_i64()),
        (Some(600), Some(3)),
        "{s}"
    );
    // No batch of 400 rows (nor of 100) takes a millisecond: after the first, batches of 100.
    let s = soft_delete(&["--batch-size", "400", "--batch-time", "1ms"]);
    let rest = total - 600;
    assert_eq!(s["soft_deleted"].as_i64(), Some(rest), "{s}");
    let batches = s["batches"].as_i64().unwrap();
    let unshrunk = (rest + 399) / 400;
    assert!(
        batches > unshrunk + 1,
        "{batches} batches for {rest} rows: not shrunk ({s})"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NULL"), 0);
    assert_eq!(
        db.strings("SELECT args->'batching'->>'batch_time_ms' FROM bulk_operations WHERE kind = 'cleanup soft-delete' ORDER BY id"),
        vec!["3600000", "1"]
    );
}

/// Without --batch-size the cleanup commands run 4,000-row batches (a fifth less lock time
/// than the 5,000 they once ran, issue 16's longest-batch bound); the operation records it.
#[test]
fn the_cleanup_commands_default_to_batches_of_4000_rows() {
    let db = TestDb::new();
    let dir = scratch("cleanup-batch-size");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    for args in [
        &["cleanup", "soft-delete", "--status", "closed"][..],
        &["cleanup", "purge", "--deleted-before", "2100-01-01"],
    ] {
        ticketops(Some(&db), &dir, args).run().expect_code(0);
    }
    assert_eq!(
        db.strings("SELECT kind || ' ' || (args->'batching'->>'batch_size') FROM bulk_operations WHERE kind LIKE 'cleanup%' ORDER BY id"),
        vec!["cleanup soft-delete 4000", "cleanup purge 4000"]
    );
}

#[test]
fn purge_with_archive_then_import_brings_the_tickets_back() {
    let db = TestDb::new();
    let dir = scratch("purge");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let all_before = db.ticket_snapshot();
    let comments_before = db.scalar("SELECT count(*) FROM comments");
    db.execute("UPDATE tickets SET deleted_at = now() - interval '100 days' WHERE status = 'closed'");
    db.execute("UPDATE tickets SET deleted_at = now() - interval '10 days' WHERE status = 'solved'");
    let closed = db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed'");
    let archive = dir.join("archive.csv");
    let archive_comments = dir.join("archive-comments.csv");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "purge",
            "--deleted-before",
            "90d",
            // Relative to the run's directory, which the operation records for its undo.
            "--archive",
            "archive.csv",
            "--archive-comments",
            "archive-comments.csv",
            "--batch-size",
            "7",
        ],
    )
    .run();
    let s = run.expect_code(0).json();
    assert_eq!(s["purged"].as_i64().unwrap(), closed);
    // What was purged cannot be undone; the undo names the archives wherever it runs.
    let op = s["operation_id"].as_i64().unwrap().to_string();
    ticketops(Some(&db), &scratch("purge-undo-elsewhere"), &["undo", &op])
        .run()
        .expect_code(1)
        .stderr_has("what it removed is gone from the database")
        .stderr_has(&format!(
            "ticketops import tickets {}, then ticketops import comments {}",
            archive.display(),
            archive_comments.display()
        ));
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed'"), 0);
    assert!(
        db.scalar("SELECT count(*) FROM tickets WHERE status = 'solved'") > 0,
        "younger deletions stay"
    );
    // Import the archive back, and undelete the rest: the same tickets and comments as before.
    let (run, back) = import(&db, &dir, "tickets", &archive, &[]);
    run.expect_code(0);
    assert_eq!(back["inserted"].as_i64().unwrap(), closed);
    import(&db, &dir, "comments", &archive_comments, &[]).0.expect_code(0);
    db.execute("UPDATE tickets SET deleted_at = NULL");
    assert_same_rows(&db.ticket_snapshot(), &all_before, "after purge and re-import");
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), comments_before);
}

/// A comment added by an application to a ticket that a purge batch holds must wait for the
/// batch (and then fail, its ticket gone), or it could commit between the batch's archive and
/// its delete and go unarchived. The batch's row lock stops it: the foreign-key check locks the
/// ticket (on partitions in the ticket's month, which the comment's month references).
#[test]
fn a_comment_added_to_a_ticket_a_purge_batch_holds_waits_for_the_batch() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = dataset();
    db.execute("UPDATE tickets SET deleted_at = now() - interval '100 days' WHERE external_id = 'C-2'");
    let ticket = db.scalar("SELECT id FROM tickets WHERE external_id = 'C-2'");
    let author = db.scalar("SELECT requester_id FROM tickets WHERE external_id = 'C-2'");
    db.execute(&insert_comment_sql(
        &db,
        &ticket.to_string(),
        &author.to_string(),
        "early",
    ));
    let early = db.scalar("SELECT id FROM comments WHERE body = 'early'");
    // Holds the purge inside its batch, after the archive: its delete of the ticket's comments
    // waits for this row.
    let mut blocker = db.conn();
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM comments WHERE ticket_id = {ticket} AND id = {early} FOR UPDATE"
        ))
        .unwrap();
    let archive = dir.join("held-archive.csv");
    let archive_comments = dir.join("held-archive-comments.csv");
    let mut child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "purge",
            "--deleted-before",
            "90d",
            "--archive",
            archive.to_str().unwrap(),
            "--archive-comments",
            archive_comments.to_str().unwrap(),
            "--lock-timeout",
            "60s",
        ],
    )
    .spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&archive_comments).map_or(true, |a| !a.contains("early")) {
        assert!(Instant::now() < deadline, "the batch wrote no archive");
        assert!(child.try_wait().unwrap().is_none(), "the purge ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut app = db.conn();
    let late = insert_comment_sql(&db, &ticket.to_string(), &author.to_string(), "late");
    let late = std::thread::spawn(move || app.batch_execute(&late));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !late.is_finished(),
        "the comment went in while the batch held its ticket"
    );
    blocker.batch_execute("COMMIT").unwrap();
    Run::from_output("cleanup purge".into(), child.wait_with_output().unwrap()).expect_code(0);
    let err = late.join().unwrap().expect_err("a comment on a purged ticket");
    assert!(err.to_string().contains("foreign key"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'C-2'"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), 0);
    let archived = std::fs::read_to_string(&archive_comments).unwrap();
    assert!(archived.contains("early") && !archived.contains("late"), "{archived}");
}

#[test]
fn a_failing_archive_write_rolls_the_batch_back() {
    let (db, dir) = dataset();
    db.execute("UPDATE tickets SET deleted_at = now() - interval '100 days'");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "purge",
            "--deleted-before",
            "90d",
            "--archive",
            "/dev/full",
        ],
    )
    .run();
    run.expect_code(1).stderr_has("cannot write the archive");
    assert_eq!(run.json()["status"], "failed");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets"),
        6,
        "nothing may be deleted without its archive"
    );
}

#[test]
fn purge_users_removes_only_unreferenced_old_soft_deleted_users() {
    let (db, dir) = dataset();
    db.execute(
        "INSERT INTO users (email, deleted_at) VALUES ('gone@example.com', now() - interval '400 days'),
                                                            ('recent@example.com', now() - interval '5 days')",
    );
    db.execute("UPDATE users SET deleted_at = now() - interval '400 days' WHERE email = 'ann@example.com'");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "purge-users", "--deleted-before", "180d"],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["purged"], 1);
    let emails = db.strings("SELECT email FROM users ORDER BY 1");
    assert!(!emails.contains(&"gone@example.com".to_string()));
    assert!(emails.contains(&"recent@example.com".to_string()));
    assert!(emails.contains(&"ann@example.com".to_string()), "still owns tickets");
}

#[test]
fn ops_list_and_show() {
    let (db, dir) = dataset();
    ticketops(Some(&db), &dir, &["cleanup", "soft-delete", "--status", "closed"])
        .run()
        .expect_code(0);
    let list = ticketops(
        Some(&db),
        &dir,
        &["--json", "ops", "list", "--kind", "cleanup soft-delete"],
    )
    .run();
    let ops = list.expect_code(0).json()["operations"].as_array().unwrap().clone();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["counts"]["soft_deleted"], 3);
    let id = ops[0]["id"].as_i64().unwrap();
    let show = ticketops(Some(&db), &dir, &["--json", "ops", "show", &id.to_string()]).run();
    let op = show.expect_code(0).json();
    assert_eq!(op["status"], "succeeded");
    assert_eq!(op["args"]["filters"]["status"][0], "closed");
    let table = ticketops(Some(&db), &dir, &["ops", "list"]).run();
    assert!(table.expect_code(0).stdout.contains("import tickets"));
    ticketops(Some(&db), &dir, &["ops", "show", "999999"])
        .run()
        .expect_code(2);
}

/// A retention or purge appends to an existing archive only if it is one of the same kind
/// ending with a whole line; anything else is refused before anything is removed. Two runs into
/// the same archives (on the partitioned layout whole months, written by COPY) import back whole.
#[test]
fn an_archive_is_appended_to_only_when_it_is_one_of_the_same_kind() {
    let db = TestDb::new();
    let dir = scratch("archive-append");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let before = db.checksum("tickets");
    let run_retention = |cutoff: &str, archive: &str, comments: &str| {
        ticketops(
            Some(&db),
            &dir,
            &retention(
                cutoff,
                archive,
                &["--json", "--archive-comments", comments, "--apply", "--yes"],
            ),
        )
        .run()
    };
    std::fs::write(dir.join("notes.csv"), "my notes\n").unwrap();
    std::fs::write(dir.join("cut.csv"), "external_id,subject\nT-1,half a li").unwrap();
    for (archive, comments, code, refusal) in [
        (
            "notes.csv",
            "new-comments.csv",
            1,
            "the archive notes.csv exists but does not begin with this archive's header",
        ),
        (
            "cut.csv",
            "new-comments.csv",
            1,
            "the archive cut.csv exists and does not end with a line end",
        ),
        (
            "missing/old.csv",
            "new-comments.csv",
            1,
            "the directory missing does not exist",
        ),
        (
            "old.csv",
            "./old.csv",
            2,
            "--archive and --archive-comments name the same file",
        ),
    ] {
        run_retention("2023-07-01", archive, comments)
            .expect_code(code)
            .stderr_has(refusal);
    }
    ticketops(
        Some(&db),
        &dir,
        &["cleanup", "purge", "--deleted-before", "0d", "--archive", "notes.csv"],
    )
    .run()
    .expect_code(1)
    .stderr_has("does not begin with this archive's header");
    assert_eq!(db.checksum("tickets"), before);
    assert!(!dir.join("new-comments.csv").exists());

    let first = run_retention("2023-04-01", "old.csv", "old-comments.csv")
        .expect_code(0)
        .json();
    // A tickets archive is not a comments archive.
    std::fs::copy(dir.join("old.csv"), dir.join("copy.csv")).unwrap();
    run_retention("2023-07-01", "old.csv", "copy.csv")
        .expect_code(1)
        .stderr_has(
            "the archive copy.csv exists but does not begin with this archive's header (external_id,ticket_external_id",
        );
    let second = run_retention("2023-07-01", "old.csv", "old-comments.csv")
        .expect_code(0)
        .json();
    let removed = first["removed"].as_u64().unwrap() + second["removed"].as_u64().unwrap();
    let comments = first["comments_removed"].as_u64().unwrap() + second["comments_removed"].as_u64().unwrap();
    assert!(first["removed"].as_u64().unwrap() > 0 && second["removed"].as_u64().unwrap() > 0);
    if partitioned() {
        assert!(!second["partitions_dropped"].as_array().unwrap().is_empty(), "{second}");
    }
    // What was removed for good cannot be undone; the undo says where it is, wherever it runs
    // (the archives were named relative to the retention's directory).
    let op = second["operation_id"].as_i64().unwrap().to_string();
    let elsewhere = scratch("retention-undo-elsewhere");
    ticketops(Some(&db), &elsewhere, &["undo", &op])
        .run()
        .expect_code(1)
        .stderr_has("what it removed is gone from the database")
        .stderr_has(&format!(
            "ticketops import tickets {}, then ticketops import comments {}",
            dir.join("old.csv").display(),
            dir.join("old-comments.csv").display()
        ));
    let (_, back) = import(&db, &dir, "tickets", &dir.join("old.csv"), &[]);
    assert_eq!(
        (back["rows_read"].as_u64(), back["inserted"].as_u64()),
        (Some(removed), Some(removed)),
        "{back}"
    );
    let (_, back) = import(&db, &dir, "comments", &dir.join("old-comments.csv"), &[]);
    assert_eq!(
        (back["rows_read"].as_u64(), back["inserted"].as_u64()),
        (Some(comments), Some(comments)),
        "{back}"
    );
}

#[test]
fn retention_archives_then_removes_exactly_the_old_tickets_with_what_hangs_off_them() {
    let db = TestDb::new();
    let dir = scratch("retention");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    // A fix leaves per-row audit rows on some old tickets; they go with them.
    apply(
        &db,
        &dir,
        &["fix", "set", "priority=high", "--created-before", "2023-03-01"],
    );
    let cutoff = "2024-01-15";
    let old = format!("created_at < '{cutoff}'");
    let (old_tickets, old_comments) = (
        db.scalar(&format!("SELECT count(*) FROM tickets WHERE {old}")),
        db.scalar(&format!(
            "SELECT count(*) FROM comments WHERE ticket_id IN (SELECT id FROM tickets WHERE {old})"
        )),
    );
    assert!(old_tickets > 50 && old_comments > 50);
    let kept = db.strings(&format!("SELECT external_id FROM tickets WHERE NOT ({old}) ORDER BY 1"));
    let old_snapshot: Vec<String> = db
        .ticket_snapshot()
        .into_iter()
        .filter(|row| !kept.iter().any(|k| row.starts_with(&format!("({k},"))))
        .collect();
    let before = db.checksum("tickets");
    // What `export` shows of the old tickets and comments: the archives must read the same, by
    // whichever path (whole partitions or batches) each row goes.
    for dataset in ["tickets", "comments"] {
        let out = format!("exported-{dataset}.csv");
        ticketops(
            Some(&db),
            &dir,
            &[
                "export",
                dataset,
                "--include-deleted",
                "--created-before",
                cutoff,
                "-o",
                &out,
            ],
        )
        .run()
        .expect_code(0);
    }

    // The dry run counts and writes nothing.
    let dry = ticketops(Some(&db), &dir, &retention(cutoff, "old.csv", &["--json"])).run();
    let v = dry.expect_code(0).json();
    assert_eq!(
        (v["would_remove"].as_i64(), v["comments"].as_i64()),
        (Some(old_tickets), Some(old_comments))
    );
    assert_eq!(db.checksum("tickets"), before);
    assert!(!dir.join("old.csv").exists());
    // Without a terminal, --apply needs --yes.
    ticketops(Some(&db), &dir, &retention(cutoff, "old.csv", &["--apply"]))
        .run()
        .expect_code(2);

    let v = apply(
        &db,
        &dir,
        &retention(
            cutoff,
            "old.csv",
            &["--archive-comments", "old-comments.csv", "--batch-size", "25"],
        ),
    );
    assert_eq!(v["removed"].as_i64(), Some(old_tickets), "{v}");
    assert_eq!(v["comments_removed"].as_i64(), Some(old_comments), "{v}");
    let listed = ticketops(
        Some(&db),
        &dir,
        &["--json", "ops", "list", "--kind", "cleanup retention"],
    )
    .run();
    assert!(
        listed
            .expect_code(0)
            .stdout
            .contains(&format!("\"id\":{}", v["operation_id"])),
        "{}",
        listed.explain()
    );
    assert_eq!(db.strings("SELECT external_id FROM tickets ORDER BY 1"), kept);
    assert_eq!(
        db.scalar("SELECT count(*) FROM comments c LEFT JOIN tickets t ON t.id = c.ticket_id WHERE t.id IS NULL"),
        0,
        "no comment outlives its ticket"
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM audit_log a WHERE a.table_name = 'tickets' AND a.row_id > 0
               AND a.action NOT IN ('purge', 'insert_ids', 'soft_delete', 'restore')
               AND NOT EXISTS (SELECT 1 FROM tickets t WHERE t.id = a.row_id)"
        ),
        0,
        "no per-row audit row of a removed ticket is left"
    );
    for (archive, exported) in [
        ("old.csv", "exported-tickets.csv"),
        ("old-comments.csv", "exported-comments.csv"),
    ] {
        let (archived, shown) = (sorted_records(&dir.join(archive)), sorted_records(&dir.join(exported)));
        let only_archived: Vec<_> = archived.iter().filter(|r| !shown.contains(r)).take(3).collect();
        let only_shown: Vec<_> = shown.iter().filter(|r| !archived.contains(r)).take(3).collect();
        assert!(
            archived == shown,
            "{archive} holds what export showed of the removed rows ({} and {} records); \
             only archived: {only_archived:?}; only exported: {only_shown:?}",
            archived.len(),
            shown.len()
        );
    }
    // The archives are import files: importing them brings the very same tickets back.
    let (run, s) = import(&db, &dir, "tickets", &dir.join("old.csv"), &[]);
    run.expect_code(0);
    assert_eq!(s["inserted"].as_i64(), Some(old_tickets), "{}", run.explain());
    let (run, s) = import(&db, &dir, "comments", &dir.join("old-comments.csv"), &[]);
    run.expect_code(0);
    assert_eq!(s["inserted"].as_i64(), Some(old_comments), "{}", run.explain());
    let restored: Vec<String> = db
        .ticket_snapshot()
        .into_iter()
        .filter(|row| !kept.iter().any(|k| row.starts_with(&format!("({k},"))))
        .collect();
    assert_same_rows(&restored, &old_snapshot, "archive re-imported");

    // Nothing left before the cut-off: a second run removes nothing and says so.
    ticketops(
        Some(&db),
        &dir,
        &retention("2020-01-01", "none.csv", &["--apply", "--yes"]),
    )
    .run()
    .expect_code(0);
    ticketops(Some(&db), &dir, &["cleanup", "retention", "--archive", "x.csv"])
        .run()
        .expect_code(2)
        .stderr_has("needs --created-before");
}

/// The records of a CSV file (header first), the data records sorted.
fn sorted_records(path: &std::path::Path) -> Vec<Vec<String>> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().iter().map(String::from).collect();
    let mut records: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    records.sort();
    records.insert(0, header);
    records
}
