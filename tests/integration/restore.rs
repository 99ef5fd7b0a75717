//! `restore`: exactly one soft-delete operation's rows, or the tickets filters select.

use crate::support::*;

#[test]
fn soft_delete_then_restore_brings_back_exactly_that_operations_rows() {
    let (db, dir) = dataset();
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
            "2",
        ],
    )
    .run();
    let summary = run.expect_code(0).json();
    assert_eq!(summary["soft_deleted"], 3);
    assert_eq!(summary["batches"], 2, "batch size 2 over 3 rows");
    assert_eq!(summary["stopped"], "done");
    let op = summary["operation_id"].as_i64().unwrap();
    assert_eq!(
        db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL ORDER BY 1"),
        set(&["C-1", "C-2", "C-6"])
    );
    // Each batch committed on its own, with its own audit record.
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM audit_log WHERE operation_id = {op}")),
        2
    );
    // Soft-deleting a ticket soft-deletes nothing else.
    assert_eq!(db.scalar("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL"), 0);

    // Another ticket deleted by someone else, and one of op's rows restored and deleted again since.
    db.execute("UPDATE tickets SET deleted_at = now() WHERE external_id = 'C-5'");
    db.execute("UPDATE tickets SET deleted_at = now() + interval '1 second', last_operation_id = NULL WHERE external_id = 'C-6'");
    let op = op.to_string();
    let dry = ticketops(Some(&db), &dir, &["--json", "restore", "--operation", &op, "--dry-run"]).run();
    assert_eq!(dry.expect_code(0).json()["would_affect"], 2, "{}", dry.explain());
    dry.stderr_has("soft-deleted 3 ticket(s); 2 can be restored");
    // One ticket per batch: the audit trail's batches (2 and 1 tickets) are cut to size.
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "restore", "--operation", &op, "--batch-size", "1"],
    )
    .run();
    let restore = run.expect_code(0).json();
    assert_eq!(restore["restored"], 2, "{}", run.explain());
    assert_eq!(restore["skipped_changed"], 1);
    assert_eq!(restore["batches"], 3);
    assert_eq!(
        db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL ORDER BY 1"),
        set(&["C-5", "C-6"])
    );
    // A second restore of the same operation does nothing.
    let again = ticketops(Some(&db), &dir, &["--json", "restore", "--operation", &op]).run();
    assert_eq!(again.expect_code(0).json()["restored"], 0);
}

#[test]
fn restore_of_an_operation_stops_at_max_rows_inside_one_of_its_batches() {
    let (db, dir) = dataset();
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--status", "closed"],
    )
    .run();
    let summary = run.expect_code(0).json();
    assert_eq!(
        (summary["soft_deleted"].as_i64(), summary["batches"].as_i64()),
        (Some(3), Some(1))
    );
    let op = summary["operation_id"].to_string();
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "restore", "--operation", &op, "--max-rows", "2"],
    )
    .run();
    let restore = run.expect_code(0).json();
    assert_eq!(restore["restored"], 2, "{}", run.explain());
    assert_eq!(restore["stopped"], "max-rows");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        1
    );
    let run = ticketops(Some(&db), &dir, &["--json", "restore", "--operation", &op]).run();
    assert_eq!(run.expect_code(0).json()["restored"], 1, "{}", run.explain());
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        0
    );
}

#[test]
fn restore_by_filters_needs_only_deleted() {
    let (db, dir) = dataset();
    db.execute("UPDATE tickets SET deleted_at = now() WHERE external_id IN ('C-1', 'C-2')");
    ticketops(Some(&db), &dir, &["restore", "--status", "closed"])
        .run()
        .expect_code(2);
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "restore", "--only-deleted", "--requester", "bob@example.com"],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["restored"], 1);
    assert_eq!(
        db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL"),
        set(&["C-1"])
    );
}

#[test]
fn restore_by_filters_right_after_a_large_soft_delete_takes_its_batches_quickly() {
    // Statistics from before the soft-delete (autovacuum has not come yet) say no ticket is
    // deleted. A batch's candidates once were a subquery of its locking statement, which the
    // planner then ran again for every ticket it locked: quadratic, over any timeout.
    if distributed() {
        return; // Citus reads the candidates apart already
    }
    let dir = scratch("restore-stale");
    let db = TestDb::new();
    let file = generate(&dir, "tickets.csv", &["tickets", "--rows", "20000", "--seed", "41"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // Autovacuum kept away from the tables holding tickets (each partition on that layout).
    db.execute(
        "DO $$ DECLARE t regclass; BEGIN
           FOR t IN SELECT relid FROM pg_partition_tree('tickets') WHERE isleaf LOOP
             EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = off)', t);
           END LOOP;
         END $$;
         ANALYZE tickets",
    );
    let deleted = ticketops(Some(&db), &dir, &["--json", "cleanup", "soft-delete", "--all"])
        .run()
        .expect_code(0)
        .json()["soft_deleted"]
        .as_u64()
        .unwrap();
    assert!(deleted > 15000, "{deleted}");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "restore",
            "--only-deleted",
            "--created-after",
            "2000-01-01",
            "--batch-size",
            "5000",
            "--statement-timeout",
            "2s",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["restored"].as_u64(), Some(deleted));
}
