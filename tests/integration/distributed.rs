//! The distributed layout (`migrate run --layout distributed` on a Citus coordinator): what
//! only it can get wrong. These run in the distributed suite only (`TICKETOPS_TEST_LAYOUT=
//! distributed`, which scripts/test runs on its local Citus cluster); elsewhere there is no
//! Citus to run them on.

use std::time::{Duration, Instant};

use crate::support::*;

/// Tickets per worker, counted on the shards themselves.
fn tickets_per_worker(db: &TestDb) -> Vec<i64> {
    db.json(
        "SELECT s.nodeport, sum(r.result::bigint)::bigint AS n
         FROM run_command_on_shards('tickets', $$SELECT count(*) FROM %s$$) r
         JOIN citus_shards s ON s.shardid = r.shardid
         GROUP BY s.nodeport ORDER BY s.nodeport",
    )
    .iter()
    .map(|row| row["n"].as_i64().unwrap())
    .collect()
}

#[test]
fn one_companys_import_lands_on_every_worker_and_doctor_shows_the_cluster() {
    crate::only_on_distributed!();
    let db = TestDb::new();
    let dir = scratch("dist-spread");
    // One organization's tickets: a tenant key would put them all on one shard.
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "2000", "--seed", "7"]);
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(0);
    assert_accounted(&summary, &run);
    let per_worker = tickets_per_worker(&db);
    assert_eq!(per_worker.len(), 2, "tickets on {per_worker:?}");
    assert_eq!(
        per_worker.iter().sum::<i64>(),
        db.scalar("SELECT count(*) FROM tickets")
    );
    assert!(
        per_worker.iter().all(|&n| n > 600),
        "uneven spread over the workers: {per_worker:?}"
    );
    // Every ticket has its key, on the key's own shard.
    assert_eq!(
        db.scalar("SELECT count(*) FROM ticket_keys"),
        db.scalar("SELECT count(*) FROM tickets")
    );
    let doctor = ticketops(Some(&db), &dir, &["--json", "doctor"]).run();
    let report = doctor.json();
    assert_eq!(report["layout"], "distributed", "{report}");
    let workers = report["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "worker" && n["shards"].as_i64().unwrap() > 0)
        .count();
    assert_eq!(workers, 2, "{report}");
    for table in report["cluster"]["tables"].as_array().unwrap() {
        assert_eq!(table["kind"], table["expected"], "{table}");
    }
    doctor.expect_code(0);
}

#[test]
fn the_same_external_id_cannot_be_stored_twice_on_different_shards() {
    crate::only_on_distributed!();
    let db = TestDb::new();
    let dir = scratch("dist-unique");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "50", "--seed", "3"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // Another writer that writes keys as ticketops does is stopped by the key table.
    let clash = db.conn_result(
        "BEGIN;
         INSERT INTO ticket_keys (external_id, ticket_id, created_at) VALUES ('T-000001', 999999, now());
         COMMIT;",
    );
    let err = clash.expect_err("a second key for T-000001 was accepted");
    assert!(err.contains("duplicate key"), "{err}");
}

#[test]
fn a_soft_delete_skips_a_row_the_application_holds_on_another_shard_without_waiting() {
    crate::only_on_distributed!();
    use diesel::connection::SimpleConnection;
    let db = TestDb::new();
    let dir = scratch("dist-locked");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "400", "--seed", "5"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    db.execute("UPDATE tickets SET status = 'closed' WHERE id % 4 = 0");
    let closed = db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed' AND deleted_at IS NULL");
    let held =
        db.strings("SELECT external_id FROM tickets WHERE status = 'closed' ORDER BY id DESC LIMIT 1")[0].clone();
    // The application holds one closed ticket (a one-shard statement: Citus allows it).
    let mut app = db.conn();
    let ticket_id = db.scalar(&format!(
        "SELECT ticket_id FROM ticket_keys WHERE external_id = '{held}'"
    ));
    app.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM tickets WHERE id = {ticket_id} FOR UPDATE"
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
            "2s",
            "--batch-size",
            "50",
        ],
    )
    .run();
    run.expect_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the soft-delete waited {:?}",
        started.elapsed()
    );
    assert_eq!(run.json()["soft_deleted"].as_i64().unwrap(), closed - 1);
    // Exactly the closed tickets but the held one; nothing else.
    assert_eq!(
        db.strings("SELECT external_id FROM tickets WHERE status = 'closed' AND deleted_at IS NULL"),
        vec![held.clone()]
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL AND status <> 'closed'"),
        0
    );
    app.batch_execute("ROLLBACK").unwrap();
    // The next run takes it.
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--status", "closed"],
    )
    .run();
    run.expect_code(0);
    assert_eq!(run.json()["soft_deleted"], 1);
}

#[test]
fn the_distributed_layout_is_refused_without_citus_and_says_what_it_needs() {
    // An empty database without the citus extension: on a plain server, and on a Citus
    // coordinator too (the extension is per database).
    let db = TestDb::empty();
    let dir = scratch("dist-refused");
    let run = ticketops(Some(&db), &dir, &["migrate", "run", "--layout", "distributed"]).run();
    run.expect_code(2).stderr_has("needs a Citus coordinator");
    // Nothing of the layout was applied: the database stays plain.
    assert_eq!(
        db.strings("SELECT layout FROM ticketops_layout"),
        vec!["plain".to_string()]
    );
}

#[test]
fn a_sigkilled_import_leaves_no_transaction_in_doubt_and_resumes_to_the_same_keys_and_tickets() {
    crate::only_on_distributed!();
    let dir = scratch("dist-2pc");
    let file = generate(&dir, "t.csv", &["tickets", "--rows", "20000", "--seed", "13"]);
    let reference = TestDb::new();
    import(&reference, &dir, "tickets", &file, &["--batch-size", "500"])
        .0
        .expect_code(0);
    let expected = reference.ticket_snapshot();

    let db = TestDb::new();
    let path = file.to_str().unwrap();
    let mut child = ticketops(Some(&db), &dir, &["import", "tickets", path, "--batch-size", "500"]).spawn();
    wait_for_checkpoint(&db, &mut child);
    kill(&child, "-KILL");
    let _ = child.wait();
    // Every batch commits on the workers in two phases; a killed client leaves none prepared
    // for long: what Citus' recovery finds in doubt is committed or rolled back, per the
    // coordinator's record.
    db.scalar("SELECT recover_prepared_transactions()::bigint");
    let in_doubt = || {
        db.scalar(
            "SELECT coalesce(sum(result::bigint), 0)::bigint FROM run_command_on_workers(
                 $$SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()$$)",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_doubt() > 0 {
        assert!(
            Instant::now() < deadline,
            "transactions still prepared on the workers after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
        db.scalar("SELECT recover_prepared_transactions()::bigint");
    }
    // What the killed import committed is whole: each ticket has its key on the key's shard.
    let partial = db.scalar("SELECT count(*) FROM tickets");
    assert!(
        partial < expected.len() as i64,
        "the kill came too late to test anything"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM ticket_keys"), partial);

    let (run, _) = import(&db, &dir, "tickets", &file, &["--batch-size", "500", "--resume"]);
    run.expect_code(0);
    assert_same_rows(&db.ticket_snapshot(), &expected, "--resume after SIGKILL");
    assert_eq!(
        db.strings("SELECT ticket_id || ' ' || external_id FROM ticket_keys ORDER BY 1"),
        db.strings("SELECT id || ' ' || external_id FROM tickets ORDER BY 1"),
        "every ticket has exactly its key"
    );
}
