//! `import --jobs N`: several writers give exactly the result of one — tables, counts, rejects,
//! audit — also when batches commit out of order and the import is killed in between. (SIGTERM
//! with two writers: import::sigterm_stops_after_the_batch_and_marks_the_operation_interrupted.)

use std::time::{Duration, Instant};

use crate::support::*;

/// The rejects of a run in file order (writers append them in commit order).
fn sorted_rejects(path: &std::path::Path) -> Vec<(String, u64, String)> {
    if !path.exists() {
        return Vec::new();
    }
    let mut rejects = read_rejects(path);
    rejects.sort_by_key(|r| r.1);
    rejects
}

/// Everything an import run decides that a second writer could change: the tickets, the
/// users, the counts, the reasons with their first lines, the rejects and the audit rows.
fn run_state(db: &TestDb, dir: &std::path::Path, summary: &serde_json::Value, rejects: &str, op: i64) -> String {
    // Ticket ids are the writers' (new tickets get theirs in commit order): audit rows are
    // compared by external id, and the id ranges of inserts by the tickets in them.
    let external_ids: std::collections::HashMap<i64, String> = db
        .json("SELECT id, external_id FROM tickets")
        .into_iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["external_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut inserted = Vec::new();
    let mut audit = Vec::new();
    let rows = db.json(&format!(
        "SELECT row_id, action, l.after->'ids' AS ids,
                (l.before - 'id' - 'requester_id' - 'assignee_id' - 'organization_id' - 'tag_ids'
                    - 'last_operation_id')::text AS before,
                (l.after - 'id' - 'requester_id' - 'assignee_id' - 'organization_id' - 'tag_ids'
                    - 'last_operation_id')::text AS after
         FROM audit_log l WHERE l.operation_id = {op}"
    ));
    for row in rows {
        if row["action"] == "insert_ids" {
            for range in row["ids"].as_array().unwrap() {
                let (from, to) = (range[0].as_i64().unwrap(), range[1].as_i64().unwrap());
                inserted.extend((from..=to).map(|id| external_ids[&id].clone()));
            }
        } else {
            let key = &external_ids[&row["row_id"].as_i64().unwrap()];
            audit.push(format!("{key} {} {} {}", row["action"], row["before"], row["after"]));
        }
    }
    inserted.sort_unstable();
    audit.sort();
    audit.push(format!("inserted {}", inserted.join(";")));
    format!(
        "{:?}\n{}\n{:?}\n{:?}\n{:?}\n{:?}",
        outcome(summary),
        summary["errors"],
        sorted_rejects(&dir.join(rejects)),
        db.ticket_snapshot(),
        db.user_snapshot(),
        audit
    )
}

#[test]
fn two_and_four_writers_give_the_tables_counts_rejects_and_audit_of_one() {
    let dir = scratch("jobs-same");
    // Dirty, with repeated keys spread over the file (small batches put most repeats in other
    // batches than their last occurrence), then the same tickets changed.
    let first = generate(
        &dir,
        "first.csv",
        &[
            "tickets",
            "--rows",
            "6000",
            "--seed",
            "31",
            "--bad-share",
            "0.02",
            "--duplicate-share",
            "0.1",
        ],
    );
    let changed = generate(
        &dir,
        "changed.csv",
        &["tickets", "--rows", "6000", "--seed", "32", "--duplicate-share", "0.05"],
    );
    let mut states = Vec::new();
    for jobs in ["1", "2", "4"] {
        let db = TestDb::new();
        let args = |rejects: &'static str| vec!["--jobs", jobs, "--batch-size", "100", "--rejects", rejects];
        let (run, summary) = import(&db, &dir, "tickets", &first, &args("r1.csv"));
        run.expect_code(3);
        assert!(summary["duplicate"].as_u64().unwrap() > 300, "{summary}");
        let first_state = run_state(&db, &dir, &summary, "r1.csv", 1);
        let (run, summary) = import(&db, &dir, "tickets", &changed, &args("r2.csv"));
        run.expect_code(0);
        assert!(summary["updated"].as_u64().unwrap() > 4000, "{summary}");
        let changed_state = run_state(&db, &dir, &summary, "r2.csv", 2);
        states.push((jobs, first_state, changed_state));
    }
    let (_, first_one, changed_one) = &states[0];
    let lines = |state: &str| -> Vec<String> { state.split("\", \"").map(str::to_string).collect() };
    for (jobs, first_state, changed_state) in &states[1..] {
        assert_same_rows(
            &lines(first_state),
            &lines(first_one),
            &format!("--jobs {jobs}: the first import against --jobs 1"),
        );
        assert_same_rows(
            &lines(changed_state),
            &lines(changed_one),
            &format!("--jobs {jobs}: the import of changed rows against --jobs 1"),
        );
    }
}

#[test]
fn writers_creating_the_same_new_users_keep_the_first_name_and_organization_in_the_file() {
    let dir = scratch("jobs-users");
    // Every batch of 10 rows names the same five new requesters, each row with another name and
    // organization: the first in the file must win, whichever writer commits first.
    let mut csv = String::from("external_id,subject,status,requester_email,requester_name,organization,created_at\n");
    for i in 0..3000 {
        csv.push_str(&format!(
            "U-{i:05},Subject {i},open,shared{}@example.com,Name {i},Org {},2024-01-01T00:00:00Z\n",
            i % 5,
            i % 7
        ));
    }
    let file = dir.join("shared-users.csv");
    std::fs::write(&file, csv).unwrap();
    let mut snapshots = Vec::new();
    for jobs in ["1", "4"] {
        let db = TestDb::new();
        let (run, summary) = import(&db, &dir, "tickets", &file, &["--jobs", jobs, "--batch-size", "10"]);
        run.expect_code(0);
        assert_eq!(summary["inserted"], 3000);
        let users = db.strings(
            "SELECT u.email || ' ' || u.name || ' ' || o.name FROM users u
             JOIN organizations o ON o.id = u.organization_id ORDER BY 1",
        );
        snapshots.push((users, db.ticket_snapshot()));
    }
    let first_in_file: Vec<String> = (0..5)
        .map(|i| format!("shared{i}@example.com Name {i} Org {i}"))
        .collect();
    assert_eq!(
        snapshots[0].0, first_in_file,
        "one writer: the first name and organization in the file"
    );
    assert!(
        snapshots[1] == snapshots[0],
        "four writers: other users or tickets than one writer"
    );
}

/// `file` with every subject changed (prefixed), as the next day's dump of the same tickets:
/// the same users, the same bad rows.
fn with_changed_subjects(file: &std::path::Path, to: &std::path::Path) {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(file).unwrap();
    let mut writer = csv::WriterBuilder::new().flexible(true).from_path(to).unwrap();
    writer.write_byte_record(reader.byte_headers().unwrap()).unwrap();
    for record in reader.byte_records() {
        let record = record.unwrap();
        let changed: Vec<Vec<u8>> = record
            .iter()
            .enumerate()
            .map(|(i, f)| if i == 1 { [b"Re: ", f].concat() } else { f.to_vec() })
            .collect();
        writer.write_record(&changed).unwrap();
    }
    writer.flush().unwrap();
}

/// The first external_id after record `after` of `file` that occurs once in it (so that its
/// row is written in that record's batch).
fn key_only_once_after(file: &std::path::Path, after: usize) -> String {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(file).unwrap();
    let keys: Vec<String> = reader
        .byte_records()
        .map(|r| String::from_utf8_lossy(r.unwrap().get(0).unwrap_or_default()).into_owned())
        .collect();
    let once = |k: &String| keys.iter().filter(|other| *other == k).count() == 1;
    keys[after..]
        .iter()
        .find(|k| k.starts_with("T-") && once(k))
        .unwrap()
        .clone()
}

#[test]
fn a_killed_import_with_batches_committed_out_of_order_resumes_to_the_result_of_one_writer() {
    let dir = scratch("jobs-kill");
    let first = generate(
        &dir,
        "first.csv",
        &[
            "tickets",
            "--rows",
            "20000",
            "--seed",
            "33",
            "--bad-share",
            "0.01",
            "--duplicate-share",
            "0.05",
        ],
    );
    let changed = dir.join("changed.csv");
    with_changed_subjects(&first, &changed);
    let reference = TestDb::new();
    import(&reference, &dir, "tickets", &first, &["--rejects", "ref1.csv"]);
    let (_, full) = import(
        &reference,
        &dir,
        "tickets",
        &changed,
        &["--batch-size", "200", "--rejects", "ref.csv"],
    );
    assert!(full["updated"].as_u64().unwrap() > 15000, "{full}");

    let db = TestDb::new();
    import(&db, &dir, "tickets", &first, &["--rejects", "r1.csv"]);
    // One ticket of the first batches is held up in its update, so that the other writers
    // commit later batches before that one: the checkpoint then holds batches beyond its
    // committed prefix.
    let held_up = key_only_once_after(&changed, 250);
    db.execute(&format!(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.external_id = '{held_up}' THEN PERFORM pg_sleep(4); END IF; RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE UPDATE ON tickets FOR EACH ROW EXECUTE FUNCTION slow();"
    ));
    let path = changed.to_str().unwrap();
    let mut child = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            path,
            "--jobs",
            "4",
            "--batch-size",
            "200",
            "--rejects",
            "r.csv",
        ],
    )
    .spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let checkpoint = loop {
        let found = db.json(
            "SELECT checkpoint AS j FROM bulk_operations
             WHERE checkpoint->'done' IS NOT NULL AND status = 'running' AND id = 2",
        );
        if let Some(checkpoint) = found.into_iter().next() {
            break checkpoint;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the import ended ({status}) before batches committed out of order");
        }
        assert!(Instant::now() < deadline, "no out-of-order checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    };
    kill(&child, "-KILL");
    let _ = child.wait();
    let checkpoint = &checkpoint["j"];
    assert!(!checkpoint["done"].as_array().unwrap().is_empty(), "{checkpoint}");
    assert_eq!(checkpoint["batch_size"], 200, "{checkpoint}");
    // The killed writers' sessions end when they next answer their client, one of them after
    // the trigger's sleep: dropped while they still run, the trigger (on every partition of
    // the partitioned layout) could deadlock with a statement they were still planning.
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'ticketops'",
    ) > 0
    {
        assert!(
            Instant::now() < deadline,
            "the killed import's sessions did not end within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    db.execute("DROP TRIGGER slow ON tickets");

    // Resumed with another batch size and one writer: it reads in the batches it was written in.
    let (run, summary) = import(
        &db,
        &dir,
        "tickets",
        &changed,
        &["--resume", "--batch-size", "500", "--rejects", "r.csv"],
    );
    run.expect_code(3).stderr_has("resuming in batches of 200 rows");
    assert_eq!(summary["operation_id"], 2, "the same operation continues");
    assert_eq!(outcome(&summary), outcome(&full), "{}", run.explain());
    assert_same_rows(
        &db.ticket_snapshot(),
        &reference.ticket_snapshot(),
        "--resume after SIGKILL",
    );
    assert_eq!(db.user_snapshot(), reference.user_snapshot());
    assert_eq!(sorted_rejects(&dir.join("r.csv")), sorted_rejects(&dir.join("ref.csv")));
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_log WHERE operation_id = 2"),
        reference.scalar("SELECT count(*) FROM audit_log WHERE operation_id = 2"),
        "one audit row per ticket changed, none twice"
    );
}

#[test]
fn jobs_refuse_one_transaction_modes_and_fall_back_to_one_writer_on_stdin() {
    let dir = scratch("jobs-modes");
    let db = TestDb::new();
    let file = fixture("tickets.csv");
    let path = file.to_str().unwrap();
    for mode in ["--atomic", "--dry-run", "--initial-load"] {
        ticketops(Some(&db), &dir, &["import", "tickets", path, "--jobs", "2", mode])
            .run()
            .expect_code(2)
            .stderr_has("--jobs writes batches on several connections");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    let bytes = std::fs::read(&file).unwrap();
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", "-", "--jobs", "2", "--rejects", "r.csv"],
    )
    .stdin(bytes)
    .run();
    run.stderr_has("writing on one connection: stdin is not scanned");
    let summary = run.json();
    assert_accounted(&summary, &run);
    assert!(summary["inserted"].as_u64().unwrap() > 0, "{summary}");
}

#[test]
fn users_and_comments_imports_with_three_writers_end_as_with_one() {
    let dir = scratch("jobs-kinds");
    let tickets = generate(&dir, "tickets.csv", &["tickets", "--rows", "500", "--seed", "35"]);
    let users = generate(
        &dir,
        "users.csv",
        &["users", "--rows", "3000", "--seed", "36", "--bad-share", "0.02"],
    );
    let comments = generate(
        &dir,
        "comments.csv",
        &[
            "comments",
            "--rows",
            "4000",
            "--tickets",
            "500",
            "--seed",
            "37",
            "--bad-share",
            "0.02",
        ],
    );
    let mut results = Vec::new();
    for jobs in ["1", "3"] {
        let db = TestDb::new();
        import(&db, &dir, "tickets", &tickets, &[]);
        let args = |rejects: &'static str| vec!["--jobs", jobs, "--batch-size", "100", "--rejects", rejects];
        let (_, users_summary) = import(&db, &dir, "users", &users, &args("ru.csv"));
        let (_, comments_summary) = import(&db, &dir, "comments", &comments, &args("rc.csv"));
        let stored_comments = db.strings(
            "SELECT coalesce(c.external_id, '') || ' ' || t.external_id || ' ' || u.email || ' ' || c.body
             FROM comments c JOIN tickets t ON t.id = c.ticket_id JOIN users u ON u.id = c.author_id ORDER BY 1",
        );
        results.push((
            outcome(&users_summary),
            outcome(&comments_summary),
            sorted_rejects(&dir.join("ru.csv")),
            sorted_rejects(&dir.join("rc.csv")),
            db.user_snapshot(),
            stored_comments,
        ));
    }
    assert!(
        results[0].0[0] > 0 && results[0].1[0] > 0,
        "users and comments inserted"
    );
    assert!(!results[0].2.is_empty() && !results[0].3.is_empty(), "rows rejected");
    assert!(results[1] == results[0], "three writers: other results than one");
}

#[test]
fn comments_without_external_id_repeated_in_a_file_are_made_once_whatever_the_batches_and_writers() {
    let dir = scratch("jobs-keyless");
    let tickets = generate(&dir, "tickets.csv", &["tickets", "--rows", "50", "--seed", "38"]);
    // 150 comments without external_id, each three times over the file (some without a time,
    // which matches the comment at any time), and one that repeats a comment with a key.
    let mut csv = String::from("external_id,ticket_external_id,author_email,body,created_at\n");
    csv.push_str("K-1,T-000001,kim@example.com,same as a keyed one,2024-01-01 10:00:00\n");
    for i in 0..450 {
        let c = (i * 7) % 150;
        let at = if c % 5 == 0 {
            String::new()
        } else {
            format!("2024-02-{:02} 10:00:00", 1 + c % 28)
        };
        csv.push_str(&format!(
            ",T-{:06},author{}@example.com,comment {c},{at}\n",
            1 + c % 50,
            c % 3
        ));
    }
    csv.push_str(",T-000001,kim@example.com,same as a keyed one,2024-01-01 10:00:00\n");
    let comments = dir.join("comments.csv");
    std::fs::write(&comments, csv).unwrap();

    let mut results = Vec::new();
    // Also where the database makes its sessions' transactions repeatable read or serializable by
    // default, as some DBAs do: a writer's snapshot taken before it waited for another's lock
    // would not see the comment the other just made, and make it again.
    let stricter = if distributed() {
        "repeatable read"
    } else {
        "serializable"
    };
    for (jobs, batch, isolation) in [
        ("1", "1000", None),
        ("1", "7", None),
        ("2", "7", None),
        ("4", "5", None),
        ("4", "5", Some("repeatable read")),
        ("4", "5", Some(stricter)),
    ] {
        let db = TestDb::new();
        if let Some(isolation) = isolation {
            db.execute(&format!(
                "ALTER DATABASE {} SET default_transaction_isolation = '{isolation}'",
                db.name
            ));
        }
        import(&db, &dir, "tickets", &tickets, &[]).0.expect_code(0);
        let args = ["--jobs", jobs, "--batch-size", batch, "--rejects", "rc.csv"];
        let (run, summary) = import(&db, &dir, "comments", &comments, &args);
        run.expect_code(0);
        let stored = db.strings(
            "SELECT coalesce(c.external_id, '') || ' ' || t.external_id || ' ' || u.email || ' ' || c.body
             FROM comments c JOIN tickets t ON t.id = c.ticket_id JOIN users u ON u.id = c.author_id ORDER BY 1",
        );
        let (again, again_summary) = import(&db, &dir, "comments", &comments, &args);
        again.expect_code(0);
        results.push((
            jobs,
            batch,
            isolation,
            outcome(&summary),
            stored,
            outcome(&again_summary),
        ));
    }
    let (_, _, _, counts, stored, again) = &results[0];
    assert_eq!(counts[0], 151, "each comment made once: {counts:?}");
    assert_eq!(counts[2], 301, "the repeats unchanged: {counts:?}");
    assert_eq!(stored.len(), 151);
    assert_eq!(again[0] + again[1], 0, "a re-run changes nothing: {again:?}");
    for (jobs, batch, isolation, other_counts, other_stored, other_again) in &results[1..] {
        let what = format!("--jobs {jobs} --batch-size {batch} (transactions {isolation:?}) against one batch");
        assert_eq!(other_counts, counts, "{what}");
        assert_same_rows(other_stored, stored, &what);
        assert_eq!(other_again, again, "{what}: the re-run");
    }
}
