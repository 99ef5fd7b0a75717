//! `import tickets|users|comments` against a real database: every fixture, accounting,
//! idempotence, transactions, crash and resume, mapping, stdin.

use std::time::{Duration, Instant};

use crate::support::*;

fn bad(name: &str) -> std::path::PathBuf {
    fixture(&format!("bad/{name}"))
}

fn external_ids(db: &TestDb) -> Vec<String> {
    db.strings("SELECT external_id FROM tickets ORDER BY external_id")
}

/// Imports a file and checks exactly which rows went in and which were rejected (by
/// external_id or first field, line and a piece of the reason).
fn check_fixture(name: &str, extra: &[&str], accepted: &[&str], rejected: &[(&str, u64, &str)]) -> TestDb {
    let db = TestDb::new();
    let dir = scratch(name);
    let rejects = dir.join("rejects.csv");
    let mut args = vec!["--rejects", rejects.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (run, summary) = import(&db, &dir, "tickets", &bad(name), &args);
    run.expect_code(if rejected.is_empty() { 0 } else { 3 });
    assert_eq!(
        summary["rejected"].as_u64().unwrap(),
        rejected.len() as u64,
        "{}",
        run.explain()
    );
    let mut expected: Vec<String> = accepted.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(external_ids(&db), expected, "{}", run.explain());
    if rejected.is_empty() {
        assert!(!rejects.exists(), "no rejects file expected{}", run.explain());
    } else {
        let got = read_rejects(&rejects);
        assert_eq!(got.len(), rejected.len(), "{got:?}");
        for ((id, line, reason), (gid, gline, gerror)) in rejected.iter().zip(&got) {
            assert_eq!((id.to_string(), *line), (gid.clone(), *gline), "{got:?}");
            assert!(
                gerror.contains(reason),
                "reject of {id} should mention {reason:?}, says {gerror:?}"
            );
        }
        // The summary groups them by reason with line numbers.
        assert!(run.stderr.contains("rejected"), "{}", run.explain());
    }
    db
}

#[test]
fn bad_timestamp() {
    check_fixture(
        "bad_timestamp.csv",
        &[],
        &["B-1", "B-3"],
        &[("B-2", 3, "column created_at: not a timestamp")],
    );
}

/// E-mail's dates (RFC 2822) name their offset and go in as the instant they name; without an
/// offset, or day and month in an unknown order, a value is rejected with its line.
#[test]
fn email_dates_go_in_and_ambiguous_ones_are_rejected() {
    let db = TestDb::new();
    let dir = scratch("rfc2822");
    let file = dir.join("mail.csv");
    std::fs::write(
        &file,
        "external_id,subject,status,requester_email,created_at\n\
         M-1,From mail,open,ann@example.com,\"Tue, 14 May 2019 09:38:20 +0200\"\n\
         M-2,No offset,open,ann@example.com,\"Tue, 14 May 2019 09:38:20\"\n\
         M-3,Which order,open,ann@example.com,01/03/2024\n",
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(3);
    assert_accounted(&summary, &run);
    assert_eq!(
        (summary["inserted"].as_u64(), summary["rejected"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        db.strings("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM tickets"),
        ["2019-05-14 07:38:20"]
    );
    let rejects = std::fs::read_to_string(dir.join("mail.rejects.csv")).unwrap();
    assert!(rejects.contains("M-2") && rejects.contains("M-3"), "{rejects}");
    assert!(rejects.contains("not a timestamp"), "{rejects}");
}

#[test]
fn unknown_status_and_aliases() {
    let db = check_fixture(
        "unknown_status.csv",
        &[],
        &["U-1", "U-3"],
        &[("U-2", 3, "unknown status \"escalated\"")],
    );
    let u3 = db.json("SELECT status::text, priority::text FROM tickets WHERE external_id = 'U-3'");
    assert_eq!(u3[0]["status"], "on_hold");
    assert_eq!(u3[0]["priority"], "urgent");
}

#[test]
fn missing_required_values() {
    check_fixture(
        "missing_required.csv",
        &[],
        &["M-1"],
        &[
            ("M-2", 3, "column subject: subject is empty"),
            ("", 4, "column external_id: external_id is empty"),
            ("M-4", 5, "column requester_email"),
        ],
    );
}

#[test]
fn missing_required_column_is_an_error_before_anything_is_written() {
    let db = TestDb::new();
    let dir = scratch("missing_column");
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", bad("missing_column.csv").to_str().unwrap()],
    )
    .run();
    run.expect_code(1).stderr_has("requester_email");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM bulk_operations"), 0);
}

#[test]
fn bad_emails() {
    let db = check_fixture(
        "bad_email.csv",
        &[],
        &["E-1"],
        &[
            ("E-2", 3, "column requester_email: not an e-mail address"),
            ("E-3", 4, "column assignee_email"),
        ],
    );
    assert_eq!(db.strings("SELECT email FROM users"), vec!["good@example.com"]);
}

#[test]
fn wrong_number_of_fields() {
    check_fixture(
        "wrong_field_count.csv",
        &[],
        &["F-1", "F-4"],
        &[("F-2", 3, "expected 14 fields"), ("F-3", 4, "found 15")],
    );
}

#[test]
fn invalid_utf8_is_rejected_and_kept_verbatim() {
    let db = check_fixture("invalid_utf8.csv", &[], &["V-1", "V-3"], &[("V-2", 3, "invalid UTF-8")]);
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'V-3'"),
        vec!["Café ok"]
    );
    // The rejects file holds the original bytes, so the row can be fixed and re-imported.
    let dir = scratch("utf8-rejects");
    let rejects = dir.join("r.csv");
    let db2 = TestDb::new();
    import(
        &db2,
        &dir,
        "tickets",
        &bad("invalid_utf8.csv"),
        &["--rejects", rejects.to_str().unwrap()],
    );
    let bytes = std::fs::read(&rejects).unwrap();
    assert!(bytes.windows(2).any(|w| w == b"\xff\xfe"), "raw bytes not kept");
}

/// A NUL byte is valid UTF-8 but no PostgreSQL text can hold it: it rejects its row, in a
/// normal import and in an initial load (where a failing COPY would lose the whole load).
#[test]
fn a_nul_byte_rejects_its_row_not_the_import() {
    let rejected = [("Z-2", 3, "NUL byte"), ("Z-4", 5, "NUL byte")];
    check_fixture("nul_byte.csv", &[], &["Z-1", "Z-3"], &rejected);
    check_fixture("nul_byte.csv", &["--initial-load"], &["Z-1", "Z-3"], &rejected);
}

/// A key longer than a B-tree index entry can hold (about 2,700 bytes) used to fail its whole
/// batch inside PostgreSQL; values over 1,000 bytes in indexed fields are rejected instead.
#[test]
fn an_overlong_key_rejects_its_row_not_the_import() {
    let long_key = format!("W{}", "3".repeat(1000));
    let rejected = [
        ("W-2", 3, "requester_email is 1013 bytes long"),
        (long_key.as_str(), 4, "external_id is 1001 bytes long"),
        ("W-4", 5, "organization is 1003 bytes long"),
        ("W-5", 6, "assignee_email is 1013 bytes long"),
    ];
    let db = check_fixture("too_long.csv", &[], &["W-1", "W-6"], &rejected);
    assert_eq!(
        db.scalar("SELECT length(o.name) FROM tickets t JOIN organizations o ON o.id = t.organization_id"),
        1000
    );
    check_fixture("too_long.csv", &["--initial-load"], &["W-1", "W-6"], &rejected);
}

#[test]
fn duplicate_keys_last_occurrence_wins() {
    let dir = scratch("dup");
    let db = TestDb::new();
    let (run, summary) = import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [2, 0, 0, 1, 0, 0]);
    let d1 = db.json(
        "SELECT subject, status::text, (SELECT string_agg(g.name, ';') FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
          WHERE tt.ticket_id = t.id) AS tags FROM tickets t WHERE external_id = 'D-1'",
    );
    assert_eq!(d1[0]["subject"], "Second version wins");
    assert_eq!(d1[0]["status"], "pending");
    assert_eq!(d1[0]["tags"], "vip");
}

#[test]
fn duplicates_across_batches_count_once() {
    let dir = scratch("dup-batches");
    let db = TestDb::new();
    let (run, summary) = import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &["--batch-size", "1"]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [2, 0, 0, 1, 0, 0], "{}", run.explain());
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'D-1'"),
        vec!["Second version wins"]
    );
}

#[test]
fn quoted_fields_with_newlines_and_quotes() {
    let db = check_fixture("quoted_multiline.csv", &[], &["Q-1", "Q-2"], &[]);
    let q1 = db.json(
        "SELECT t.subject, t.description, u.name, o.name AS org FROM tickets t JOIN users u ON u.id = t.requester_id
         JOIN organizations o ON o.id = t.organization_id WHERE external_id = 'Q-1'",
    );
    assert_eq!(q1[0]["subject"], "Subject, with comma");
    assert_eq!(q1[0]["description"], "Line one\nline two with \"quotes\", and a comma");
    assert_eq!(q1[0]["name"], "O'Brien, Pat");
    assert_eq!(q1[0]["org"], "Acme, Inc.");
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'Q-2'"),
        vec!["\"Quoted\" subject"]
    );
}

#[test]
fn utf8_bom_and_quoted_header() {
    check_fixture("bom.csv", &[], &["BOM-1"], &[]);
}

#[test]
fn crlf_line_ends() {
    let db = check_fixture("crlf.csv", &[], &["CR-1", "CR-2"], &[]);
    assert_eq!(
        db.strings("SELECT description FROM tickets WHERE external_id = 'CR-1'"),
        vec!["two\r\nlines"]
    );
}

#[test]
fn rejected_rows_of_a_windows_file_name_their_own_lines() {
    let dir = scratch("crlf-lines");
    let db = TestDb::new();
    // Line ends CRLF, a quoted field over two lines, an empty line: each bad row's line is
    // the one it starts on, as an editor numbers them.
    let file = dir.join("windows.csv");
    std::fs::write(
        &file,
        "external_id,subject,description,status,requester_email\r\n\
         W-1,bad status,,bogus,a@example.com\r\n\
         W-2,ok,\"two\r\nlines\",open,a@example.com\r\n\
         W-3,bad e-mail,,open,not-an-email\r\n\
         \r\n\
         W-4,bad status again,,bogus,a@example.com\r\n",
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &file, &["--rejects", "rejects.csv"]);
    run.expect_code(3);
    let lines: Vec<(String, u64)> = read_rejects(&dir.join("rejects.csv"))
        .into_iter()
        .map(|(key, line, _)| (key, line))
        .collect();
    assert_eq!(
        lines,
        vec![("W-1".to_string(), 2), ("W-3".to_string(), 5), ("W-4".to_string(), 7)],
        "{summary}"
    );
    assert_eq!(
        summary["errors"]["invalid status"]["first_lines"],
        serde_json::json!([2, 7])
    );
}

#[test]
fn header_only_and_empty_files() {
    for name in ["header_only.csv", "empty.csv"] {
        let db = TestDb::new();
        let dir = scratch(name);
        let (run, summary) = import(&db, &dir, "tickets", &bad(name), &[]);
        run.expect_code(0);
        assert_eq!(summary["rows_read"], 0, "{}", run.explain());
        assert_eq!(summary["status"], "succeeded");
        assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    }
}

/// What reads `bad/other_helpdesk.csv` (as `fixtures/maps/other_helpdesk.toml` does).
const OTHER_HELPDESK_FLAGS: [&str; 30] = [
    "--map",
    "Ticket ID=external_id",
    "--map",
    "Title=subject",
    "--map",
    "Body=description",
    "--map",
    "State=status",
    "--map",
    "Urgency=priority",
    "--map",
    "Source=channel",
    "--map",
    "Customer Email=requester_email",
    "--map",
    "Customer=requester_name",
    "--map",
    "Agent=assignee_email",
    "--map",
    "Company=organization",
    "--map",
    "Labels=tags",
    "--map",
    "Opened=created_at",
    "--map",
    "Last Update=updated_at",
    "--map",
    "Resolved=solved_at",
    "--value-map",
    "status:Pending Customer Response=pending",
];

#[test]
fn mapping_and_value_mapping_of_another_export() {
    let db = TestDb::new();
    let dir = scratch("mapping");
    let mut maps = OTHER_HELPDESK_FLAGS.to_vec();
    maps.extend_from_slice(&["--tag-separator", "|", "--timezone", "Europe/Berlin"]);
    let (run, summary) = import(&db, &dir, "tickets", &bad("other_helpdesk.csv"), &maps);
    run.expect_code(0)
        .stderr_has("ignoring unknown column(s): Satisfaction");
    assert_eq!(outcome(&summary), [2, 0, 0, 0, 0, 0]);
    let rows = db.json(
        "SELECT external_id, status::text, priority::text, channel::text, to_char(created_at AT TIME ZONE 'UTC', 'HH24:MI') AS created,
                (SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
                  WHERE tt.ticket_id = t.id) AS tags
         FROM tickets t ORDER BY external_id",
    );
    assert_eq!(rows[0]["status"], "pending");
    assert_eq!(rows[0]["priority"], "normal");
    assert_eq!(rows[0]["channel"], "email");
    assert_eq!(rows[0]["tags"], "hardware;printer");
    assert_eq!(rows[0]["created"], "07:00", "09:00 in Berlin (CEST) is 07:00 UTC");
    assert_eq!(rows[1]["status"], "solved");
    assert_eq!(rows[1]["priority"], "urgent");
    assert_eq!(rows[1]["channel"], "web");
}

#[test]
fn latin1_is_transcoded() {
    let db = check_fixture("latin1.csv", &["--encoding", "latin1"], &["L-1"], &[]);
    let row = db.json("SELECT subject, description, u.name FROM tickets t JOIN users u ON u.id = t.requester_id");
    assert_eq!(row[0]["subject"], "Café crème");
    assert_eq!(row[0]["description"], "Grüße");
    assert_eq!(row[0]["name"], "René");
}

#[test]
fn sample_dump_then_reimport_changes_nothing() {
    let db = TestDb::new();
    let dir = scratch("sample");
    let rejects = dir.join("r.csv");
    let (run, first) = import(
        &db,
        &dir,
        "tickets",
        &fixture("tickets.csv"),
        &["--rejects", rejects.to_str().unwrap()],
    );
    run.expect_code(3);
    let inserted = first["inserted"].as_i64().unwrap();
    assert!(inserted > 150, "{first}");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), inserted);
    assert_eq!(read_rejects(&rejects).len() as u64, first["rejected"].as_u64().unwrap());
    assert!(
        first["rejected"].as_u64().unwrap() >= 3,
        "the sample has broken rows on purpose: {first}"
    );
    // The operation row holds the same counts and the file's identity.
    let op = db.json(&format!(
        "SELECT status::text, counts, source_sha256 FROM bulk_operations WHERE id = {}",
        first["operation_id"]
    ));
    assert_eq!(op[0]["status"], "succeeded");
    assert_eq!(op[0]["counts"]["inserted"], first["inserted"]);
    assert_eq!(op[0]["source_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE last_operation_id IS DISTINCT FROM 1"),
        0
    );

    let tables = ["tickets", "ticket_tags", "users", "organizations", "tags"];
    let before: Vec<_> = tables.iter().map(|t| db.row_versions(t)).collect();
    let (run, second) = import(
        &db,
        &dir,
        "tickets",
        &fixture("tickets.csv"),
        &["--rejects", rejects.to_str().unwrap()],
    );
    run.expect_code(3);
    assert_eq!(second["inserted"], 0);
    assert_eq!(second["updated"], 0);
    assert_eq!(second["unchanged"], first["inserted"]);
    assert_eq!(second["duplicate"], first["duplicate"]);
    assert_eq!(second["rejected"], first["rejected"]);
    let after: Vec<_> = tables.iter().map(|t| db.row_versions(t)).collect();
    for ((table, b), a) in tables.iter().zip(&before).zip(&after) {
        assert_eq!(b, a, "re-import rewrote rows of {table}");
    }
    // And the statistics collector agrees (it is flushed when the importing backend exits).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut updated = -1;
    while Instant::now() < deadline {
        updated = db.scalar("SELECT n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = 'tickets'");
        if updated == 0 && db.scalar("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'tickets'") == inserted
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(updated, 0, "pg_stat_user_tables shows updated or deleted tickets");
}

#[test]
fn changed_rows_are_updated_with_before_images() {
    let db = TestDb::new();
    let dir = scratch("update");
    import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[])
        .0
        .expect_code(0);
    let changed = dir.join("changed.csv");
    let text = std::fs::read_to_string(bad("duplicate_key.csv")).unwrap();
    std::fs::write(
        &changed,
        text.replace("Second version wins", "Third version")
            .replace(",vip,", ",vip;billing,"),
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &changed, &[]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 1, 1, 1, 0, 0], "{}", run.explain());
    let audit = db.json(&format!(
        "SELECT before->>'subject' AS before, after->>'subject' AS after, before->'tag_ids' AS before_tags,
                after->'tag_ids' AS after_tags FROM audit_log WHERE operation_id = {} AND action = 'update'",
        summary["operation_id"]
    ));
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["before"], "Second version wins");
    assert_eq!(audit[0]["after"], "Third version");
    assert_eq!(audit[0]["before_tags"].as_array().unwrap().len(), 1);
    assert_eq!(audit[0]["after_tags"].as_array().unwrap().len(), 2);
    assert_eq!(
        db.strings("SELECT g.name FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id JOIN tickets t ON t.id = tt.ticket_id WHERE t.external_id = 'D-1' ORDER BY 1"),
        vec!["billing", "vip"]
    );
    // Removing the tags column leaves stored tags alone; an empty tags value clears them.
    let cleared = dir.join("cleared.csv");
    std::fs::write(&cleared, text.replace(",vip,", ",,")).unwrap();
    let (_, summary) = import(&db, &dir, "tickets", &cleared, &[]);
    assert_eq!(summary["updated"], 1);
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM ticket_tags tt JOIN tickets t ON t.id = tt.ticket_id WHERE t.external_id = 'D-1'"
        ),
        0
    );
}

#[test]
fn stdin_input_needs_a_rejects_path() {
    let db = TestDb::new();
    let dir = scratch("stdin");
    let data = std::fs::read(fixture("tickets.csv")).unwrap();
    let run = ticketops(Some(&db), &dir, &["import", "tickets", "-"])
        .stdin(data.clone())
        .run();
    run.expect_code(2).stderr_has("--rejects");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", "-", "--rejects", "r.csv"],
    )
    .stdin(data)
    .run();
    run.expect_code(3);
    let summary = run.json();
    assert_accounted(&summary, &run);
    assert_eq!(summary["file"], "-");
    assert!(dir.join("r.csv").exists());
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets"),
        summary["inserted"].as_i64().unwrap()
    );
}

#[test]
fn dry_run_writes_nothing() {
    let db = TestDb::new();
    let dir = scratch("dry");
    import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[])
        .0
        .expect_code(0);
    let tables = [
        "tickets",
        "users",
        "ticket_tags",
        "tags",
        "bulk_operations",
        "audit_log",
        "organizations",
    ];
    let before: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &fixture("tickets.csv"),
        &["--dry-run", "--rejects", "r.csv"],
    );
    run.expect_code(3);
    assert_eq!(summary["dry_run"], true);
    assert!(
        summary["inserted"].as_u64().unwrap() > 150,
        "the dry run reports what would happen: {summary}"
    );
    let after: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    assert_eq!(before, after, "a dry run changed the database");
}

#[test]
fn max_rejects_stops_the_import() {
    let db = TestDb::new();
    let dir = scratch("maxrej");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            fixture("tickets.csv").to_str().unwrap(),
            "--max-rejects",
            "0",
            "--rejects",
            "r.csv",
        ],
    )
    .run();
    run.expect_code(1).stderr_has("too many rejected rows");
    assert_eq!(run.json()["status"], "failed");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            fixture("tickets.csv").to_str().unwrap(),
            "--max-rejects",
            "50%",
            "--rejects",
            "r.csv",
        ],
    )
    .run();
    run.expect_code(3);
}

#[test]
fn soft_deleted_tickets_are_skipped_unless_undelete() {
    let db = TestDb::new();
    let dir = scratch("undelete");
    import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[])
        .0
        .expect_code(0);
    db.execute("UPDATE tickets SET deleted_at = now(), subject = 'changed' WHERE external_id = 'D-2'");
    let (_, summary) = import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[]);
    assert_eq!(outcome(&summary), [0, 0, 1, 1, 1, 0]);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        1
    );
    let (_, summary) = import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &["--undelete"]);
    assert_eq!(outcome(&summary), [0, 1, 1, 1, 0, 0]);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        0
    );
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'D-2'"),
        vec!["Other"]
    );
}

#[test]
fn atomic_import_rolls_everything_back_on_failure() {
    let db = TestDb::new();
    let dir = scratch("atomic");
    inject_failure(&db, "INSERT", "T-000150");
    let file = fixture("tickets.csv");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            file.to_str().unwrap(),
            "--atomic",
            "--batch-size",
            "20",
            "--rejects",
            "r.csv",
        ],
    )
    .run();
    run.expect_code(1)
        .stderr_has("injected failure")
        .stderr_has("nothing was committed");
    assert_eq!(run.json()["status"], "rolled_back");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM users"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM audit_log"), 0);
    assert_eq!(
        db.strings("SELECT status::text FROM bulk_operations"),
        vec!["rolled_back"]
    );
}

#[test]
fn batched_import_keeps_committed_batches_and_resumes_after_a_failure() {
    let reference = TestDb::new();
    let dir = scratch("failresume");
    let file = fixture("tickets.csv");
    import(&reference, &dir, "tickets", &file, &["--rejects", "ref.csv"])
        .0
        .expect_code(3);

    let db = TestDb::new();
    inject_failure(&db, "INSERT", "T-000150");
    let args = ["--batch-size", "20", "--rejects", "r.csv"];
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            file.to_str().unwrap(),
            args[0],
            args[1],
            args[2],
            args[3],
        ],
    )
    .run();
    run.expect_code(1).stderr_has("injected failure");
    let committed = db.scalar("SELECT count(*) FROM tickets");
    assert!(
        committed > 0 && committed < 190,
        "earlier batches stay committed: {committed}"
    );
    assert_eq!(db.strings("SELECT status::text FROM bulk_operations"), vec!["failed"]);

    db.execute("DROP TRIGGER boom ON tickets");
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &["--resume", "--batch-size", "20", "--rejects", "r.csv"],
    );
    run.expect_code(3).stderr_has("resuming operation");
    assert_eq!(summary["operation_id"], 1, "the same operation continues");
    assert_same_rows(&db.ticket_snapshot(), &reference.ticket_snapshot(), "after resume");
    let ref_rejects = read_rejects(&dir.join("ref.csv"));
    assert_eq!(
        read_rejects(&dir.join("r.csv")),
        ref_rejects,
        "the rejects file has each bad row once"
    );
}

/// Batches that change nothing may commit without saving the checkpoint (a two-phase commit
/// over every node on Citus): a resume reads them again and counts each row once.
#[test]
fn a_resumed_reimport_counts_every_row_once_whatever_its_batches_saved() {
    let db = TestDb::new();
    let dir = scratch("reimport-resume");
    let file = generate(&dir, "clean.csv", &["tickets", "--rows", "200", "--seed", "5"]);
    let args = ["--batch-size", "20", "--rejects", "r.csv"];
    import(&db, &dir, "tickets", &file, &args).0.expect_code(0);
    // One ticket changed since, in the eighth batch; the re-import fails where it restores it.
    let key = db
        .strings("SELECT external_id FROM tickets ORDER BY id OFFSET 149 LIMIT 1")
        .remove(0);
    db.execute(&format!(
        "UPDATE tickets SET subject = 'edited' WHERE external_id = '{key}'"
    ));
    inject_failure(&db, "UPDATE", &key);
    let (run, _) = import(&db, &dir, "tickets", &file, &args);
    run.expect_code(1).stderr_has("injected failure");
    db.execute("DROP TRIGGER boom ON tickets");

    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &["--resume", args[0], args[1], args[2], args[3]],
    );
    run.expect_code(0).stderr_has("resuming operation");
    assert_eq!(summary["rows_read"], 200, "{}", run.explain());
    assert_eq!(outcome(&summary), [0, 1, 199, 0, 0, 0], "{}", run.explain());
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM tickets WHERE external_id = '{key}' AND subject <> 'edited'"
        )),
        1
    );
}

#[test]
fn sigkill_then_resume_or_rerun_ends_in_the_same_state() {
    let dir = scratch("sigkill");
    let file = generate(
        &dir,
        "big.csv",
        &[
            "tickets",
            "--rows",
            "40000",
            "--seed",
            "11",
            "--bad-share",
            "0.01",
            "--duplicate-share",
            "0.02",
        ],
    );
    let reference = TestDb::new();
    let (_, full) = import(
        &reference,
        &dir,
        "tickets",
        &file,
        &["--batch-size", "500", "--rejects", "ref.csv"],
    );
    let expected = reference.ticket_snapshot();

    for follow_up in ["--resume", "rerun"] {
        let db = TestDb::new();
        let path = file.to_str().unwrap();
        let mut child = ticketops(
            Some(&db),
            &dir,
            &["import", "tickets", path, "--batch-size", "500", "--rejects", "r.csv"],
        )
        .spawn();
        wait_for_checkpoint(&db, &mut child);
        kill(&child, "-KILL");
        let _ = child.wait();
        let partial = db.scalar("SELECT count(*) FROM tickets");
        assert!(
            partial < expected.len() as i64,
            "the kill came too late to test anything"
        );

        let mut args = vec!["--batch-size", "500", "--rejects", "r.csv"];
        if follow_up == "--resume" {
            args.push("--resume");
        }
        let (run, summary) = import(&db, &dir, "tickets", &file, &args);
        run.expect_code(3);
        assert_same_rows(&db.ticket_snapshot(), &expected, &format!("{follow_up} after SIGKILL"));
        if follow_up == "--resume" {
            // The resumed operation accounts for the whole file exactly like the uninterrupted one.
            assert_eq!(outcome(&summary), outcome(&full), "{}", run.explain());
            assert_eq!(read_rejects(&dir.join("r.csv")), read_rejects(&dir.join("ref.csv")));
        }
    }
}

/// With one writer and with two (`--jobs 2`: every writer stops after its batch).
#[test]
fn sigterm_stops_after_the_batch_and_marks_the_operation_interrupted() {
    let dir = scratch("sigterm");
    let file = generate(&dir, "big.csv", &["tickets", "--rows", "40000", "--seed", "12"]);
    for jobs in ["1", "2"] {
        let db = TestDb::new();
        let mut child = ticketops(
            Some(&db),
            &dir,
            &[
                "--json",
                "import",
                "tickets",
                file.to_str().unwrap(),
                "--batch-size",
                "500",
                "--jobs",
                jobs,
            ],
        )
        .spawn();
        wait_for_checkpoint(&db, &mut child);
        kill(&child, "-TERM");
        let run = Run::from_output(
            format!("import tickets --jobs {jobs} (SIGTERM)"),
            child.wait_with_output().unwrap(),
        );
        let summary = run.expect_code(143).json();
        assert_eq!(summary["status"], "interrupted", "{summary}");
        assert_eq!(summary["stopped"], "signal");
        let committed = db.scalar("SELECT count(*) FROM tickets");
        assert_eq!(
            committed as u64,
            summary["inserted"].as_u64().unwrap(),
            "--jobs {jobs}: whole batches only"
        );
        assert_eq!(committed % 500, 0, "a batch is committed whole or not at all");
        assert!(committed < 40000, "the signal came too late to test anything");
        assert_eq!(
            db.strings("SELECT status::text FROM bulk_operations"),
            vec!["interrupted"]
        );
        let (run, summary) = import(
            &db,
            &dir,
            "tickets",
            &file,
            &["--resume", "--batch-size", "500", "--jobs", jobs],
        );
        run.expect_code(0);
        assert_eq!(summary["inserted"], 40000);
        assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 40000);
    }
}

#[test]
fn initial_load_matches_a_normal_import_and_restores_the_schema() {
    let dir = scratch("initial");
    let file = generate(
        &dir,
        "t.csv",
        &[
            "tickets",
            "--rows",
            "3000",
            "--seed",
            "3",
            "--bad-share",
            "0.01",
            "--duplicate-share",
            "0.01",
        ],
    );
    let normal = TestDb::new();
    let (_, a) = import(
        &normal,
        &dir,
        "tickets",
        &file,
        &["--rejects", "a.csv", "--batch-size", "500"],
    );
    // Batches of 25: the load writes its keys four batches' worth at a time, and on
    // partitions, held in a temporary file a month (and one for the keys), a batch writes the
    // fullest month of tickets and of tag links once it holds four batches' worth (or 1 MiB),
    // so some go in the middle of the load (their files then written over) and the rest at
    // its end.
    let fast = TestDb::new();
    let (run, b) = import(
        &fast,
        &dir,
        "tickets",
        &file,
        &["--initial-load", "--rejects", "b.csv", "--batch-size", "25"],
    );
    run.expect_code(3);
    assert_eq!(outcome(&a), outcome(&b));
    assert_same_rows(&fast.ticket_snapshot(), &normal.ticket_snapshot(), "initial load");
    assert_same_rows(&fast.user_snapshot(), &normal.user_snapshot(), "initial load's users");
    // The tables' own indexes and constraints (a partition's copies come and go with the
    // months the data needs).
    let schema = |db: &TestDb| {
        db.strings(
            "SELECT indexdef FROM pg_indexes i
             JOIN pg_class t ON t.relname = i.tablename AND t.relnamespace = 'public'::regnamespace
             WHERE i.schemaname = 'public' AND NOT t.relispartition
             UNION ALL
             SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint c
             WHERE connamespace = 'public'::regnamespace AND conparentid = 0
               AND NOT (SELECT relispartition FROM pg_class WHERE oid = c.conrelid)
             ORDER BY 1",
        )
    };
    assert_eq!(
        schema(&normal),
        schema(&fast),
        "indexes and constraints must come back exactly"
    );
    ticketops(Some(&fast), &dir, &["doctor"]).run().expect_code(0);
    if partitioned() {
        // Rebuilt month by month, each month's index attached to its parent's: every partition
        // has each of its parent's, and every index is valid.
        assert_eq!(
            fast.strings(
                "SELECT p.relname || ' ' || count(h.inhrelid) FROM pg_inherits t
                 JOIN pg_class p ON p.oid = t.inhrelid
                 JOIN pg_index parent ON parent.indrelid = t.inhparent
                 LEFT JOIN pg_inherits h ON h.inhparent = parent.indexrelid
                      AND h.inhrelid IN (SELECT indexrelid FROM pg_index WHERE indrelid = t.inhrelid)
                 WHERE t.inhparent IN ('tickets'::regclass, 'ticket_tags'::regclass)
                 GROUP BY p.relname HAVING count(h.inhrelid) <> count(*) ORDER BY 1"
            ),
            Vec::<String>::new(),
            "partitions missing an index of their parent's"
        );
        assert_eq!(fast.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid"), 0);
    }
    // Loaded frozen (COPY FREEZE after a TRUNCATE): every page is all-visible, as the index
    // builds record. PostgreSQL refuses FREEZE on a partitioned table, so there the rows go
    // straight into their months, and the keys too are loaded frozen. Citus drops FREEZE (and
    // the coordinator's tables are empty shells): nothing to see there.
    let frozen: &[&str] = if distributed() {
        &[]
    } else if partitioned() {
        &["ticket_keys true", "ticket_tags true", "tickets true"]
    } else {
        &["ticket_tags true", "tickets true"]
    };
    assert_eq!(
        fast.strings(&format!(
            "SELECT name || ' ' || (sum(relpages) > 0 AND sum(relallvisible) = sum(relpages)) FROM (
                 SELECT coalesce((SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = c.oid),
                                 c.relname::text) AS name,
                        c.relpages, c.relallvisible
                 FROM pg_class c
                 WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace
                   AND (c.relname IN ('tickets', 'ticket_tags', 'ticket_keys')
                        OR c.oid IN (SELECT inhrelid FROM pg_inherits
                                     WHERE inhparent IN ('tickets'::regclass, 'ticket_tags'::regclass)))
             ) r WHERE {} GROUP BY name ORDER BY 1",
            !distributed()
        )),
        frozen
    );

    // Statistics of every table the load wrote; on partitions, after the commit, of the parents
    // over all of their months, the months themselves left to autovacuum (see
    // partitioned::an_initial_load_analyzes_the_months_itself_where_autovacuum_would_not).
    if partitioned() {
        assert_eq!(
            fast.strings(
                "SELECT DISTINCT tablename::text FROM pg_stats
                 WHERE schemaname = 'public' AND inherited AND tablename IN ('tickets', 'ticket_tags') ORDER BY 1"
            ),
            ["ticket_tags", "tickets"],
            "the parents' statistics over their months"
        );
        assert_eq!(
            fast.scalar(
                "SELECT count(*) FROM pg_stat_user_tables
                 WHERE last_analyze IS NOT NULL
                   AND relid IN (SELECT relid FROM pg_partition_tree('tickets') WHERE isleaf
                                 UNION ALL SELECT relid FROM pg_partition_tree('ticket_tags') WHERE isleaf)"
            ),
            0,
            "months analyzed by the load, not left to autovacuum"
        );
    } else if !distributed() {
        assert_eq!(
            fast.scalar(
                "SELECT count(*) FROM pg_class c
                 WHERE c.relnamespace = 'public'::regnamespace AND c.reltuples > 0
                   AND (c.relname IN ('tickets', 'ticket_tags')
                        OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'tickets'::regclass))
                   AND NOT EXISTS (SELECT 1 FROM pg_stats s WHERE s.schemaname = 'public' AND s.tablename = c.relname)"
            ),
            0,
            "a table without statistics after the load"
        );
        assert!(
            fast.scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'tickets' AND attname = 'status'") > 0,
            "no statistics of tickets itself"
        );
    }

    let initial_load = |db: &TestDb, rejects: &str| {
        let file = file.to_str().unwrap();
        let args = [
            "--json",
            "import",
            "tickets",
            file,
            "--initial-load",
            "--rejects",
            rejects,
            "--batch-size",
            "700",
        ];
        ticketops(Some(db), &dir, &args).run()
    };

    // Not on a table that holds rows: a clear refusal, nothing changed.
    let run = initial_load(&fast, "c.csv");
    run.expect_code(1).stderr_has("--initial-load needs empty tickets");
    assert_eq!(schema(&normal), schema(&fast));

    // Users that exist before the load (here without name or organization, some agents) are
    // filled in and promoted exactly as by a normal import; new ones are inserted alongside.
    let mut emails: Vec<String> = csv::Reader::from_path(&file)
        .unwrap()
        .records()
        .filter_map(Result::ok)
        .filter_map(|r| r.get(6).map(|e| e.trim().to_lowercase()))
        .filter(|e| e.contains('@'))
        .step_by(9)
        .collect();
    emails.sort();
    emails.dedup();
    assert!(emails.len() > 50, "the file has requesters to create beforehand");
    let existing = emails
        .iter()
        .enumerate()
        .map(|(i, e)| format!("('{e}', '{}')", if i % 5 == 0 { "agent" } else { "customer" }))
        .collect::<Vec<_>>()
        .join(", ");
    let (normal, fast) = (TestDb::new(), TestDb::new());
    for db in [&normal, &fast] {
        db.execute(&format!("INSERT INTO users (email, role) VALUES {existing}"));
    }
    let (_, a) = import(
        &normal,
        &dir,
        "tickets",
        &file,
        &["--rejects", "e.csv", "--batch-size", "700"],
    );
    let run = initial_load(&fast, "f.csv");
    assert_eq!(outcome(&a), outcome(&run.expect_code(3).json()));
    assert_same_rows(
        &fast.ticket_snapshot(),
        &normal.ticket_snapshot(),
        "initial load onto users",
    );
    assert_same_rows(
        &fast.user_snapshot(),
        &normal.user_snapshot(),
        "initial load onto users: users",
    );

    // A failure in the middle of an initial load (keys and indexes dropped at that point)
    // leaves the schema and the tables exactly as they were.
    let failing = TestDb::new();
    inject_failure(&failing, "INSERT", "T-001500");
    let run = initial_load(&failing, "d.csv");
    run.expect_code(1).stderr_has("injected failure");
    assert_eq!(failing.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(
        schema(&normal),
        schema(&failing),
        "a failed initial load must leave the schema as it was"
    );
}

#[test]
fn users_import_upserts_by_email() {
    let db = TestDb::new();
    let dir = scratch("users");
    let file = dir.join("users.csv");
    std::fs::write(
        &file,
        "email,name,role,organization\nAnn@Example.com,Ann,agent,Acme\nbob@example.com,,customer,\nbroken,X,,\nann@example.com,Ann B,,\ncid@example.com,Cid,wizard,\n",
    )
    .unwrap();
    let (run, s) = import(&db, &dir, "users", &file, &[]);
    run.expect_code(3);
    assert_eq!(outcome(&s), [2, 0, 0, 1, 0, 2], "{}", run.explain());
    let ann = db.json("SELECT u.name, u.role::text, o.name AS org FROM users u LEFT JOIN organizations o ON o.id = u.organization_id WHERE email = 'ann@example.com'");
    assert_eq!(ann[0]["name"], "Ann B");
    // A blank role or organization keeps nothing from the earlier duplicate (last wins),
    // and the new user gets the default role.
    assert_eq!(ann[0]["role"], "customer");
    let (_, s) = import(&db, &dir, "users", &file, &[]);
    assert_eq!(outcome(&s), [0, 0, 2, 1, 0, 2]);
    std::fs::write(&file, "email,name,role\nbob@example.com,Bob,admin\nann@example.com,,\n").unwrap();
    let (_, s) = import(&db, &dir, "users", &file, &[]);
    assert_eq!(outcome(&s), [0, 1, 1, 0, 0, 0]);
    assert_eq!(
        db.strings("SELECT role::text FROM users WHERE email = 'bob@example.com'"),
        vec!["admin"]
    );
    assert_eq!(
        db.strings("SELECT name FROM users WHERE email = 'ann@example.com'"),
        vec!["Ann B"],
        "an empty name never erases one"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_log WHERE table_name = 'users' AND action = 'update'"),
        1
    );
}

#[test]
fn comments_import_rejects_orphans_and_is_idempotent() {
    let db = TestDb::new();
    let dir = scratch("comments");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let (run, s) = import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    run.expect_code(3);
    let orphans = read_rejects(&dir.join("c.csv"));
    assert!(!orphans.is_empty());
    assert!(
        orphans.iter().all(|(_, _, e)| e.contains("does not exist")),
        "{orphans:?}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM comments"),
        s["inserted"].as_i64().unwrap()
    );
    let (_, again) = import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    assert_eq!(again["inserted"], 0);
    assert_eq!(again["updated"], 0);
    assert_eq!(again["unchanged"], s["inserted"]);

    // Without external_id, comments are matched on ticket, author, body and time.
    let file = dir.join("plain.csv");
    std::fs::write(
        &file,
        "ticket_external_id,author_email,body,public,created_at\nT-000001,x@example.com,hello,false,2024-01-01\n",
    )
    .unwrap();
    let (_, s) = import(&db, &dir, "comments", &file, &[]);
    assert_eq!(s["inserted"], 1);
    let (_, s) = import(&db, &dir, "comments", &file, &[]);
    assert_eq!(outcome(&s), [0, 0, 1, 0, 0, 0]);
}

/// A batch of comments is joined to the stored ones by probing their keys. The planner, left
/// to itself, hashed the whole comments table for every batch (a sequential scan each time:
/// an import got slower the more comments were stored). On partitions each stored comment is
/// probed in its ticket's month, which in this small database is a page or two: the planner
/// may rightly scan such a month instead of its index, so there the probes are counted as
/// scans of either kind, at least one a row (a hashed batch would scan each month once). On
/// Citus the comments are merged shard by shard by another statement
/// (tests/distributed-skips.txt).
#[test]
fn comment_batches_probe_the_stored_comments_instead_of_reading_them_all() {
    let db = TestDb::new();
    let dir = scratch("comment-probes");
    let tickets = generate(&dir, "tickets.csv", &["tickets", "--rows", "300"]);
    import(&db, &dir, "tickets", &tickets, &[]).0.expect_code(0);
    let comments = generate(
        &dir,
        "comments.csv",
        &["comments", "--rows", "3000", "--tickets", "300"],
    );
    let by_month = db.layout == "partitioned";
    // (sequential scans, index scans) of comments (of its months, on the partitioned layout),
    // once the importing backends have exited and flushed their counts: the probes reach at
    // least one a row.
    let of_comments = "FROM pg_stat_user_tables
                       WHERE relid = 'comments'::regclass OR relid IN (SELECT relid FROM pg_partition_tree('comments'))";
    let scans = || {
        (
            db.scalar(&format!("SELECT coalesce(sum(seq_scan), 0)::bigint {of_comments}")),
            db.scalar(&format!("SELECT coalesce(sum(idx_scan), 0)::bigint {of_comments}")),
        )
    };
    let probes = |(seq, idx): (i64, i64)| if by_month { seq + idx } else { idx };
    let settled = |probes_at_least: i64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = scans();
            if probes(now) >= probes_at_least || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (run, first) = import(&db, &dir, "comments", &comments, &["--batch-size", "300"]);
    run.expect_code(0);
    let inserted = first["inserted"].as_i64().unwrap();
    assert_eq!(inserted, 3000, "{}", run.explain());
    let before = settled(inserted);

    let (run, again) = import(&db, &dir, "comments", &comments, &["--batch-size", "300"]);
    run.expect_code(0);
    assert_eq!(outcome(&again), [0, 0, 3000, 0, 0, 0], "{}", run.explain());
    let after = settled(probes(before) + inserted);
    assert!(
        probes(after) >= probes(before) + inserted,
        "the re-import probed the comments {} times for {inserted} rows",
        probes(after) - probes(before)
    );
    if !by_month {
        assert_eq!(after.0, before.0, "the re-import read the comments table whole");
    }
}

/// A comment re-imported onto another ticket moves there keeping its id (on Citus from one
/// shard to another, its key following), its history says from where, and an undo moves it back.
#[test]
fn a_comment_imported_onto_another_ticket_moves_there_and_an_undo_moves_it_back() {
    let (db, dir) = dataset();
    let header = "external_id,ticket_external_id,author_email,body,public,created_at\n";
    let first = dir.join("comments-1.csv");
    std::fs::write(
        &first,
        format!(
            "{header}K-1,C-1,ann@example.com,first,true,2024-01-01T00:00:00Z\n\
             K-2,C-2,bob@example.com,second,true,2024-01-01T00:00:00Z\n\
             K-3,C-3,cid@example.com,third,true,2024-01-02T00:00:00Z\n"
        ),
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "comments", &first, &[]);
    assert_eq!(outcome(&summary), [3, 0, 0, 0, 0, 0], "{}", run.explain());
    let placed = "SELECT c.external_id || ' ' || c.id || ' ' || t.external_id || ' ' || c.body || ' ' || c.public
                  FROM comments c JOIN tickets t ON t.id = c.ticket_id ORDER BY 1";
    let original = db.strings(placed);
    let original_rows = db.checksum("comments");
    let id = |key: &str| db.scalar(&format!("SELECT id FROM comments WHERE external_id = '{key}'"));
    let (k1, k3) = (id("K-1"), id("K-3"));

    let second = dir.join("comments-2.csv");
    std::fs::write(
        &second,
        format!(
            "{header}K-1,C-4,ann@example.com,first,true,2024-01-01T00:00:00Z\n\
             K-2,C-2,bob@example.com,second (edited),true,2024-01-01T00:00:00Z\n\
             K-3,C-1,cid@example.com,third (edited),false,\n"
        ),
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "comments", &second, &[]);
    assert_eq!(outcome(&summary), [0, 3, 0, 0, 0, 0], "{}", run.explain());
    let moved = db.strings(placed);
    assert_eq!(
        moved,
        vec![
            format!("K-1 {k1} C-4 first true"),
            format!("K-2 {} C-2 second (edited) true", id("K-2")),
            format!("K-3 {k3} C-1 third (edited) false"),
        ]
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM comments WHERE external_id = 'K-3' AND created_at = '2024-01-02T00:00:00Z'"),
        1,
        "a row without created_at keeps the stored one"
    );
    assert_comment_keys_match(&db);
    let op = summary["operation_id"].as_i64().unwrap();
    let ticket = |key: &str| db.scalar(&format!("SELECT id FROM tickets WHERE external_id = '{key}'"));
    assert_eq!(
        db.strings(&format!(
            "SELECT (before ->> 'ticket_id') || ' ' || (after ->> 'ticket_id') || ' ' || (after ->> 'body')
             FROM audit_log WHERE operation_id = {op} AND table_name = 'comments' AND row_id IN ({k1}, {k3})
             ORDER BY row_id"
        )),
        vec![
            format!("{} {} first", ticket("C-1"), ticket("C-4")),
            format!("{} {} third (edited)", ticket("C-3"), ticket("C-1")),
        ],
        "the history of a moved comment: the whole row before and after"
    );
    let (run, again) = import(&db, &dir, "comments", &second, &[]);
    assert_eq!(outcome(&again), [0, 0, 3, 0, 0, 0], "{}", run.explain());

    // Changed since: an undo leaves it where it is, --force moves it back too.
    db.execute("UPDATE comments SET body = 'edited by hand' WHERE external_id = 'K-1'");
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op.to_string()]).run();
    let dry = dry.expect_code(0).json();
    assert_eq!(
        (&dry["would_revert"], &dry["conflicts"]),
        (&2.into(), &1.into()),
        "{dry}"
    );
    let undone = apply(&db, &dir, &["undo", &op.to_string()]);
    assert_eq!(
        (&undone["reverted"], &undone["conflicts"]),
        (&2.into(), &1.into()),
        "{undone}"
    );
    assert_eq!(
        db.strings(placed)[0],
        format!("K-1 {k1} C-4 edited by hand true"),
        "a comment changed since stays"
    );
    let forced = apply(&db, &dir, &["undo", &op.to_string(), "--force"]);
    assert_eq!(forced["reverted"], 1, "{forced}");
    assert_eq!(db.checksum("comments"), original_rows, "{:?}", db.strings(placed));
    assert_eq!(db.strings(placed), original);
    assert_comment_keys_match(&db);
    // The forced undo's own history holds what it replaced: undoing it moves the comment again.
    let redone = apply(&db, &dir, &["undo", &forced["operation_id"].to_string()]);
    assert_eq!(redone["reverted"], 1, "{redone}");
    assert_eq!(db.strings(placed)[0], format!("K-1 {k1} C-4 edited by hand true"));
    assert_comment_keys_match(&db);
}

#[test]
fn progress_bar_is_off_without_a_terminal_and_quiet_is_quiet() {
    let db = TestDb::new();
    let dir = scratch("quiet");
    let run = ticketops(
        Some(&db),
        &dir,
        &["-q", "import", "tickets", bad("duplicate_key.csv").to_str().unwrap()],
    )
    .run();
    run.expect_code(0);
    assert!(run.stderr.is_empty(), "{}", run.explain());
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", bad("duplicate_key.csv").to_str().unwrap()],
    )
    .run();
    assert!(
        !run.stderr.contains('\r') && !run.stderr.contains("ETA"),
        "no bar when stderr is not a terminal{}",
        run.explain()
    );
}

#[test]
fn a_stale_rejects_file_is_removed_and_a_foreign_file_is_kept() {
    let db = TestDb::new();
    let dir = scratch("stale");
    let rejects = dir.join("r.csv");
    import(
        &db,
        &dir,
        "tickets",
        &bad("bad_email.csv"),
        &["--rejects", rejects.to_str().unwrap()],
    )
    .0
    .expect_code(3);
    assert!(rejects.exists());
    // A clean run must not leave the earlier run's rejects looking like its own.
    let (run, _) = import(
        &db,
        &dir,
        "tickets",
        &bad("duplicate_key.csv"),
        &["--rejects", rejects.to_str().unwrap()],
    );
    run.expect_code(0);
    assert!(!rejects.exists(), "{}", run.explain());
    // Something that is not a rejects file is never overwritten.
    std::fs::write(&rejects, "precious,data\n1,2\n").unwrap();
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            bad("bad_email.csv").to_str().unwrap(),
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    )
    .run();
    run.expect_code(1).stderr_has("is not a rejects file");
    assert_eq!(std::fs::read_to_string(&rejects).unwrap(), "precious,data\n1,2\n");
}

#[test]
fn a_row_locked_by_the_application_fails_the_batch_after_the_lock_timeout() {
    use diesel::connection::SimpleConnection;
    let db = TestDb::new();
    let dir = scratch("locktimeout");
    import(&db, &dir, "tickets", &bad("duplicate_key.csv"), &[])
        .0
        .expect_code(0);
    let changed = dir.join("changed.csv");
    let text = std::fs::read_to_string(bad("duplicate_key.csv")).unwrap();
    std::fs::write(&changed, text.replace("Second version wins", "Changed again")).unwrap();
    // A live application holds the row.
    let mut app = db.conn();
    app.batch_execute("BEGIN; UPDATE tickets SET subject = subject WHERE external_id = 'D-1'")
        .unwrap();
    let started = Instant::now();
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", changed.to_str().unwrap(), "--lock-timeout", "0.5"],
    )
    .run();
    run.expect_code(1).stderr_has("lock timeout");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited too long: {:?}",
        started.elapsed()
    );
    app.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        db.strings("SELECT subject FROM tickets WHERE external_id = 'D-1'"),
        vec!["Second version wins"]
    );
}

#[test]
fn duplicates_in_different_batches_reimport_as_unchanged() {
    let db = TestDb::new();
    let dir = scratch("dup-far");
    let file = generate(
        &dir,
        "d.csv",
        &["tickets", "--rows", "6000", "--seed", "21", "--duplicate-share", "0.1"],
    );
    let (run, first) = import(&db, &dir, "tickets", &file, &["--batch-size", "500"]);
    run.expect_code(0);
    assert!(
        first["duplicate"].as_u64().unwrap() > 300,
        "the file should repeat keys across batches: {first}"
    );
    // The same file in one batch decides the same: the last occurrence of each key wins.
    let single = TestDb::new();
    let (_, whole) = import(&single, &dir, "tickets", &file, &["--batch-size", "100000"]);
    assert_eq!(outcome(&first), outcome(&whole));
    assert_same_rows(
        &db.ticket_snapshot(),
        &single.ticket_snapshot(),
        "batched vs whole-file",
    );
    // And a second import changes nothing at all.
    let before = db.row_versions("tickets");
    let (_, second) = import(&db, &dir, "tickets", &file, &["--batch-size", "500"]);
    assert_eq!(second["updated"], 0, "{second}");
    assert_eq!(second["unchanged"], first["inserted"]);
    assert_eq!(second["duplicate"], first["duplicate"]);
    assert_eq!(db.row_versions("tickets"), before, "the re-import rewrote rows");
}

#[test]
fn a_change_in_any_single_field_is_an_update() {
    let db = TestDb::new();
    let dir = scratch("one-field");
    let header = "external_id,subject,description,status,priority,channel,requester_email,requester_name,\
                  assignee_email,organization,tags,created_at,updated_at,solved_at";
    let base = [
        "F-1",
        "Printer on fire",
        "Floor 3",
        "solved",
        "high",
        "email",
        "ann@example.com",
        "Ann",
        "agent1@support.example.org",
        "Acme",
        "hardware;urgent",
        "2024-01-02T03:04:05.123456Z",
        "2024-01-03T00:00:00Z",
        "2024-01-04T00:00:00Z",
    ];
    let write = |name: &str, fields: &[&str]| {
        let path = dir.join(name);
        let mut w = csv::Writer::from_path(&path).unwrap();
        w.write_record(header.split(',')).unwrap();
        w.write_record(fields).unwrap();
        w.flush().unwrap();
        path
    };
    let first = write("base.csv", &base);
    import(&db, &dir, "tickets", &first, &[]).0.expect_code(0);
    let (_, again) = import(&db, &dir, "tickets", &first, &[]);
    assert_eq!(again["unchanged"], 1, "{again}");
    // Another user and organization must exist for those fields to point elsewhere.
    let other = write("other.csv", &{
        let mut f = base;
        f[0] = "F-2";
        f[6] = "bob@example.com";
        f[8] = "agent2@support.example.org";
        f[9] = "Globex";
        f[10] = "other";
        f
    });
    import(&db, &dir, "tickets", &other, &[]).0.expect_code(0);
    let changes: &[(usize, &str)] = &[
        (1, "Printer on fire again"),
        (2, "Floor 4"),
        (2, ""),
        (3, "closed"),
        (4, "low"),
        (5, "web"),
        (6, "bob@example.com"),
        (8, "agent2@support.example.org"),
        (8, ""),
        (9, "Globex"),
        (9, ""),
        (10, "hardware"),
        (10, "hardware;urgent;other"),
        (11, "2024-01-02T03:04:05.123457Z"),
        (12, "2024-01-03T00:00:01Z"),
        (13, ""),
    ];
    for (n, (field, value)) in changes.iter().enumerate() {
        // Back to the base row, then one field changed.
        import(&db, &dir, "tickets", &first, &[]);
        let mut fields = base;
        fields[*field] = value;
        let changed = write(&format!("change-{n}.csv"), &fields);
        let (run, summary) = import(&db, &dir, "tickets", &changed, &[]);
        assert_eq!(summary["updated"], 1, "field {field} = {value:?}{}", run.explain());
    }
}

/// Stored tickets are read by a guessed id range when a file follows insertion order and by
/// external_id otherwise: whatever the order, every stored ticket must be found, ranges that
/// hold other tickets must not leak into a batch, and tag sets must be each ticket's own.
#[test]
fn a_reimport_in_any_order_finds_every_stored_ticket() {
    let db = TestDb::new();
    let dir = scratch("any-order");
    let header = "external_id,subject,requester_email,status,tags,created_at";
    let row = |i: usize, subject: &str, tags: &str| {
        format!(
            "R-{i:03},{subject} {i},r{}@example.com,open,{tags},2024-01-01 00:00:00",
            i % 7
        )
    };
    let write = |name: &str, rows: &[String]| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
        path
    };
    let tags = |i: usize| ["", "a", "a;b", "c"][i % 4];
    let original: Vec<String> = (0..60).map(|i| row(i, "Subject", tags(i))).collect();
    let first = write("first.csv", &original);
    let batches = ["--batch-size", "7"];
    import(&db, &dir, "tickets", &first, &batches).0.expect_code(0);
    let imported = db.ticket_snapshot();
    let versions = db.row_versions("tickets");

    let reversed: Vec<String> = original.iter().rev().cloned().collect();
    let shuffled: Vec<String> = (0..60).map(|i| original[(i * 17) % 60].clone()).collect();
    // In order with gaps: each guessed range also holds tickets the batch does not have.
    let gaps: Vec<String> = original
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, r)| r.clone())
        .collect();
    for (name, rows) in [
        ("same", &original),
        ("reversed", &reversed),
        ("shuffled", &shuffled),
        ("gaps", &gaps),
    ] {
        let path = write(&format!("{name}.csv"), rows);
        let (run, summary) = import(&db, &dir, "tickets", &path, &batches);
        let unchanged = rows.len() as u64;
        assert_eq!(outcome(&summary), [0, 0, unchanged, 0, 0, 0], "{name}{}", run.explain());
    }
    assert_eq!(
        db.row_versions("tickets"),
        versions,
        "unchanged re-imports rewrote rows"
    );
    assert_same_rows(&db.ticket_snapshot(), &imported, "after unchanged re-imports");

    // Out of order, with changed subjects and tag sets and new tickets in between.
    let mut mixed: Vec<String> = (0..60)
        .map(|i| {
            let n = (i * 17) % 60;
            match n {
                10..=14 => row(n, "Changed", tags(n)),
                20..=23 => row(n, "Subject", "d;a"),
                _ => original[n].clone(),
            }
        })
        .collect();
    for (k, n) in (60..65).enumerate() {
        mixed.insert(k * 11, row(n, "New", "b"));
    }
    let path = write("mixed.csv", &mixed);
    let (run, summary) = import(&db, &dir, "tickets", &path, &batches);
    assert_eq!(outcome(&summary), [5, 9, 51, 0, 0, 0], "{}", run.explain());

    // The result is what a fresh import of the same file gives.
    let fresh = TestDb::new();
    import(&fresh, &dir, "tickets", &path, &batches).0.expect_code(0);
    assert_same_rows(
        &db.ticket_snapshot(),
        &fresh.ticket_snapshot(),
        "mixed re-import vs fresh import",
    );
}

/// The client caches are bounded (500,000 entries each): one that overflows is cleared before
/// the next batch is resolved, never in the middle, so every user, organization and tag the
/// batch needs is still there when its rows are written.
#[test]
fn an_overflowing_entity_cache_keeps_what_the_batch_needs() {
    use ticketops::import::entities::{EntityCache, UserRef};
    use ticketops::models::UserRole;
    let db = TestDb::new();
    let mut conn = db.conn();
    let mut cache = EntityCache::with_limit(3);
    let emails: Vec<String> = (0..10).map(|i| format!("u{i}@example.com")).collect();
    let names: Vec<String> = (0..10).map(|i| format!("name {i}")).collect();
    let refs = |range: std::ops::Range<usize>| -> Vec<UserRef<'_>> {
        emails[range]
            .iter()
            .map(|email| UserRef {
                email,
                name: None,
                role: UserRole::Customer,
                organization_id: None,
            })
            .collect()
    };
    for batch in [0..6, 3..10, 0..10] {
        cache.ensure_users(&mut conn, &refs(batch.clone())).unwrap();
        for email in &emails[batch.clone()] {
            assert!(cache.user_id(email).is_some(), "{email} of batch {batch:?}");
        }
        let wanted = names[batch.clone()].iter().map(String::as_str);
        cache.ensure_organizations(&mut conn, wanted.clone()).unwrap();
        cache.ensure_tags(&mut conn, wanted).unwrap();
        for name in &names[batch.clone()] {
            assert!(
                cache.organization_id(name).is_some(),
                "organization {name} of batch {batch:?}"
            );
            assert!(cache.tag_id(name).is_some(), "tag {name} of batch {batch:?}");
        }
    }
    assert_eq!(db.scalar("SELECT count(*) FROM users"), 10);
    assert_eq!(db.scalar("SELECT count(*) FROM organizations"), 10);

    // A batch of users the cache holds already, however many rows name them, takes no room:
    // the others stay cached (counting the batch's references, u0 was forgotten).
    let mut cache = EntityCache::with_limit(3);
    cache.ensure_users(&mut conn, &refs(0..2)).unwrap();
    let again: Vec<UserRef<'_>> = (0..4).flat_map(|_| refs(1..2)).collect();
    cache.ensure_users(&mut conn, &again).unwrap();
    assert!(cache.user_id("u0@example.com").is_some(), "u0 forgotten");
    assert!(cache.user_id("u1@example.com").is_some());
}

/// Under the initial load's lock of an empty users table, a cache that overflows forgets users
/// it inserted: those a batch names again are looked up (by the e-mail key, rebuilt then) and
/// neither inserted twice nor left unfilled, while ones it never inserted are inserted without
/// a lookup; at the end every index and key of users is back.
#[test]
fn an_initial_load_whose_users_cache_overflows_inserts_each_user_once() {
    use diesel::Connection as _;
    use ticketops::import::entities::{EntityCache, UserRef};
    use ticketops::models::UserRole;
    let db = TestDb::new();
    let schema = "SELECT indexdef FROM pg_indexes WHERE tablename = 'users'
                  UNION ALL SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'users'::regclass
                  ORDER BY 1";
    let before = db.strings(schema);
    let emails: Vec<String> = (0..10).map(|i| format!("u{i}@example.com")).collect();
    let names: Vec<String> = (0..10).map(|i| format!("name {i}")).collect();
    let refs = |range: std::ops::Range<usize>, named: bool| -> Vec<UserRef<'_>> {
        range
            .map(|i| UserRef {
                email: &emails[i],
                name: named.then(|| names[i].as_str()),
                role: UserRole::Customer,
                organization_id: None,
            })
            .collect()
    };
    let mut conn = db.conn();
    let ids = conn
        .transaction(|conn| -> anyhow::Result<Vec<i64>> {
            let mut cache = EntityCache::with_limit(3);
            cache.lock_users_for_load(conn)?;
            // The second and later batches find the cache full: it forgets, and the batches
            // name users inserted before (forgotten) and new ones.
            for (batch, named) in [
                (0..3, false),
                (3..6, false),
                (0..6, true),
                (6..10, false),
                (0..10, false),
            ] {
                cache.ensure_users(conn, &refs(batch.clone(), named))?;
                for email in &emails[batch.clone()] {
                    assert!(cache.user_id(email).is_some(), "{email} of batch {batch:?}");
                }
            }
            let ids = emails.iter().map(|e| cache.user_id(e).unwrap()).collect();
            cache.flush_held_users(conn)?;
            Ok(ids)
        })
        .unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM users"),
        10,
        "{:?}",
        db.strings("SELECT email FROM users ORDER BY id")
    );
    let stored: Vec<String> =
        db.strings("SELECT id || ' ' || email || ' ' || coalesce(name, '-') FROM users ORDER BY email");
    let expected: Vec<String> = (0..10)
        .map(|i| {
            let name = if i < 6 { names[i].as_str() } else { "-" };
            format!("{} {} {name}", ids[i], emails[i])
        })
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(
        db.strings(schema),
        before,
        "the indexes and keys of users must come back"
    );
}

/// Without --batch-size an import runs 2,000-row batches and an initial load 5,000-row ones;
/// the operation records the size it used.
#[test]
fn the_default_batch_size_depends_on_the_kind_of_load() {
    let dir = scratch("batch-size");
    for (extra, expected) in [(&[][..], "2000"), (&["--initial-load"][..], "5000")] {
        let db = TestDb::new();
        let mut args = vec!["--rejects", "r.csv"];
        args.extend_from_slice(extra);
        // The sample dump holds rejected rows on purpose.
        import(&db, &dir, "tickets", &fixture("tickets.csv"), &args)
            .0
            .expect_code(3);
        assert_eq!(
            db.strings("SELECT args->>'batch_size' FROM bulk_operations"),
            vec![expected],
            "{extra:?}"
        );
    }
}

#[test]
fn a_map_file_does_what_a_dozen_flags_do() {
    let common = ["--tag-separator", "|", "--timezone", "Europe/Berlin"];
    let by_flags = TestDb::new();
    let dir = scratch("map-file");
    let mut args = OTHER_HELPDESK_FLAGS.to_vec();
    args.extend_from_slice(&common);
    import(&by_flags, &dir, "tickets", &bad("other_helpdesk.csv"), &args)
        .0
        .expect_code(0);
    let by_file = TestDb::new();
    let map_file = fixture("maps/other_helpdesk.toml");
    let mut args = vec!["--map-file", map_file.to_str().unwrap()];
    args.extend_from_slice(&common);
    let (run, summary) = import(&by_file, &dir, "tickets", &bad("other_helpdesk.csv"), &args);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [2, 0, 0, 0, 0, 0], "{}", run.explain());
    assert_same_rows(
        &by_file.ticket_snapshot(),
        &by_flags.ticket_snapshot(),
        "map file vs flags",
    );
    assert_eq!(
        by_file.strings("SELECT args ->> 'map_file' FROM bulk_operations"),
        set(&[map_file.to_str().unwrap()]),
        "the operation records the map file"
    );

    // A flag wins over the file; a wrong file is a usage error before anything is read.
    let db = TestDb::new();
    let mut args = vec![
        "--map-file",
        map_file.to_str().unwrap(),
        "--value-map",
        "status:Pending Customer Response=on hold",
    ];
    args.extend_from_slice(&common);
    import(&db, &dir, "tickets", &bad("other_helpdesk.csv"), &args)
        .0
        .expect_code(0);
    assert_eq!(
        db.strings("SELECT status::text FROM tickets WHERE external_id = 'ZD-1'"),
        set(&["on_hold"])
    );
    for (text, message) in [
        (
            "[columns]\n\"Ticket ID\" = \"ticket_number\"\n",
            "unknown field \"ticket_number\"",
        ),
        ("[colums]\n", "is not valid"),
        ("[values.state]\n\"x\" = \"y\"\n", "unknown field \"state\""),
        ("date_formats = [\"%d/%Q\"]\n", "not a valid strftime format"),
    ] {
        let wrong = dir.join("wrong.toml");
        std::fs::write(&wrong, text).unwrap();
        let run = ticketops(
            Some(&db),
            &dir,
            &[
                "import",
                "tickets",
                bad("other_helpdesk.csv").to_str().unwrap(),
                "--map-file",
                wrong.to_str().unwrap(),
            ],
        )
        .run();
        run.expect_code(2).stderr_has(message);
    }
}

#[test]
fn a_jira_export_imports_with_its_map_file_and_reimports_unchanged() {
    let db = TestDb::new();
    let dir = scratch("jira");
    let jira = fixture("jira.csv");
    let map_file = fixture("maps/jira.toml");
    let args = ["--map-file", map_file.to_str().unwrap(), "--timezone", "Europe/Berlin"];
    let (run, summary) = import(&db, &dir, "tickets", &jira, &args);
    run.expect_code(0)
        .stderr_has("ignoring unknown column(s): Issue id, Issue Type, Project key, Resolution, Watchers");
    assert_eq!(outcome(&summary), [6, 0, 0, 0, 0, 0], "{}", run.explain());
    let rows = db.json(
        "SELECT external_id, status::text, priority::text, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') AS created,
                to_char(solved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') AS solved, description,
                (SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags tt JOIN tags g ON g.id = tt.tag_id
                  WHERE tt.ticket_id = t.id) AS tags,
                (SELECT name FROM organizations o WHERE o.id = t.organization_id) AS organization
         FROM tickets t ORDER BY external_id",
    );
    let row = |id: &str| rows.iter().find(|r| r["external_id"] == id).unwrap().clone();
    let first = row("SUP-101");
    assert_eq!(first["status"], "pending", "Waiting for customer");
    assert_eq!(first["priority"], "high");
    assert_eq!(
        first["created"], "2025-07-14 13:42",
        "14/Jul/25 3:42 PM in Berlin (CEST)"
    );
    assert_eq!(
        first["tags"], "login;password",
        "the repeated Labels columns are merged"
    );
    assert_eq!(first["organization"], "Northwind");
    assert_eq!(
        first["description"],
        "I reset my password twice.\nThe login page still says \"invalid credentials\".\n\nBrowser: Firefox 128"
    );
    let done = row("SUP-102");
    assert_eq!(
        (done["status"].as_str(), done["priority"].as_str()),
        (Some("solved"), Some("normal"))
    );
    assert_eq!(done["solved"], "2025-01-03 15:20");
    let todo = row("SUP-103");
    assert_eq!(
        (todo["status"].as_str(), todo["priority"].as_str()),
        (Some("new"), Some("low"))
    );
    assert_eq!(todo["tags"], "dark-mode;feature-request;ui");
    assert_eq!(todo["created"], "2025-02-27 23:01", "12:01 AM is just after midnight");
    let outage = row("SUP-104");
    assert_eq!(
        (outage["status"].as_str(), outage["priority"].as_str()),
        (Some("open"), Some("urgent"))
    );
    assert_eq!(row("SUP-106")["status"], "closed");

    let (again, summary) = import(&db, &dir, "tickets", &jira, &args);
    again.expect_code(0);
    assert_eq!(
        outcome(&summary),
        [0, 0, 6, 0, 0, 0],
        "a re-run changes nothing{}",
        again.explain()
    );

    // Without the date format, each Jira date is a rejected row that says why; with
    // --date-format on the command line instead of the file, they all go in.
    let no_dates = dir.join("no-dates.toml");
    let text = std::fs::read_to_string(&map_file).unwrap();
    std::fs::write(&no_dates, text.replace("date_formats = ", "# date_formats = ")).unwrap();
    let plain = TestDb::new();
    let rejects = dir.join("no-dates.rejects.csv");
    let (run, summary) = import(
        &plain,
        &dir,
        "tickets",
        &jira,
        &[
            "--map-file",
            no_dates.to_str().unwrap(),
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    );
    run.expect_code(3);
    assert_eq!(summary["rejected"], 6);
    let reasons = read_rejects(&rejects);
    assert!(
        reasons[0].2.contains("not a timestamp: \"14/Jul/25 3:42 PM\""),
        "{reasons:?}"
    );
    let (run, summary) = import(
        &plain,
        &dir,
        "tickets",
        &jira,
        &[
            "--map-file",
            no_dates.to_str().unwrap(),
            "--date-format",
            "%d/%b/%y %I:%M %p",
        ],
    );
    run.expect_code(0);
    assert_eq!(summary["inserted"], 6, "{}", run.explain());
}

/// `-v` tells where an import's time went, by phase (per writer with --jobs): the phases a
/// run went through are named, and the ones it did not are not.
#[test]
fn verbose_import_names_the_phases_it_went_through() {
    let db = TestDb::new();
    let dir = scratch("verbose-phases");
    let file = fixture("tickets.csv");
    // Each "…time by phase: name 0.01 s, …" line on stderr, as the names of its phases.
    let phases = |run: &Run| -> Vec<Vec<String>> {
        run.stderr
            .lines()
            .filter_map(|l| l.split_once("time by phase: ").map(|(_, list)| list))
            .map(|list| {
                list.split(", ")
                    .map(|p| p.rsplitn(3, ' ').nth(2).unwrap_or_default().to_string())
                    .collect()
            })
            .collect()
    };
    let (first, _) = import(&db, &dir, "tickets", &file, &["-v"]);
    let lines = phases(&first);
    assert_eq!(lines.len(), 1, "{}", first.explain());
    assert!(lines[0].iter().any(|p| p == "COPY new tickets"), "{lines:?}");
    assert!(!lines[0].iter().any(|p| p.starts_with("rebuild")), "{lines:?}");
    let (again, summary) = import(
        &db,
        &dir,
        "tickets",
        &file,
        &["-v", "--jobs", "2", "--batch-size", "50"],
    );
    assert_eq!(summary["inserted"], 0, "{}", again.explain());
    let lines = phases(&again);
    assert!(
        !lines.is_empty() && again.stderr.contains("writer "),
        "{}",
        again.explain()
    );
    for named in &lines {
        assert!(!named.is_empty() && named.iter().all(|p| !p.is_empty()), "{lines:?}");
        assert!(!named.iter().any(|p| p == "COPY new tickets"), "{lines:?}");
    }
}

#[test]
fn addresses_written_as_mail_headers_or_links_are_taken_with_their_names() {
    // Exports of mail-based helpdesks write people as mail headers do.
    let db = TestDb::new();
    let dir = scratch("named-addresses");
    let file = dir.join("named.csv");
    std::fs::write(
        &file,
        "external_id,subject,status,requester_email,requester_name,assignee_email\n\
         N-1,a,open,Jane Doe <Jane@X.com>,,\"Agent A <agent@corp.com>\"\n\
         N-2,b,open,\"\"\"Smith, Al\"\" <al@x.com>\",Albert Smith,\n\
         N-3,c,open,mailto:zed@x.com,,\n\
         N-4,d,open,a@b.co; c@d.co,,\n",
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(3);
    assert_eq!(outcome(&summary), [3, 0, 0, 0, 0, 1], "{}", run.explain());
    assert_eq!(
        db.strings("SELECT email || ' ' || coalesce(name, '-') FROM users ORDER BY email"),
        [
            "agent@corp.com -",
            "al@x.com Albert Smith",
            "jane@x.com Jane Doe",
            "zed@x.com -"
        ]
    );
    let (again, summary) = import(&db, &dir, "tickets", &file, &[]);
    again.expect_code(3);
    assert_eq!(outcome(&summary), [0, 0, 3, 0, 0, 1], "a re-run changes nothing");
}
