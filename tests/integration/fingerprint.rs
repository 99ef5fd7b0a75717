//! A re-import skips the records whose fingerprint is stored with their ticket (issue 18: a
//! re-import at read speed) — and only those: whatever changed what a fingerprint vouches for
//! since the import wrote it, the record is compared in full, with the same results as without
//! fingerprints. On the distributed layout no record is skipped (no triggers forget a
//! fingerprint there); the results are the same.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

const HEADER: &str =
    "external_id,subject,requester_email,requester_name,assignee_email,organization,tags,status,created_at";

/// Ticket `i`: each with a requester, an assignee, an organization and a tag of its own, so
/// that a change to one of them concerns that ticket alone.
fn row(i: usize) -> String {
    format!(
        "T-{i:02},Subject {i},u{i:02}@example.com,User {i},agent{i:02}@example.com,Org{i:02},tag{i:02};common,open,2024-0{}-15 10:00:00",
        1 + i % 9
    )
}

fn write(dir: &Path, name: &str, rows: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{HEADER}\n{}\n", rows.join("\n"))).unwrap();
    path
}

/// How many records the summary says were skipped by their fingerprint, and how many the
/// layout should have skipped of `expected` (none on Citus).
fn by_fingerprint(summary: &Value, expected: u64) -> (u64, u64) {
    let skipped = summary["unchanged_by_fingerprint"].as_u64().unwrap();
    (skipped, if distributed() { 0 } else { expected })
}

#[test]
fn a_reimport_skips_unchanged_records_by_fingerprint_but_not_an_earlier_duplicate() {
    let db = TestDb::new();
    let dir = scratch("fingerprint-skip");
    let mut rows: Vec<String> = (0..40).map(row).collect();
    // T-03 twice: its first occurrence is a duplicate in every import, fingerprint or not.
    rows.insert(3, row(3).replace("Subject 3", "Subject 3 (the earlier one)"));
    let file = write(&dir, "tickets.csv", &rows);
    let batches = ["--batch-size", "7"];
    let (run, first) = import(&db, &dir, "tickets", &file, &batches);
    assert_eq!(outcome(&first), [40, 0, 0, 1, 0, 0], "{}", run.explain());
    let versions = db.row_versions("tickets");
    let imported = db.ticket_snapshot();

    let (run, again) = import(&db, &dir, "tickets", &file, &batches);
    assert_eq!(outcome(&again), [0, 0, 40, 1, 0, 0], "{}", run.explain());
    // T-03 repeats in the file: compared in full, as every key that does.
    let (skipped, expected) = by_fingerprint(&again, 39);
    assert_eq!(skipped, expected, "{again}");
    assert_eq!(db.row_versions("tickets"), versions, "a re-import rewrote rows");
    assert_eq!(db.ticket_snapshot(), imported);
}

/// The lookups guess that a batch's tickets are the id range after the previous batch's and
/// read ahead for several batches: a file in another order (every guess wrong), with some
/// records changed, still skips exactly the unchanged ones.
#[test]
fn a_reimport_in_another_order_skips_exactly_the_unchanged_records() {
    let db = TestDb::new();
    let dir = scratch("fingerprint-order");
    let rows: Vec<String> = (0..40).map(row).collect();
    let batches = ["--batch-size", "7"];
    let (run, first) = import(&db, &dir, "tickets", &write(&dir, "tickets.csv", &rows), &batches);
    assert_eq!(outcome(&first), [40, 0, 0, 0, 0, 0], "{}", run.explain());
    // Reversed, and every third record with another subject (14 of 40).
    let mut reordered: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 3 == 0 {
                r.replace("Subject", "Changed subject")
            } else {
                r.clone()
            }
        })
        .collect();
    reordered.reverse();
    let (run, again) = import(
        &db,
        &dir,
        "tickets",
        &write(&dir, "reordered.csv", &reordered),
        &batches,
    );
    assert_eq!(outcome(&again), [0, 14, 26, 0, 0, 0], "{}", run.explain());
    let (skipped, expected) = by_fingerprint(&again, 26);
    assert_eq!(skipped, expected, "{again}");
    let changed = db.scalar("SELECT count(*) FROM tickets WHERE subject LIKE 'Changed subject %'");
    assert_eq!(changed, 14);
    // And the same file again: now all 40 as stored.
    let (run, third) = import(
        &db,
        &dir,
        "tickets",
        &write(&dir, "reordered.csv", &reordered),
        &batches,
    );
    assert_eq!(outcome(&third), [0, 0, 40, 0, 0, 0], "{}", run.explain());
    let (skipped, expected) = by_fingerprint(&third, 40);
    assert_eq!(skipped, expected, "{third}");
}

#[test]
fn whatever_changes_what_a_fingerprint_vouches_for_makes_the_record_compared_in_full() {
    let db = TestDb::new();
    let dir = scratch("fingerprint-forget");
    let rows: Vec<String> = (0..30).map(row).collect();
    let file = write(&dir, "tickets.csv", &rows);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let imported = db.ticket_snapshot();
    let users = "SELECT email, name, role::text, organization_id IS NOT NULL FROM users ORDER BY email";
    let imported_users = db.strings(users);

    let id = |key: &str| format!("(SELECT id FROM tickets WHERE external_id = '{key}')");
    // Changes a re-import undoes, each to one ticket: the ticket itself, its tag links (one
    // removed, one added, one changed), its requester's e-mail, its organization's and its
    // tag's names.
    db.execute("UPDATE tickets SET subject = 'changed by hand' WHERE external_id = 'T-01'");
    db.execute(&format!(
        "DELETE FROM ticket_tags WHERE ticket_id = {} AND tag_id = (SELECT id FROM tags WHERE name = 'tag02')",
        id("T-02")
    ));
    db.execute("INSERT INTO tags (name) VALUES ('extra')");
    db.execute(&insert_links_sql(
        &id("T-03"),
        "SELECT id FROM tags WHERE name = 'extra'",
    ));
    // A link changed in place (another application's UPDATE: the trigger on updated links).
    db.execute(&format!(
        "UPDATE ticket_tags SET tag_id = (SELECT id FROM tags WHERE name = 'extra')
         WHERE ticket_id = {} AND tag_id = (SELECT id FROM tags WHERE name = 'tag09')",
        id("T-09")
    ));
    db.execute("UPDATE users SET email = 'moved@example.com' WHERE email = 'u04@example.com'");
    db.execute("UPDATE organizations SET name = 'Renamed' WHERE name = 'Org05'");
    db.execute("UPDATE tags SET name = 'renamed' WHERE name = 'tag06'");
    // Changes to the users a re-import fills in again, leaving the tickets as they are: a
    // requester's name taken away, an assignee no longer an agent.
    db.execute("UPDATE users SET name = NULL WHERE email = 'u07@example.com'");
    db.execute("UPDATE users SET role = 'customer' WHERE email = 'agent08@example.com'");

    let (run, again) = import(&db, &dir, "tickets", &file, &[]);
    assert_eq!(outcome(&again), [0, 7, 23, 0, 0, 0], "{}", run.explain());
    let (skipped, expected) = by_fingerprint(&again, 21);
    assert_eq!(skipped, expected, "{again}");
    assert_eq!(
        db.ticket_snapshot(),
        imported,
        "the re-import gave the tickets back as the file has them"
    );
    let restored_users: Vec<String> = db
        .strings(users)
        .into_iter()
        .filter(|u| !u.contains("moved@"))
        .collect();
    assert_eq!(restored_users, imported_users, "the name and the role filled in again");

    // The tickets the re-import wrote carry fingerprints again.
    let (run, third) = import(&db, &dir, "tickets", &file, &[]);
    assert_eq!(outcome(&third), [0, 0, 30, 0, 0, 0], "{}", run.explain());
    let (skipped, expected) = by_fingerprint(&third, 28);
    assert_eq!(
        skipped, expected,
        "T-07 and T-08 were unchanged, and keep no fingerprint: {third}"
    );
}

#[test]
fn a_fingerprint_holds_only_for_the_same_column_mapping_and_options() {
    let db = TestDb::new();
    let dir = scratch("fingerprint-options");
    let rows: Vec<String> = (0..12).map(row).collect();
    let file = write(&dir, "tickets.csv", &rows);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // The same records read with a value map: every ticket changes, none may be skipped.
    let (run, mapped) = import(&db, &dir, "tickets", &file, &["--value-map", "status:open=pending"]);
    assert_eq!(outcome(&mapped), [0, 12, 0, 0, 0, 0], "{}", run.explain());
    assert_eq!(mapped["unchanged_by_fingerprint"], 0);
    // And back: the fingerprints written with the value map do not hold without it.
    let (run, plain) = import(&db, &dir, "tickets", &file, &[]);
    assert_eq!(outcome(&plain), [0, 12, 0, 0, 0, 0], "{}", run.explain());
}

#[test]
fn a_soft_delete_and_its_restore_forget_the_fingerprints_of_their_tickets_alone() {
    let db = TestDb::new();
    let dir = scratch("fingerprint-soft-delete");
    let rows: Vec<String> = (0..30).map(row).collect();
    let file = write(&dir, "tickets.csv", &rows);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let with_fingerprint = "SELECT count(*) FROM tickets WHERE import_fingerprint IS NOT NULL";
    let expected = if distributed() { 0 } else { 30 };
    assert_eq!(db.scalar(with_fingerprint), expected);
    std::fs::write(dir.join("ids.csv"), "external_id\nT-01\nT-02\nT-03\nT-04\nT-05\n").unwrap();
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--ids-file",
            "ids.csv",
            "--batch-size",
            "2",
        ],
    )
    .run();
    let op = run.expect_code(0).json()["operation_id"].to_string();
    assert_eq!(db.scalar(with_fingerprint), expected.min(25));
    ticketops(Some(&db), &dir, &["restore", "--operation", &op])
        .run()
        .expect_code(0);
    let (run, again) = import(&db, &dir, "tickets", &file, &[]);
    assert_eq!(outcome(&again), [0, 0, 30, 0, 0, 0], "{}", run.explain());
    let (skipped, expected) = by_fingerprint(&again, 25);
    assert_eq!(
        skipped, expected,
        "the five soft-deleted and restored compared in full: {again}"
    );
}
