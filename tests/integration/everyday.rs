//! Everyday use: completions and manual pages, the operations history, cron-ready JSON,
//! connection errors that say what to do, libpq's environment.

use crate::support::*;

#[test]
fn completions_load_in_bash_and_the_manual_renders() {
    let dir = scratch("completions");
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let run = ticketops(None, &dir, &["completions", shell]).run();
        run.expect_code(0);
        assert!(run.stdout.contains("ticketops"), "{}", run.explain());
    }
    let script = dir.join("ticketops.bash");
    std::fs::write(&script, ticketops(None, &dir, &["completions", "bash"]).run().stdout).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p ticketops", script.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("_ticketops"),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let run = ticketops(None, &dir, &["man"]).run();
    run.expect_code(0);
    assert!(run.stdout.contains(".TH ticketops 1"), "{}", run.explain());
    let pages = dir.join("man");
    ticketops(None, &dir, &["man", "--out", pages.to_str().unwrap()])
        .run()
        .expect_code(0);
    assert!(pages.join("ticketops.1").exists() && pages.join("ticketops-import.1").exists());
}

#[test]
fn ops_list_filters_by_kind_prefix_status_and_age() {
    let db = TestDb::new();
    let dir = scratch("ops-filters");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    ticketops(
        Some(&db),
        &dir,
        &["fix", "set", "priority=low", "--status", "new", "--apply", "--yes"],
    )
    .run()
    .expect_code(0);
    db.execute("UPDATE bulk_operations SET started_at = now() - interval '10 days' WHERE kind = 'import tickets'");
    let kinds = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["--json", "ops", "list"];
        all.extend_from_slice(args);
        let run = ticketops(Some(&db), &dir, &all).run();
        run.expect_code(0).json()["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kinds(&["--kind", "fix"]), vec!["fix set"]);
    assert_eq!(kinds(&["--kind", "import"]), vec!["import tickets"]);
    assert_eq!(kinds(&["--since", "1d"]), vec!["fix set"]);
    assert_eq!(kinds(&["--status", "succeeded"]).len(), 2);
    assert!(kinds(&["--status", "failed"]).is_empty());
    ticketops(Some(&db), &dir, &["ops", "list", "--kind", "nonsense"])
        .run()
        .expect_code(2)
        .stderr_has("the kinds are");
    let table = ticketops(Some(&db), &dir, &["ops", "list"]).run();
    assert!(table.expect_code(0).stdout.contains("duration"), "{}", table.explain());
}

#[test]
fn every_json_line_says_when_and_where_and_whether_more_is_left() {
    let db = TestDb::new();
    let dir = scratch("cron-json");
    let (run, summary) = import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    run.expect_code(3);
    for key in ["started_at", "finished_at"] {
        assert!(summary[key].is_string(), "{key}: {summary}");
    }
    assert_eq!(summary["database"]["name"], db.name.as_str());
    assert_eq!(summary["database"]["host"], "127.0.0.1");
    // A run stopped at --max-rows: exit 0, and the JSON says there is more to do.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "soft-delete",
            "--all",
            "--max-rows",
            "10",
            "--batch-size",
            "5",
        ],
    )
    .run();
    let s = run.expect_code(0).json();
    assert_eq!(s["stopped"], "max-rows");
    assert_eq!(s["more_to_do"], true);
    assert!(s["finished_at"].is_string() && s["database"]["port"].is_u64(), "{s}");
    let run = ticketops(Some(&db), &dir, &["--json", "cleanup", "soft-delete", "--all"]).run();
    assert_eq!(run.expect_code(0).json()["more_to_do"], false);
    // A failure is one JSON line too, with where it failed.
    let run = ticketops(Some(&db), &dir, &["--json", "undo", "99999"]).run();
    let s = run.expect_code(2).json();
    assert_eq!(s["status"], "failed");
    assert_eq!(s["exit_code"], 2);
    assert_eq!(s["database"]["name"], db.name.as_str());
}

#[test]
fn connection_errors_say_what_to_do_and_libpq_environment_works() {
    let db = TestDb::new();
    let dir = scratch("conn-hints");
    let port = db.json("SELECT inet_server_port() AS port")[0]["port"]
        .as_i64()
        .unwrap()
        .to_string();
    let base = format!("postgres://ticketops@127.0.0.1:{port}");
    let cases = [
        (format!("{base}/no_such_database"), "check the database name"),
        (
            format!("postgres://no_such_role@127.0.0.1:{port}/{}", db.name),
            "check the user name",
        ),
        ("postgres://u@127.0.0.1:1/x".to_string(), "is the server running"),
    ];
    for (url, hint) in cases {
        let run = ticketops(None, &dir, &["report", "summary"])
            .env("DATABASE_URL", &url)
            .run();
        run.expect_code(1).stderr_has(hint);
        assert!(
            !run.stderr.contains("scripts/"),
            "a user message points at developer scripts{}",
            run.explain()
        );
    }
    // Without DATABASE_URL, libpq's environment names the server, as for psql.
    let run = ticketops(None, &dir, &["--json", "report", "summary"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", &port)
        .env("PGUSER", "ticketops")
        .env("PGDATABASE", &db.name)
        .run();
    run.expect_code(0);
    // And with nothing at all, a usage error that says what to set.
    ticketops(None, &dir, &["report", "summary"])
        .run()
        .expect_code(2)
        .stderr_has("DATABASE_URL");
}

#[test]
fn long_jobs_show_progress_on_a_terminal_and_log_lines_without_one() {
    let db = TestDb::new();
    let dir = scratch("progress");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    let open = db.scalar("SELECT count(*) FROM tickets WHERE status = 'open' AND deleted_at IS NULL");
    let pending = db.scalar("SELECT count(*) FROM tickets WHERE status = 'pending' AND deleted_at IS NULL");
    assert!(open > 5 && pending > 5);
    // Under a pseudo-terminal (script(1)), a bar with rows done of the total (counted first),
    // rate and ETA is drawn.
    let typescript = dir.join("typescript");
    let command = format!("{BIN} cleanup soft-delete --status open --batch-size 5 --sleep 150ms");
    let status = std::process::Command::new("script")
        .args(["-qec", &command, typescript.to_str().unwrap()])
        .env("DATABASE_URL", &db.url)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(
        screen.contains("cleanup soft-delete: [")
            && screen.contains(&format!("5/{open} rows"))
            && screen.contains("rows/s")
            && screen.contains("ETA"),
        "no progress bar on the terminal: {screen:?}"
    );
    // --progress always draws without a terminal too.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "--progress",
            "always",
            "cleanup",
            "soft-delete",
            "--status",
            "new",
            "--batch-size",
            "5",
            "--sleep",
            "150ms",
        ],
    )
    .run();
    run.expect_code(0);
    assert!(run.stderr.contains("rows/s"), "{}", run.explain());
    // Without one, -v prints a line per batch: RFC 3339 time, batch number, rows so far, rate.
    let run = ticketops(
        Some(&db),
        &dir,
        &[
            "-v",
            "cleanup",
            "soft-delete",
            "--status",
            "pending",
            "--batch-size",
            "5",
        ],
    )
    .run();
    run.expect_code(0);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("batch 1:"))
        .unwrap_or_else(|| panic!("no batch line{}", run.explain()));
    let stamp = line.split_whitespace().next().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(stamp).is_ok(), "{line}");
    assert!(
        line.contains(&format!("(5 of {pending} in all")) && line.contains("rows/s"),
        "{line}"
    );
    assert!(!run.stderr.contains('\r'), "no bar without a terminal{}", run.explain());
}

#[test]
fn small_usage_errors_say_the_right_thing() {
    let db = TestDb::new();
    let dir = scratch("small-errors");
    let run = ticketops(Some(&db), &dir, &["fix", "set", "status=bogus", "--all"]).run();
    run.expect_code(2).stderr_has("expected one of new, open");
    assert!(
        !run.stderr.contains("--value-map"),
        "fix set has no --value-map{}",
        run.explain()
    );
    ticketops(Some(&db), &dir, &["fix", "apply", "-"])
        .run()
        .expect_code(2)
        .stderr_has("needs a file, not stdin");
    ticketops(Some(&db), &dir, &["--json", "report", "summary", "--format", "table"])
        .run()
        .expect_code(2)
        .stderr_has("--format table");
}

#[test]
fn tickets_list_pages_through_exactly_what_the_filters_select() {
    let db = TestDb::new();
    let dir = scratch("tickets-list");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    for (sort, desc, order) in [
        ("created", false, "created_at, id"),
        ("updated", true, "updated_at DESC, id DESC"),
        ("id", true, "id DESC"),
    ] {
        let expected = db.strings(&format!(
            "SELECT external_id FROM tickets WHERE status IN ('new', 'open') AND deleted_at IS NULL ORDER BY {order}"
        ));
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut args = vec![
                "--json", "tickets", "list", "--status", "new,open", "--sort", sort, "--limit", "7",
            ];
            if desc {
                args.push("--desc");
            }
            if let Some(a) = &after {
                args.extend(["--after", a.as_str()]);
            }
            let page = ticketops(Some(&db), &dir, &args).run().expect_code(0).json();
            got.extend(
                page["tickets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["external_id"].as_str().unwrap().to_string()),
            );
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
            assert!(got.len() <= expected.len(), "more pages than tickets");
        }
        assert_same_rows(&got, &expected, &format!("pages sorted by {sort}"));
        let count = ticketops(
            Some(&db),
            &dir,
            &["--json", "tickets", "list", "--status", "new,open", "--count"],
        )
        .run()
        .expect_code(0)
        .json();
        assert_eq!(count["count"].as_u64().unwrap() as usize, expected.len());
    }
    let csv = ticketops(
        Some(&db),
        &dir,
        &["tickets", "list", "--tag", "vip", "--format", "csv", "--limit", "1000"],
    )
    .run();
    let rows = csv.expect_code(0).stdout.lines().count() as i64 - 1;
    assert_eq!(
        rows,
        db.scalar("SELECT count(*) FROM tickets t JOIN ticket_tags x ON x.ticket_id = t.id JOIN tags g ON g.id = x.tag_id WHERE g.name = 'vip' AND t.deleted_at IS NULL")
    );
    ticketops(
        Some(&db),
        &dir,
        &["tickets", "list", "--sort", "created", "--after", "garbage"],
    )
    .run()
    .expect_code(1)
    .stderr_has("not a cursor");
}

#[test]
fn tickets_show_gives_fields_tags_comments_and_history() {
    let db = TestDb::new();
    let dir = scratch("tickets-show");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let id = db
        .strings(
            "SELECT t.external_id FROM tickets t WHERE EXISTS (SELECT 1 FROM comments c WHERE c.ticket_id = t.id)
         AND EXISTS (SELECT 1 FROM ticket_tags x WHERE x.ticket_id = t.id) ORDER BY t.id LIMIT 1",
        )
        .remove(0);
    let fix = apply(
        &db,
        &dir,
        &["fix", "set", "priority=urgent", "--ids-file", &{
            let f = dir.join("ids.csv");
            std::fs::write(&f, format!("external_id\n{id}\n")).unwrap();
            f.to_str().unwrap().to_string()
        }],
    );
    let shown = ticketops(Some(&db), &dir, &["--json", "tickets", "show", &id, "--comments", "1"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(shown["external_id"], id.as_str());
    assert_eq!(shown["priority"], "urgent");
    let tags: Vec<String> = db.strings(&format!(
        "SELECT g.name FROM tags g JOIN ticket_tags x ON x.tag_id = g.id JOIN tickets t ON t.id = x.ticket_id
         WHERE t.external_id = '{id}' ORDER BY g.name"
    ));
    assert_eq!(shown["tags"], serde_json::json!(tags));
    assert_eq!(shown["comments"].as_array().unwrap().len(), 1);
    assert_eq!(
        shown["comment_count"].as_i64().unwrap(),
        db.scalar(&format!(
            "SELECT count(*) FROM comments c JOIN tickets t ON t.id = c.ticket_id WHERE t.external_id = '{id}'"
        ))
    );
    let kinds: Vec<&str> = shown["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["import tickets", "fix set"], "{shown}");
    assert_eq!(shown["operations"][1]["id"], fix["operation_id"]);
    let text = ticketops(Some(&db), &dir, &["tickets", "show", &id]).run();
    text.expect_code(0);
    assert!(
        text.stdout.contains("history:") && text.stdout.contains("fix set"),
        "{}",
        text.explain()
    );
    ticketops(Some(&db), &dir, &["tickets", "show", "NO-SUCH-TICKET"])
        .run()
        .expect_code(2)
        .stderr_has("there is no ticket");
}

#[test]
fn ops_show_changes_lists_every_changed_value_by_external_id() {
    let db = TestDb::new();
    let dir = scratch("ops-changes");
    let (_, imported) = import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    let changes = |op: &serde_json::Value| -> Vec<serde_json::Value> {
        let run = ticketops(
            Some(&db),
            &dir,
            &["--json", "ops", "show", &op.to_string(), "--changes"],
        )
        .run();
        run.expect_code(0).json()["changes"].as_array().unwrap().clone()
    };
    // An import: one (inserted) line per inserted ticket, by external_id.
    let inserted = changes(&imported["operation_id"]);
    assert_eq!(inserted.len() as u64, imported["inserted"].as_u64().unwrap());
    assert!(
        inserted
            .iter()
            .all(|c| c["field"] == "(inserted)" && c["key"].as_str().unwrap().starts_with("T-"))
    );
    // A fix: the changed field of each changed ticket, before and after.
    let fix = apply(&db, &dir, &["fix", "set", "priority=urgent", "--status", "on_hold"]);
    let fixed = changes(&fix["operation_id"]);
    let priority: Vec<&serde_json::Value> = fixed.iter().filter(|c| c["field"] == "priority").collect();
    assert_eq!(priority.len() as i64, fix["changed"].as_i64().unwrap());
    assert!(
        priority
            .iter()
            .all(|c| c["after"] == "urgent" && c["before"] != "urgent")
    );
    let key = priority[0]["key"].as_str().unwrap();
    assert_eq!(
        db.strings(&format!(
            "SELECT priority::text FROM tickets WHERE external_id = '{key}'"
        )),
        vec!["urgent"]
    );
    // A soft-delete: deleted_at of every ticket, in CSV too.
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
            "7",
        ],
    )
    .run();
    let deleted = run.expect_code(0).json();
    let csv = ticketops(
        Some(&db),
        &dir,
        &[
            "ops",
            "show",
            &deleted["operation_id"].to_string(),
            "--changes",
            "--format",
            "csv",
        ],
    )
    .run();
    let lines: Vec<&str> = csv.expect_code(0).stdout.lines().collect();
    assert_eq!(lines[0], "table,key,field,before,after");
    assert_eq!(lines.len() as u64 - 1, deleted["soft_deleted"].as_u64().unwrap());
    assert!(
        lines[1..].iter().all(|l| l.contains(",deleted_at,,")),
        "{}",
        csv.explain()
    );
}

#[test]
fn the_confirmation_shows_the_count_and_a_sample_and_reads_y_or_n() {
    let db = TestDb::new();
    let dir = scratch("confirm");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    let before = db.checksum("tickets");
    // script(1) gives the binary a terminal; its stdin feeds the answer to it.
    let ask = |command: &str, reply: &str| -> String {
        let typescript = dir.join(format!("confirm-{}", reply.trim()));
        let mut child = std::process::Command::new("script")
            .args(["-qec", &format!("{BIN} {command}"), typescript.to_str().unwrap()])
            .env("DATABASE_URL", &db.url)
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        std::io::Write::write_all(&mut stdin, reply.as_bytes()).unwrap();
        drop(stdin);
        child.wait().unwrap();
        String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).replace('\r', "")
    };
    let answer = |reply: &str| ask("fix set priority=low --status on_hold --apply", reply);
    let screen = answer("n\n");
    assert!(screen.contains("Continue? [y/N]"), "{screen}");
    assert!(
        screen.contains("external_id") && screen.contains("priority=low"),
        "the sample is shown: {screen}"
    );
    assert!(screen.contains("nothing was written"), "{screen}");
    assert_eq!(db.checksum("tickets"), before, "no means no");
    let screen = answer("y\n");
    assert!(screen.contains("fix set: succeeded"), "{screen}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE status = 'on_hold' AND priority <> 'low'"),
        0
    );
    let after_fix = db.checksum("tickets");

    // undo and merge-users ask the same way, with a sample.
    let op = db.scalar("SELECT max(id) FROM bulk_operations");
    let screen = ask(&format!("undo {op} --apply"), "n\n");
    assert!(screen.contains("Continue? [y/N]"), "{screen}");
    assert!(
        screen.contains("after undo") && screen.contains("priority") && screen.contains("low"),
        "the values the undo puts back are shown: {screen}"
    );
    assert!(screen.contains("nothing was written"), "{screen}");
    assert_eq!(db.checksum("tickets"), after_fix, "no means no");
    let (from, into) = (
        db.strings("SELECT r.email FROM tickets t JOIN users r ON r.id = t.requester_id ORDER BY t.id LIMIT 1")
            .remove(0),
        db.strings("SELECT email FROM users WHERE role = 'agent' ORDER BY id LIMIT 1")
            .remove(0),
    );
    let screen = ask(&format!("fix merge-users --from {from} --into {into} --apply"), "n\n");
    assert!(screen.contains("Continue? [y/N]"), "{screen}");
    assert!(
        screen.contains("requester=") && screen.contains(&into),
        "the tickets that would move are shown: {screen}"
    );
    assert_eq!(db.checksum("tickets"), after_fix, "no means no");
}

#[test]
fn compressed_dumps_import_as_they_are_and_resume() {
    use std::io::Write;
    let dir = scratch("compressed");
    let plain = generate(
        &dir,
        "t.csv",
        &["tickets", "--rows", "40000", "--seed", "41", "--bad-share", "0.01"],
    );
    let bytes = std::fs::read(&plain).unwrap();
    let gz = dir.join("t.csv.gz");
    let mut encoder = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    encoder.write_all(&bytes).unwrap();
    encoder.finish().unwrap();
    // zstd, under a name that does not say so: the content decides.
    let zst = dir.join("t-zstd.csv");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 1).unwrap()).unwrap();

    let reference = TestDb::new();
    let (_, expected) = import(&reference, &dir, "tickets", &plain, &["--rejects", "plain.rejects.csv"]);
    for file in [&gz, &zst] {
        let db = TestDb::new();
        let (run, summary) = import(&db, &dir, "tickets", file, &[]);
        run.expect_code(3);
        assert_eq!(outcome(&summary), outcome(&expected), "{}", file.display());
        assert_same_rows(&db.ticket_snapshot(), &reference.ticket_snapshot(), "compressed import");
    }
    assert!(
        dir.join("t.rejects.csv").exists(),
        "dump.csv.gz rejects go to dump.rejects.csv"
    );
    // From stdin (`zcat` not needed): the content decides there too.
    for file in [&gz, &zst] {
        let db = TestDb::new();
        let run = ticketops(
            Some(&db),
            &dir,
            &["--json", "import", "tickets", "-", "--rejects", "stdin.rejects.csv"],
        )
        .stdin(std::fs::read(file).unwrap())
        .run();
        run.expect_code(3);
        assert_eq!(outcome(&run.json()), outcome(&expected), "stdin {}", file.display());
        assert_same_rows(&db.ticket_snapshot(), &reference.ticket_snapshot(), "compressed stdin");
    }
    // Killed mid-import, then --resume: the compressed stream is read up to where it stopped.
    let db = TestDb::new();
    let mut child = ticketops(
        Some(&db),
        &dir,
        &[
            "import",
            "tickets",
            gz.to_str().unwrap(),
            "--batch-size",
            "500",
            "--rejects",
            "gz.csv",
        ],
    )
    .spawn();
    wait_for_checkpoint(&db, &mut child);
    kill(&child, "-KILL");
    child.wait().unwrap();
    let (run, _) = import(
        &db,
        &dir,
        "tickets",
        &gz,
        &["--resume", "--batch-size", "500", "--rejects", "gz.csv"],
    );
    run.expect_code(3).stderr_has("resuming operation");
    assert_same_rows(
        &db.ticket_snapshot(),
        &reference.ticket_snapshot(),
        "compressed import resumed",
    );
    assert_eq!(
        read_rejects(&dir.join("gz.csv")),
        read_rejects(&dir.join("plain.rejects.csv"))
    );
}
