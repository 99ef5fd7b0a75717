//! `export` round trips: export → import into an empty database reproduces the data, and
//! export → import into the same database changes nothing.

use crate::support::*;

#[test]
fn export_then_import_round_trips() {
    let source = TestDb::new();
    let dir = scratch("roundtrip");
    import(&source, &dir, "users", &fixture("users.csv"), &["--rejects", "u.csv"]);
    import(
        &source,
        &dir,
        "tickets",
        &fixture("tickets.csv"),
        &["--rejects", "t.csv"],
    );
    import(
        &source,
        &dir,
        "comments",
        &fixture("comments.csv"),
        &["--rejects", "c.csv"],
    );
    source.execute("UPDATE tickets SET deleted_at = now() WHERE external_id = 'T-000002'");

    for what in ["users", "tickets", "comments"] {
        let out = dir.join(format!("{what}.csv"));
        ticketops(
            Some(&source),
            &dir,
            &["export", what, "-o", out.to_str().unwrap(), "--include-deleted"],
        )
        .run()
        .expect_code(0);
    }
    // Into an empty database: the same data.
    let target = TestDb::new();
    for what in ["users", "tickets", "comments"] {
        let (run, s) = import(&target, &dir, what, &dir.join(format!("{what}.csv")), &[]);
        run.expect_code(0);
        assert_eq!(s["rejected"], 0, "{}", run.explain());
    }
    source.execute("UPDATE tickets SET deleted_at = NULL");
    assert_same_rows(&target.ticket_snapshot(), &source.ticket_snapshot(), "round trip");
    let comments = "SELECT c.external_id, t.external_id, u.email, c.body, c.public, c.created_at FROM comments c
                    JOIN tickets t ON t.id = c.ticket_id JOIN users u ON u.id = c.author_id ORDER BY 1";
    assert_eq!(source.strings(comments), target.strings(comments));
    let users = "SELECT u.email, u.name, u.role, o.name FROM users u LEFT JOIN organizations o ON o.id = u.organization_id ORDER BY 1";
    assert_eq!(source.strings(users), target.strings(users));

    // Into the same database: every row unchanged.
    for what in ["users", "tickets", "comments"] {
        let (run, s) = import(&source, &dir, what, &dir.join(format!("{what}.csv")), &[]);
        run.expect_code(0);
        assert_eq!(s["inserted"], 0, "{what}{}", run.explain());
        assert_eq!(s["updated"], 0, "{what}{}", run.explain());
        assert_eq!(s["unchanged"], s["rows_read"], "{what}{}", run.explain());
    }
}

#[test]
fn export_leaves_out_soft_deleted_rows_unless_asked() {
    let db = TestDb::new();
    let dir = scratch("export-deleted");
    import(&db, &dir, "tickets", &fixture("bad/duplicate_key.csv"), &[]);
    db.execute("UPDATE tickets SET deleted_at = now() WHERE external_id = 'D-2'");
    let run = ticketops(Some(&db), &dir, &["export", "tickets"]).run();
    run.expect_code(0);
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.explain());
    assert!(
        run.stdout
            .starts_with("external_id,subject,description,status,priority,channel,requester_email")
    );
    let all = ticketops(Some(&db), &dir, &["export", "tickets", "--include-deleted"]).run();
    assert_eq!(all.expect_code(0).stdout.lines().count(), 3);
}
