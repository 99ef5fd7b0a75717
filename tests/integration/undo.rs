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
    let f = forced.expect_code(0).json();
    assert_eq!(f["reverted"], 1);
    // The rest were reverted by the first undo: neither changed again nor conflicts.
    assert_eq!(f["already_reverted"].as_i64().unwrap(), changed - 1, "{f}");
    assert_eq!(f["conflicts"], 0, "{f}");
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
    // Twice does nothing, and says every row is as before already; the undo itself can be
    // undone, which brings the import back.
    let twice = apply(&db, &dir, &["undo", &op, "--batch-size", "30"]);
    assert_eq!(twice["reverted"], 0);
    assert_eq!(
        twice["already_reverted"].as_i64().unwrap(),
        inserted + updated,
        "{twice}"
    );
    let imported_again = apply(&db, &dir, &["undo", &u["operation_id"].to_string()]);
    assert_eq!(imported_again["reverted"].as_i64().unwrap(), inserted + updated);
    let (_, rerun) = import(&db, &dir, "tickets", &file, &["--batch-size", "40"]);
    assert_eq!(rerun["unchanged"], rerun["rows_read"], "{rerun}");
}

/// A new ticket and an updated one that a fix changed after the import are conflicts of its
/// undo, in the dry run and in the run alike (on Citus the count once read the tickets after
/// the batch's own update and called the new tickets it had just soft-deleted "already
/// reverted"); both keep the fix's values.
#[test]
fn undo_of_an_import_counts_its_tickets_changed_since_as_conflicts() {
    let (db, dir) = sample_db("undo-import-conflicts");
    let max_id = db.scalar("SELECT max(id) FROM tickets");
    let file = generate(&dir, "second.csv", &["tickets", "--rows", "300", "--seed", "9"]);
    let (_, summary) = import(&db, &dir, "tickets", &file, &["--batch-size", "40"]);
    let op = summary["operation_id"].as_i64().unwrap();
    let rows = summary["inserted"].as_i64().unwrap() + summary["updated"].as_i64().unwrap();
    let changed_since = [
        db.strings(&format!(
            "SELECT external_id FROM tickets WHERE id > {max_id} ORDER BY id LIMIT 1"
        )),
        db.strings(&format!(
            "SELECT external_id FROM tickets WHERE id <= {max_id} AND last_operation_id = {op} ORDER BY id LIMIT 1"
        )),
    ]
    .concat();
    assert_eq!(changed_since.len(), 2);
    let mut changed_since = changed_since;
    changed_since.sort();
    std::fs::write(
        dir.join("ids.csv"),
        format!("external_id\n{}\n", changed_since.join("\n")),
    )
    .unwrap();
    let fix = apply(
        &db,
        &dir,
        &["fix", "set", "subject=changed since", "--ids-file", "ids.csv"],
    );
    assert_eq!(fix["changed"], 2, "{fix}");

    let op = op.to_string();
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    let dry = dry.expect_code(0).json();
    assert_eq!(
        (
            dry["would_revert"].as_i64(),
            &dry["conflicts"],
            &dry["already_reverted"]
        ),
        (Some(rows - 2), &2.into(), &0.into()),
        "{dry}"
    );
    let u = apply(&db, &dir, &["undo", &op, "--batch-size", "30"]);
    assert_eq!(
        (u["reverted"].as_i64(), &u["conflicts"], &u["already_reverted"]),
        (Some(rows - 2), &2.into(), &0.into()),
        "{u}"
    );
    assert_eq!(
        db.strings(
            "SELECT external_id FROM tickets WHERE subject = 'changed since' AND deleted_at IS NULL ORDER BY id"
        ),
        changed_since
    );
}

/// Comments have no soft-delete: undo of a comment import deletes the comments it inserted
/// (recording each whole), restores those it updated, leaves one written since unless --force,
/// and undoing the undo puts the deleted ones back with their ids.
#[test]
fn undo_of_a_comment_import_deletes_its_new_comments_and_its_undo_puts_them_back() {
    let (db, dir) = dataset();
    let comments = |name: &str, rows: &str| import_comments(&db, &dir, name, rows);
    comments(
        "first.csv",
        "K-1,C-1,ann@example.com,first,true,2024-01-01T00:00:00Z\n\
         K-2,C-2,bob@example.com,second,true,2024-01-01T00:00:00Z\n",
    );
    let after_first = db.checksum("comments");
    // K-2 edited, K-3 and a comment without external_id new.
    let second = comments(
        "second.csv",
        "K-2,C-2,bob@example.com,second (edited),true,2024-01-01T00:00:00Z\n\
         K-3,C-3,cid@example.com,third,false,2024-01-02T00:00:00Z\n\
         ,C-4,ann@example.com,no key,true,2024-01-03T00:00:00Z\n",
    );
    assert_eq!(outcome(&second), [2, 1, 0, 0, 0, 0], "{second}");
    let after_second = db.checksum("comments");
    let op = second["operation_id"].to_string();

    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    assert_eq!(dry.expect_code(0).json()["would_revert"], 3);
    let undone = apply(&db, &dir, &["undo", &op]);
    assert_eq!(undone["reverted"], 3, "{undone}");
    assert_eq!(
        db.checksum("comments"),
        after_first,
        "the new comments gone, the edited one back"
    );
    assert_comment_keys_match(&db);
    let listed = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "ops",
            "show",
            &undone["operation_id"].to_string(),
            "--changes",
        ],
    )
    .run();
    let listed = listed.expect_code(0).json();
    let deleted = listed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["field"] == "(deleted)")
        .count();
    assert_eq!(deleted, 2, "{listed}");

    // Undoing the undo puts them back, ids and all.
    let redone = apply(&db, &dir, &["undo", &undone["operation_id"].to_string()]);
    assert_eq!(redone["reverted"], 3, "{redone}");
    assert_eq!(db.checksum("comments"), after_second);
    assert_comment_keys_match(&db);

    // The first import's comments: K-1 is as it inserted it, K-2 was written since.
    let first_op = db.scalar("SELECT min(operation_id) FROM audit_log WHERE table_name = 'comments'");
    let run = apply(&db, &dir, &["undo", &first_op.to_string()]);
    assert_eq!((&run["reverted"], &run["conflicts"]), (&1.into(), &1.into()), "{run}");
    assert_eq!(
        db.strings("SELECT external_id FROM comments WHERE external_id IS NOT NULL ORDER BY 1"),
        vec!["K-2", "K-3"]
    );
    let forced = apply(&db, &dir, &["undo", &first_op.to_string(), "--force"]);
    assert_eq!(forced["reverted"], 1, "{forced}");
    assert_eq!(
        db.strings("SELECT external_id FROM comments WHERE external_id IS NOT NULL ORDER BY 1"),
        vec!["K-3"]
    );
    assert_comment_keys_match(&db);
}

/// A row whose before-image names a ticket or a user that is gone since (purged) cannot be
/// put back: the undo leaves it alone as a conflict and finishes the rest (it once failed on
/// the foreign key, batch after batch).
#[test]
fn undo_leaves_alone_the_rows_whose_ticket_or_user_is_gone() {
    let (db, dir) = dataset();
    let comments = |name: &str, rows: &str| import_comments(&db, &dir, name, rows);
    comments(
        "first.csv",
        "K-1,C-1,ann@example.com,first,true,2024-01-01T00:00:00Z\n\
         K-2,C-2,dan@example.com,second,true,2024-01-01T00:00:00Z\n\
         K-3,C-5,ann@example.com,third,true,2024-01-01T00:00:00Z\n",
    );
    // K-1 moves to another ticket, K-2 to another author, K-3 only changes.
    let second = comments(
        "second.csv",
        "K-1,C-3,ann@example.com,first,true,2024-01-01T00:00:00Z\n\
         K-2,C-2,ann@example.com,second,true,2024-01-01T00:00:00Z\n\
         K-3,C-5,ann@example.com,third (edited),true,2024-01-01T00:00:00Z\n",
    );
    assert_eq!(second["updated"], 3, "{second}");
    // K-1's old ticket and K-2's old author are removed for good.
    std::fs::write(dir.join("c1.csv"), "external_id\nC-1\n").unwrap();
    let cleanup = |args: &[&str]| {
        ticketops(Some(&db), &dir, &[&["--json", "cleanup"], args].concat())
            .run()
            .expect_code(0)
            .json()
    };
    cleanup(&["soft-delete", "--ids-file", "c1.csv"]);
    cleanup(&["purge", "--deleted-before", "0d"]);
    apply(
        &db,
        &dir,
        &[
            "fix",
            "merge-users",
            "--from",
            "dan@example.com",
            "--into",
            "bob@example.com",
        ],
    );
    let purged = cleanup(&["purge-users", "--deleted-before", "0d"]);
    assert_eq!(purged["rows"], 1, "{purged}");

    let op = second["operation_id"].to_string();
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    let dry = dry.expect_code(0).json();
    assert_eq!(
        (&dry["would_revert"], &dry["conflicts"]),
        (&1.into(), &2.into()),
        "{dry}"
    );
    for force in [false, true] {
        let mut args = vec!["undo", op.as_str()];
        if force {
            args.push("--force");
        }
        let run = apply(&db, &dir, &args);
        let expected_reverted = if force { 0 } else { 1 };
        assert_eq!(
            (&run["reverted"], &run["conflicts"], &run["status"]),
            (&expected_reverted.into(), &2.into(), &"succeeded".into()),
            "force {force}: {run}"
        );
    }
    assert_eq!(
        db.strings(
            "SELECT c.external_id || ' ' || t.external_id || ' ' || u.email || ' ' || c.body
             FROM comments c JOIN tickets t ON t.id = c.ticket_id JOIN users u ON u.id = c.author_id ORDER BY 1"
        ),
        [
            "K-1 C-3 ann@example.com first",
            "K-2 C-2 ann@example.com second",
            "K-3 C-5 ann@example.com third"
        ]
    );
}

/// Imports comment rows (without the header) written to `name`; the run must succeed.
fn import_comments(db: &TestDb, dir: &std::path::Path, name: &str, rows: &str) -> serde_json::Value {
    let file = dir.join(name);
    let header = "external_id,ticket_external_id,author_email,body,public,created_at\n";
    std::fs::write(&file, format!("{header}{rows}")).unwrap();
    let (run, summary) = import(db, dir, "comments", &file, &[]);
    run.expect_code(0);
    summary
}

/// A users import records each changed user's values before it, on every layout, and its undo
/// puts them back (on Citus the before-image was read after the write: the new values, and
/// the undo called every user already reverted).
#[test]
fn undo_of_a_users_import_puts_back_the_users_it_changed() {
    let db = TestDb::new();
    let dir = scratch("undo-users");
    let users = |name: &str, rows: &str| {
        let file = dir.join(name);
        std::fs::write(&file, format!("email,name,role,organization\n{rows}")).unwrap();
        let (run, summary) = import(&db, &dir, "users", &file, &[]);
        run.expect_code(0);
        summary
    };
    users(
        "first.csv",
        "ann@example.com,Ann Smith,agent,Acme\nbob@example.com,Bob Jones,customer,Globex\n",
    );
    let before = db.user_snapshot();
    let second = users(
        "second.csv",
        "ann@example.com,Ann Smith-Lee,agent,Initech\nbob@example.com,Bob Jones,customer,Globex\n",
    );
    assert_eq!(
        (&second["updated"], &second["unchanged"]),
        (&1.into(), &1.into()),
        "{second}"
    );
    assert_eq!(
        db.strings(&format!(
            "SELECT before ->> 'name' FROM audit_log WHERE operation_id = {} AND table_name = 'users'",
            second["operation_id"]
        )),
        ["Ann Smith"],
        "the before-image holds the name before the import"
    );
    let undone = apply(&db, &dir, &["undo", &second["operation_id"].to_string()]);
    assert_eq!(
        (&undone["reverted"], &undone["already_reverted"]),
        (&1.into(), &0.into()),
        "{undone}"
    );
    assert_eq!(db.user_snapshot(), before);
}
