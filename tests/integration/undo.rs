//! `undo`: fixes, imports, soft-delete runs and undos reverted; conflicts and --force.

use crate::support::*;

#[test]
fn undo_reports_rows_changed_since_and_force_reverts_them() {
    let (db, dir) = sample_db("fix-conflict");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "fix",
            "set",
            "priority=low",
            "--status",
            "open",
            "--apply",
            "--yes",
        ],
    )
    .run();
    let v = run.expect_code(0).json();
    let op = v["operation_id"].as_i64().unwrap().to_string();
    let changed = v["changed"].as_i64().unwrap();
    // Someone changes one of the fixed tickets afterwards.
    let touched = db
        .strings(&format!(
            "SELECT external_id FROM tickets WHERE last_operation_id = {op} ORDER BY id LIMIT 1"
        ))
        .remove(0);
    db.execute(&format!(
        "UPDATE tickets SET priority = 'urgent' WHERE external_id = '{touched}'"
    ));
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    let d = dry.expect_code(0).json();
    assert_eq!(d["conflicts"], 1);
    assert_eq!(d["would_revert"].as_i64().unwrap(), changed - 1);
    let run = ticketops(Some(&db), &dir, &["--json", "undo", &op, "--apply", "--yes"]).run();
    let u = run.expect_code(0).json();
    assert_eq!(u["reverted"].as_i64().unwrap(), changed - 1);
    assert_eq!(
        db.strings(&format!(
            "SELECT priority::text FROM tickets WHERE external_id = '{touched}'"
        )),
        vec!["urgent"]
    );
    let forced = ticketops(Some(&db), &dir, &["--json", "undo", &op, "--apply", "--yes", "--force"]).run();
    assert_eq!(forced.expect_code(0).json()["reverted"], 1);
    let original = db.strings(&format!(
        "SELECT a.before->>'priority' FROM audit_log a JOIN tickets t ON t.id = a.row_id
         WHERE a.operation_id = {op} AND t.external_id = '{touched}'"
    ));
    assert_eq!(
        db.strings(&format!(
            "SELECT priority::text FROM tickets WHERE external_id = '{touched}'"
        )),
        original
    );
}

#[test]
fn an_undo_can_be_undone() {
    let (db, dir) = sample_db("fix-undo-undo");
    let fix = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "fix",
            "set",
            "status=solved",
            "--status",
            "new",
            "--apply",
            "--yes",
        ],
    )
    .run();
    let fix_op = fix.expect_code(0).json()["operation_id"].as_i64().unwrap();
    let fixed = db.checksum("tickets");
    let undo = ticketops(
        Some(&db),
        &dir,
        &["--json", "undo", &fix_op.to_string(), "--apply", "--yes"],
    )
    .run();
    let undo_op = undo.expect_code(0).json()["operation_id"].as_i64().unwrap();
    let redo = ticketops(
        Some(&db),
        &dir,
        &["--json", "undo", &undo_op.to_string(), "--apply", "--yes"],
    )
    .run();
    assert!(redo.expect_code(0).json()["reverted"].as_u64().unwrap() > 0);
    assert_eq!(db.checksum("tickets"), fixed);
}

#[test]
fn undo_of_a_soft_delete_run_restores_it() {
    let (db, dir) = sample_db("undo-softdelete");
    let original = db.checksum("tickets");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--status", "closed"],
    )
    .run();
    let op = run.expect_code(0).json()["operation_id"].as_i64().unwrap().to_string();
    ticketops(Some(&db), &dir, &["undo", &op]).run().expect_code(0);
    assert!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL") > 0,
        "a dry run restores nothing"
    );
    ticketops(Some(&db), &dir, &["undo", &op, "--apply", "--yes"])
        .run()
        .expect_code(0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        0
    );
    assert_ne!(
        db.checksum("tickets"),
        original,
        "restore marks the rows with its own operation"
    );
}

#[test]
fn undo_of_an_import_soft_deletes_its_inserts_and_restores_its_updates() {
    let (db, dir) = sample_db("undo-import");
    let before_ids = "id <= (SELECT max(id) FROM tickets)";
    let max_id = db.scalar("SELECT max(id) FROM tickets");
    let original = tickets_and_tags(&db, before_ids);
    // The same generator, another seed and more rows: most existing tickets change, 100 are new.
    let file = generate(&dir, "second.csv", &["tickets", "--rows", "300", "--seed", "9"]);
    let (_, summary) = import(&db, &dir, "tickets", &file, &["--batch-size", "40"]);
    let (inserted, updated) = (
        summary["inserted"].as_i64().unwrap(),
        summary["updated"].as_i64().unwrap(),
    );
    assert!(inserted > 50 && updated > 50, "{summary}");
    let op = summary["operation_id"].as_i64().unwrap().to_string();
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    assert_eq!(
        dry.expect_code(0).json()["would_revert"].as_i64().unwrap(),
        inserted + updated
    );
    let u = apply(&db, &dir, &["undo", &op, "--batch-size", "30"]);
    assert_eq!(u["reverted"].as_i64().unwrap(), inserted + updated);
    assert_eq!(tickets_and_tags(&db, &format!("id <= {max_id}")), original);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM tickets WHERE id > {max_id} AND deleted_at IS NULL"
        )),
        0,
        "every inserted ticket is soft-deleted"
    );
    // Twice does nothing; the undo itself can be undone, which brings the import back.
    assert_eq!(apply(&db, &dir, &["undo", &op])["reverted"], 0);
    let imported_again = apply(&db, &dir, &["undo", &u["operation_id"].to_string()]);
    assert_eq!(imported_again["reverted"].as_i64().unwrap(), inserted + updated);
    let (_, rerun) = import(&db, &dir, "tickets", &file, &["--batch-size", "40"]);
    assert_eq!(rerun["unchanged"], rerun["rows_read"], "{rerun}");
}
