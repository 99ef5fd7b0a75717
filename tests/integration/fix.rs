//! `fix set` and `undo` against a real database: dry run, confirmation, audit, undo.

use crate::support::*;

#[test]
fn dry_run_is_the_default_and_writes_nothing() {
    let (db, dir) = sample_db("fix-dry");
    let tables = ["tickets", "audit_log", "bulk_operations"];
    let before: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    let pending = db.scalar("SELECT count(*) FROM tickets WHERE status = 'pending'");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "set", "status=closed", "--status", "pending"],
    )
    .run();
    let v = run.expect_code(0).json();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["would_change"].as_i64().unwrap(), pending);
    assert!(!v["sample"].as_array().unwrap().is_empty());
    let after: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    assert_eq!(before, after);
}

#[test]
fn apply_then_undo_gives_back_an_identical_table() {
    let (db, dir) = sample_db("fix-undo");
    let original = db.checksum("tickets");
    let fixes: &[&[&str]] = &[
        &["status=closed", "priority=low", "--status", "pending"],
        &["assignee=none", "--priority", "urgent"],
        &["organization=Globex", "subject=Renamed by a fix", "--tag", "vip"],
        &["channel=phone", "--all"],
    ];
    let mut ops = Vec::new();
    for fix in fixes {
        let mut args = vec!["--json", "fix", "set"];
        args.extend_from_slice(fix);
        args.extend_from_slice(&["--apply", "--yes", "--batch-size", "7"]);
        let run = ticketops(Some(&db), &dir, &args).run();
        let v = run.expect_code(0).json();
        assert!(v["changed"].as_u64().unwrap() > 0, "{fix:?}{}", run.explain());
        let op = v["operation_id"].as_i64().unwrap();
        // Every changed row has its before and after values in the audit log.
        assert_eq!(
            db.scalar(&format!(
                "SELECT count(*) FROM audit_log WHERE operation_id = {op} AND action = 'fix'"
            )),
            v["changed"].as_i64().unwrap()
        );
        ops.push(op);
    }
    assert_ne!(db.checksum("tickets"), original);
    for op in ops.iter().rev() {
        let run = ticketops(
            Some(&db),
            &dir,
            &["--json", "undo", &op.to_string(), "--apply", "--yes"],
        )
        .run();
        let v = run.expect_code(0).json();
        assert_eq!(v["conflicts"], 0, "{}", run.explain());
    }
    assert_eq!(
        db.checksum("tickets"),
        original,
        "undo must give back the very same rows"
    );
    // Undoing again does nothing.
    let again = ticketops(
        Some(&db),
        &dir,
        &["--json", "undo", &ops[0].to_string(), "--apply", "--yes"],
    )
    .run();
    assert_eq!(again.expect_code(0).json()["reverted"], 0);
    assert_eq!(db.checksum("tickets"), original);
}

#[test]
fn rows_that_would_not_change_are_not_written() {
    let (db, dir) = sample_db("fix-unchanged");
    let before = db.row_versions("tickets");
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "fix",
            "set",
            "status=closed",
            "--status",
            "closed",
            "--apply",
            "--yes",
        ],
    )
    .run();
    let v = run.expect_code(0).json();
    assert_eq!(v["changed"], 0);
    assert!(v["unchanged"].as_u64().unwrap() > 0);
    assert_eq!(db.row_versions("tickets"), before);
}

#[test]
fn refusals_without_confirmation_filters_or_valid_values() {
    let (db, dir) = sample_db("fix-refuse");
    let before = db.checksum("tickets");
    // --apply without a terminal and without --yes.
    let run = ticketops(
        Some(&db),
        &dir,
        &["fix", "set", "status=closed", "--status", "pending", "--apply"],
    )
    .run();
    run.expect_code(2).stderr_has("--yes");
    // No filter and no --all.
    ticketops(Some(&db), &dir, &["fix", "set", "status=closed", "--apply", "--yes"])
        .run()
        .expect_code(2)
        .stderr_has("--all");
    // Invalid values and fields, before anything is written.
    ticketops(
        Some(&db),
        &dir,
        &["fix", "set", "status=bogus", "--all", "--apply", "--yes"],
    )
    .run()
    .expect_code(2)
    .stderr_has("unknown status");
    ticketops(
        Some(&db),
        &dir,
        &["fix", "set", "color=red", "--all", "--apply", "--yes"],
    )
    .run()
    .expect_code(2)
    .stderr_has("cannot set");
    ticketops(
        Some(&db),
        &dir,
        &[
            "fix",
            "set",
            "assignee=nobody@nowhere.example",
            "--all",
            "--apply",
            "--yes",
        ],
    )
    .run()
    .expect_code(2)
    .stderr_has("there is no user");
    ticketops(Some(&db), &dir, &["undo", "999999"]).run().expect_code(2);
    let import_op = db
        .scalar("SELECT min(id) FROM bulk_operations WHERE kind = 'import tickets'")
        .to_string();
    // An import can be undone (a dry run here); a restore cannot.
    ticketops(Some(&db), &dir, &["undo", &import_op]).run().expect_code(0);
    db.execute("UPDATE tickets SET deleted_at = now() WHERE status = 'closed'");
    let restore = ticketops(Some(&db), &dir, &["--json", "restore", "--only-deleted", "--all"]).run();
    let restore_op = restore.expect_code(0).json()["operation_id"]
        .as_i64()
        .unwrap()
        .to_string();
    ticketops(Some(&db), &dir, &["undo", &restore_op])
        .run()
        .expect_code(1)
        .stderr_has("not supported");
    assert_ne!(db.checksum("tickets"), before, "the restore wrote");
}

#[test]
fn reassign_moves_one_agents_tickets_and_undo_moves_them_back() {
    let (db, dir) = sample_db("fix-reassign");
    let original = db.checksum("tickets");
    let from = db.strings(
        "SELECT u.email FROM tickets t JOIN users u ON u.id = t.assignee_id GROUP BY u.email ORDER BY count(*) DESC, 1 LIMIT 1",
    )
    .remove(0);
    let to = "agent1@support.example.org";
    let count = |email: &str| {
        db.scalar(&format!(
            "SELECT count(*) FROM tickets t JOIN users u ON u.id = t.assignee_id WHERE u.email = '{email}'"
        ))
    };
    let (had_from, had_to) = (count(&from), count(to));
    assert!(had_from > 0);
    ticketops(Some(&db), &dir, &["fix", "reassign", "--from", &from, "--to", &from])
        .run()
        .expect_code(2);
    ticketops(
        Some(&db),
        &dir,
        &["fix", "reassign", "--from", "ghost@example.com", "--to", to],
    )
    .run()
    .expect_code(2);
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json", "fix", "reassign", "--from", &from, "--to", to, "--apply", "--yes",
        ],
    )
    .run();
    let v = run.expect_code(0).json();
    assert_eq!(v["changed"].as_i64().unwrap(), had_from);
    assert_eq!(count(&from), 0);
    assert_eq!(count(to), had_to + had_from);
    let op = v["operation_id"].as_i64().unwrap().to_string();
    ticketops(Some(&db), &dir, &["undo", &op, "--apply", "--yes"])
        .run()
        .expect_code(0);
    assert_eq!(db.checksum("tickets"), original);
}

#[test]
fn fix_tag_adds_and_removes_and_undo_gives_back_the_same_tag_sets() {
    let (db, dir) = sample_db("fix-tag");
    let original = tickets_and_tags(&db, "true");
    let tagged = |tag: &str| {
        db.scalar(&format!(
            "SELECT count(*) FROM ticket_tags x JOIN tags g ON g.id = x.tag_id WHERE g.name = '{tag}'"
        ))
    };
    let vip = tagged("vip");
    assert!(vip > 0);
    let open = db.scalar("SELECT count(*) FROM tickets WHERE status = 'open' AND deleted_at IS NULL");
    let open_vip = db.scalar(
        "SELECT count(*) FROM tickets t JOIN ticket_tags x ON x.ticket_id = t.id JOIN tags g ON g.id = x.tag_id
         WHERE g.name = 'vip' AND t.status = 'open'",
    );
    // Dry run: counts and a sample, nothing written (the new tag is not even created).
    let dry = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "fix",
            "tag",
            "--status",
            "open",
            "--add",
            "Escalated",
            "--remove",
            "vip",
        ],
    )
    .run();
    let d = dry.expect_code(0).json();
    assert_eq!(d["would_change"].as_i64().unwrap(), open);
    let first = &d["sample"][0];
    assert!(
        first["after"]["tags"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("escalated"))
    );
    assert_eq!(db.scalar("SELECT count(*) FROM tags WHERE name = 'escalated'"), 0);
    assert_eq!(tickets_and_tags(&db, "true"), original);

    let tag_fix = [
        "fix",
        "tag",
        "--status",
        "open",
        "--add",
        "escalated",
        "--remove",
        "vip",
    ];
    let v = apply(&db, &dir, &tag_fix);
    let op = v["operation_id"].as_i64().unwrap().to_string();
    assert_eq!(v["changed"].as_i64().unwrap(), open);
    assert_eq!(tagged("escalated"), open);
    assert_eq!(tagged("vip"), vip - open_vip);
    // Running it again changes nothing.
    let again = apply(&db, &dir, &tag_fix);
    assert_eq!(again["changed"], 0);
    // A ticket tagged by hand since the fix is a conflict: containment is not equality.
    let touched = db
        .strings(&format!(
            "SELECT row_id::text FROM audit_log WHERE operation_id = {op} ORDER BY id LIMIT 1"
        ))
        .remove(0);
    db.execute(&format!(
        "{} ON CONFLICT DO NOTHING",
        insert_links_sql(&touched, "SELECT id FROM tags WHERE name = 'billing'")
    ));
    let dry = ticketops(Some(&db), &dir, &["--json", "undo", &op]).run();
    assert_eq!(dry.expect_code(0).json()["conflicts"], 1);
    db.execute(&format!(
        "DELETE FROM ticket_tags WHERE ticket_id = {touched} AND tag_id = (SELECT id FROM tags WHERE name = 'billing')
           AND NOT EXISTS (SELECT 1 FROM audit_log WHERE operation_id = {op} AND row_id = {touched}
                           AND after -> 'tag_ids' @> to_jsonb((SELECT id FROM tags WHERE name = 'billing')))"
    ));
    let u = apply(&db, &dir, &["undo", &op]);
    assert_eq!(u["reverted"].as_i64().unwrap(), open);
    assert_eq!(tickets_and_tags(&db, "true"), original);
}

#[test]
fn merge_users_leaves_no_reference_to_the_duplicate_and_undo_brings_it_back() {
    let (db, dir) = sample_db("fix-merge");
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let tables = ["tickets", "comments", "users"];
    let original: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    // The duplicate: a requester who also wrote comments; the canonical user: an agent.
    let dup = db
        .strings(
            "SELECT u.email FROM users u
             JOIN (SELECT author_id AS id, count(*) AS n FROM comments GROUP BY 1) c ON c.id = u.id
             JOIN (SELECT requester_id AS id, count(*) AS n FROM tickets GROUP BY 1) t ON t.id = u.id
             ORDER BY c.n * t.n DESC, 1 LIMIT 1",
        )
        .remove(0);
    let into = "agent1@support.example.org";
    let refs = |email: &str| {
        db.scalar(&format!(
            "SELECT (SELECT count(*) FROM tickets t JOIN users u ON u.id IN (t.requester_id, t.assignee_id)
                     WHERE u.email = '{email}')
                  + (SELECT count(*) FROM comments c JOIN users u ON u.id = c.author_id WHERE u.email = '{email}')"
        ))
    };
    let had = refs(&dup);
    assert!(had > 1);
    for (from, to, why) in [
        (dup.as_str(), dup.as_str(), "same user"),
        ("ghost@example.com", into, "there is no user"),
        (dup.as_str(), "ghost@example.com", "there is no user"),
    ] {
        ticketops(Some(&db), &dir, &["fix", "merge-users", "--from", from, "--into", to])
            .run()
            .expect_code(2)
            .stderr_has(why);
    }
    let dry = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "merge-users", "--from", &dup, "--into", into],
    )
    .run();
    assert_eq!(dry.expect_code(0).json()["would_change"].as_i64().unwrap(), had + 1);
    let v = apply(
        &db,
        &dir,
        &[
            "fix",
            "merge-users",
            "--from",
            &dup,
            "--into",
            into,
            "--batch-size",
            "2",
        ],
    );
    assert_eq!(v["users_deleted"], 1);
    assert_eq!(refs(&dup), 0, "no ticket or comment refers to the duplicate");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM users WHERE email = '{dup}' AND deleted_at IS NOT NULL"
        )),
        1
    );
    let op = v["operation_id"].as_i64().unwrap().to_string();
    apply(&db, &dir, &["undo", &op]);
    let now: Vec<String> = tables.iter().map(|t| db.checksum(t)).collect();
    assert_eq!(now, original);
}

#[test]
fn fix_apply_corrects_rows_rejects_bad_ones_and_accounts_for_every_row() {
    let (db, dir) = sample_db("fix-apply");
    let original = tickets_and_tags(&db, "true");
    let live = |n: u32| {
        db.strings(&format!(
            "SELECT external_id FROM tickets WHERE deleted_at IS NULL ORDER BY id OFFSET {n} LIMIT 1"
        ))
        .remove(0)
    };
    let (a, b, c, d, e, f) = (live(0), live(1), live(2), live(3), live(4), live(5));
    db.execute(&format!(
        "UPDATE tickets SET deleted_at = now() WHERE external_id = '{d}'"
    ));
    let d_status = db
        .strings(&format!("SELECT status::text FROM tickets WHERE external_id = '{d}'"))
        .remove(0);
    let with_deleted = tickets_and_tags(&db, "true");
    let file = dir.join("corrections.csv");
    std::fs::write(
        &file,
        format!(
            "External ID,Status,priority,assignee_email,organization,subject,tags_add,tags_remove,_notes,Channel\n\
             {a},closed,,,,,,,first,\n\
             {b},,Critical,none,Globex,Fixed subject,Escalated;vip,billing,,Phone\n\
             {c},bogus,,,,,,,bad status,\n\
             NOPE-1,open,,,,,,,unknown ticket,\n\
             {e},,,ghost@example.com,,,,,unknown assignee,\n\
             {f},,,,Nowhere Inc,,,,unknown organization,\n\
             {d},open,,,,,,,soft-deleted,\n\
             {a},solved,,,,,,,the last occurrence wins,\n\
             {c},,,,,,,,nothing to change,\n"
        ),
    )
    .unwrap();
    // The dry run writes nothing, but shows the changes.
    let dry = ticketops(Some(&db), &dir, &["--json", "fix", "apply", "corrections.csv"]).run();
    let v = dry.expect_code(3).json();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["would_change"], 2);
    let b_sample = v["sample"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["external_id"] == b.as_str())
        .unwrap();
    assert_eq!(b_sample["after"]["priority"], "urgent");
    assert_eq!(b_sample["after"]["channel"], "phone");
    assert_eq!(b_sample["after"]["organization"], "Globex");
    assert!(
        b_sample["after"]["tags"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("escalated"))
    );
    assert_eq!(tickets_and_tags(&db, "true"), with_deleted);
    assert_eq!(db.scalar("SELECT count(*) FROM tags WHERE name = 'escalated'"), 0);

    // Without a terminal and without --yes it refuses.
    ticketops(Some(&db), &dir, &["fix", "apply", "corrections.csv", "--apply"])
        .run()
        .expect_code(2)
        .stderr_has("--yes");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "apply", "corrections.csv", "--apply", "--yes"],
    )
    .run();
    let v = run.expect_code(3).json();
    assert_accounted(&v, &run);
    assert_eq!(
        outcome(&v),
        [0, 2, 1, 1, 1, 4],
        "inserted, changed, unchanged, duplicate, skipped_deleted, rejected{}",
        run.explain()
    );
    assert_eq!((v["changed"].as_i64(), v["unknown"].as_i64()), (Some(2), Some(1)));
    let rejects = read_rejects(&dir.join("corrections.rejects.csv"));
    let reasons: Vec<(&str, u64, bool)> = rejects
        .iter()
        .map(|(id, line, error)| {
            (
                id.as_str(),
                *line,
                error.contains("status") || error.contains("there is no"),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (c.as_str(), 4, true),
            ("NOPE-1", 5, true),
            (e.as_str(), 6, true),
            (f.as_str(), 7, true)
        ],
        "{rejects:?}"
    );
    let row = |ext: &str| {
        db.strings(&format!(
            "SELECT concat_ws('|', t.status, t.priority, t.channel, coalesce(u.email, '-'), coalesce(o.name, '-'), t.subject,
                    (SELECT string_agg(g.name, ';' ORDER BY g.name) FROM ticket_tags x JOIN tags g ON g.id = x.tag_id
                     WHERE x.ticket_id = t.id))
             FROM tickets t LEFT JOIN users u ON u.id = t.assignee_id LEFT JOIN organizations o ON o.id = t.organization_id
             WHERE t.external_id = '{ext}'"
        ))
        .remove(0)
    };
    assert!(row(&a).starts_with("solved|"), "{}", row(&a));
    let b_now = row(&b);
    assert!(b_now.contains("|urgent|phone|-|Globex|Fixed subject|"), "{b_now}");
    assert!(
        b_now.contains("escalated") && b_now.contains("vip") && !b_now.contains("billing"),
        "{b_now}"
    );
    assert_eq!(
        db.strings(&format!("SELECT status::text FROM tickets WHERE external_id = '{d}'")),
        vec![d_status],
        "a soft-deleted ticket is skipped"
    );

    // Undo gives back exactly the table before the fix.
    let op = v["operation_id"].as_i64().unwrap().to_string();
    apply(&db, &dir, &["undo", &op]);
    assert_eq!(tickets_and_tags(&db, "true"), with_deleted);
    assert_ne!(with_deleted, original);
}

#[test]
fn solving_a_ticket_by_fix_sets_solved_at_and_reopening_clears_it_and_undo_restores_both() {
    let (db, dir) = sample_db("solved-at");
    let before = db.checksum("tickets");
    let open_unsolved = db.scalar("SELECT count(*) FROM tickets WHERE status = 'open' AND solved_at IS NULL");
    assert!(open_unsolved > 0);
    let solve = apply(&db, &dir, &["fix", "set", "status=solved", "--status", "open"]);
    assert_eq!(
        solve["changed"].as_i64().unwrap(),
        db.scalar("SELECT count(*) FROM tickets WHERE last_operation_id = (SELECT max(id) FROM bulk_operations)")
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE status = 'solved' AND solved_at IS NULL"),
        0,
        "every solved ticket has a solved_at"
    );
    let kept =
        db.scalar("SELECT count(*) FROM tickets WHERE status = 'solved' AND solved_at < now() - interval '1 day'");
    assert!(kept > 0, "a solved_at already there is kept");
    let reopen = apply(&db, &dir, &["fix", "set", "status=open", "--status", "solved"]);
    assert!(reopen["changed"].as_i64().unwrap() > 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE status = 'open' AND solved_at IS NOT NULL"),
        0
    );
    for op in [reopen["operation_id"].to_string(), solve["operation_id"].to_string()] {
        apply(&db, &dir, &["undo", &op]);
    }
    assert_eq!(
        db.checksum("tickets"),
        before,
        "undo gives back status, solved_at and the rest"
    );
}

#[test]
fn an_export_edited_in_a_spreadsheet_applies_as_it_is_and_undoes() {
    let (db, dir) = dataset();
    let before = tickets_and_tags(&db, "true");
    ticketops(Some(&db), &dir, &["export", "tickets", "-o", "all.csv"])
        .run()
        .expect_code(0);
    // Unedited, the export changes nothing and rejects nothing.
    let same = ticketops(Some(&db), &dir, &["--json", "fix", "apply", "all.csv"]).run();
    let v = same.expect_code(0).json();
    assert_eq!(
        (v["would_change"].as_u64(), v["rejected"].as_u64()),
        (Some(0), Some(0)),
        "{}",
        same.explain()
    );

    // Edit it as a spreadsheet would: the tags cell is the whole set.
    let mut reader = csv::Reader::from_path(dir.join("all.csv")).unwrap();
    let header = reader.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let mut writer = csv::Writer::from_path(dir.join("edited.csv")).unwrap();
    writer.write_record(&header).unwrap();
    for record in reader.records() {
        let mut row: Vec<String> = record.unwrap().iter().map(String::from).collect();
        match row[0].as_str() {
            "C-1" => row[col("tags")] = "billing;new-tag".into(),
            "C-3" => row[col("tags")] = String::new(),
            "C-5" => {
                row[col("status")] = "solved".into();
                row[col("description")] = "Edited in a spreadsheet".into();
            }
            "C-2" => row[col("created_at")] = "2020-01-01T00:00:00.000000Z".into(),
            "C-4" => row[col("requester_email")] = "someone@example.com".into(),
            _ => {}
        }
        writer.write_record(&row).unwrap();
    }
    writer.flush().unwrap();
    let applied = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "apply", "edited.csv", "--apply", "--yes"],
    )
    .run();
    let v = applied.expect_code(3).json();
    assert_eq!(v["changed"], 3, "{v}");
    assert_eq!(v["rejected"], 2, "{v}");
    let tags = |id: &str| {
        db.strings(&format!(
            "SELECT coalesce(string_agg(g.name, ';' ORDER BY g.name), '') FROM tickets t
             LEFT JOIN ticket_tags x ON x.ticket_id = t.id LEFT JOIN tags g ON g.id = x.tag_id
             WHERE t.external_id = '{id}'"
        ))
        .remove(0)
    };
    assert_eq!(tags("C-1"), "billing;new-tag");
    assert_eq!(tags("C-3"), "");
    assert_eq!(
        db.strings("SELECT status::text || ' ' || description || ' ' || (solved_at IS NOT NULL) FROM tickets WHERE external_id = 'C-5'"),
        set(&["solved Edited in a spreadsheet true"]),
        "the status rule gives a solved ticket its solved_at"
    );
    let rejects = read_rejects(&dir.join("edited.rejects.csv"));
    let reasons: Vec<(String, String)> = rejects.iter().map(|(id, _, why)| (id.clone(), why.clone())).collect();
    assert!(
        reasons
            .iter()
            .any(|(id, why)| id == "C-2" && why.contains("cannot change created_at")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(id, why)| id == "C-4" && why.contains("cannot change requester_email")),
        "{reasons:?}"
    );
    // The same file again: nothing more to change (a blank solved_at is not an edit).
    let again = ticketops(Some(&db), &dir, &["--json", "fix", "apply", "edited.csv"]).run();
    let v2 = again.expect_code(3).json();
    assert_eq!(
        (v2["would_change"].as_u64(), v2["rejected"].as_u64()),
        (Some(0), Some(2))
    );
    apply(&db, &dir, &["undo", &v["operation_id"].to_string()]);
    assert_eq!(
        tickets_and_tags(&db, "true"),
        before,
        "undo gives back tags, description and solved_at"
    );

    // A column fix apply does not know, or both tag forms: the file is refused, nothing read.
    std::fs::write(dir.join("notes.csv"), "external_id,status,notes\nC-1,open,call back\n").unwrap();
    ticketops(Some(&db), &dir, &["fix", "apply", "notes.csv"])
        .run()
        .expect_code(2)
        .stderr_has("does not know the column(s) notes");
    std::fs::write(dir.join("both.csv"), "external_id,tags,tags_add\nC-1,a,b\n").unwrap();
    ticketops(Some(&db), &dir, &["fix", "apply", "both.csv"])
        .run()
        .expect_code(2)
        .stderr_has("both a tags column");
    assert_eq!(tickets_and_tags(&db, "true"), before);
}

#[test]
fn an_ids_file_over_many_batches_selects_exactly_its_tickets_with_the_other_filters() {
    // Batches take the listed tickets a window at a time (read once); the other filters and the
    // deleted scope still apply to each.
    let dir = scratch("fix-ids-batches");
    let db = TestDb::new();
    let file = generate(&dir, "tickets.csv", &["tickets", "--rows", "300", "--seed", "43"]);
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let rows = db.json("SELECT id, external_id FROM tickets ORDER BY id");
    // Every third ticket by external_id, every seventh by id alone, and values that match nothing.
    let mut list = String::from("external_id,id\n");
    for (n, row) in rows.iter().enumerate() {
        if n % 3 == 0 {
            list.push_str(&format!("{},\n", row["external_id"].as_str().unwrap()));
        } else if n % 7 == 0 {
            list.push_str(&format!(",{}\n", row["id"]));
        }
    }
    list.push_str("NO-SUCH-TICKET,\n,999999999\n");
    std::fs::write(dir.join("ids.csv"), list).unwrap();
    let listed = "(SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM tickets) o
                   WHERE n % 3 = 0 OR n % 7 = 0)";
    db.execute(&format!(
        "UPDATE tickets SET deleted_at = now() WHERE id IN {listed} AND id % 5 = 0;
         UPDATE tickets SET deleted_at = now() WHERE id NOT IN {listed} AND id % 11 = 0"
    ));
    let expected = db.strings(&format!(
        "SELECT external_id FROM tickets WHERE id IN {listed} AND status = 'open' AND deleted_at IS NULL
         AND priority <> 'urgent' ORDER BY 1"
    ));
    assert!(expected.len() > 10, "{expected:?}");
    let before = db.strings("SELECT external_id || ' ' || priority FROM tickets ORDER BY 1");
    let summary = apply(
        &db,
        &dir,
        &[
            "fix",
            "set",
            "priority=urgent",
            "--ids-file",
            "ids.csv",
            "--status",
            "open",
            "--batch-size",
            "7",
        ],
    );
    assert_eq!(summary["changed"].as_u64(), Some(expected.len() as u64), "{summary}");
    let after = db.strings("SELECT external_id || ' ' || priority FROM tickets ORDER BY 1");
    let changed: Vec<String> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(changed, expected);
    // Restoring by the same file brings back exactly its deleted tickets, a few per batch.
    let deleted = db.scalar(&format!(
        "SELECT count(*) FROM tickets WHERE id IN {listed} AND deleted_at IS NOT NULL"
    ));
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "restore",
            "--ids-file",
            "ids.csv",
            "--only-deleted",
            "--batch-size",
            "4",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["restored"].as_i64(), Some(deleted));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM tickets WHERE id NOT IN {listed} AND deleted_at IS NOT NULL"
        )),
        db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL"),
        "the unlisted deleted tickets stay deleted"
    );
    // And a soft-delete by it, with another filter, a few per batch.
    let open_listed = db.scalar(&format!(
        "SELECT count(*) FROM tickets WHERE id IN {listed} AND status = 'open' AND deleted_at IS NULL"
    ));
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--ids-file",
            "ids.csv",
            "--status",
            "open",
            "--batch-size",
            "5",
        ],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"].as_i64(), Some(open_listed));
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM tickets WHERE deleted_at IS NOT NULL AND id IN {listed} AND status = 'open'"
        )),
        open_listed
    );
}
