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

/// The first column of a CSV (external ids), header left out.
fn first_column(csv_text: &str) -> Vec<String> {
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let mut ids: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_string()).collect();
    ids.sort();
    ids
}

#[test]
fn export_selects_with_the_same_filters_as_tickets_list() {
    let (db, dir) = dataset();
    let comments = dir.join("comments.csv");
    std::fs::write(
        &comments,
        "external_id,ticket_external_id,author_email,body,created_at\n\
         K-1,C-1,ann@example.com,first,2023-01-11\nK-3,C-3,ann@example.com,third,2024-03-02\n\
         K-4,C-4,cid@example.com,fourth,2024-03-03\n",
    )
    .unwrap();
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    db.execute("UPDATE tickets SET deleted_at = now() WHERE external_id = 'C-6'");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--status", "closed"], &["C-1", "C-2"]),
        (&["--status", "closed", "--include-deleted"], &["C-1", "C-2", "C-6"]),
        (&["--only-deleted"], &["C-6"]),
        (&["--tag", "vip"], &["C-1", "C-3"]),
        (&["--organization", "Acme", "--priority", "urgent"], &["C-4"]),
        (&["--assignee", "none"], &["C-2", "C-5"]),
        (
            &["--created-after", "2024-01-01", "--created-before", "2025-01-01"],
            &["C-3", "C-4"],
        ),
        (&["--requester", "nobody@example.com"], &[]),
    ];
    for (filters, expected) in cases {
        let mut args = vec!["export", "tickets"];
        args.extend_from_slice(filters);
        let run = ticketops(Some(&db), &dir, &args).run();
        run.expect_code(0);
        assert!(run.stdout.starts_with("external_id,subject,"), "{}", run.explain());
        assert_eq!(first_column(&run.stdout), set(expected), "export {filters:?}");
        let mut list = vec!["tickets", "list", "--format", "csv"];
        list.extend_from_slice(filters);
        let listed = ticketops(Some(&db), &dir, &list).run();
        assert_eq!(
            first_column(&listed.expect_code(0).stdout),
            set(expected),
            "tickets list {filters:?}"
        );
    }
    // Comments: those of the selected tickets.
    let run = ticketops(Some(&db), &dir, &["export", "comments", "--tag", "vip"]).run();
    assert_eq!(first_column(&run.expect_code(0).stdout), set(&["K-1", "K-3"]));
    // Users are not selected by ticket filters: a usage error, not everything.
    ticketops(Some(&db), &dir, &["export", "users", "--status", "open"])
        .run()
        .expect_code(2)
        .stderr_has("export users takes no ticket filters");
}
