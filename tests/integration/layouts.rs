//! The same commands on every layout. One sequence of dirty imports, re-imports, fixes,
//! cleanups and undos, run by each layout's suite, leaves a record of what a user sees: each
//! command's exit code and JSON summary, the exports, the archives and the rejects files. What
//! differs by design is left out of it: timings, paths, the database's name, how many batches a
//! run took and which partitions a retention dropped whole, timestamps the run itself wrote
//! (`updated_at` of a fix), and the order of records in a file. `scripts/test` compares the
//! records of the layouts it ran, and any difference fails the suite. Run by hand against
//! generated data, this comparison found a comment archive's `public` written as t/f on one
//! path, the Citus count of an import undo's conflicts, and an undo that failed on a purged
//! ticket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

/// Where each layout's suite leaves its record (`scripts/test` reads them there).
fn record_path() -> PathBuf {
    project_dir()
        .join("target")
        .join("layout-records")
        .join(format!("{}.txt", layout()))
}

/// What the sequence showed, section by section.
#[derive(Default)]
struct Record {
    sections: Vec<(String, Vec<String>)>,
}

impl Record {
    fn add(&mut self, name: &str, lines: Vec<String>) {
        self.sections.push((name.to_string(), lines));
    }

    /// A CSV file's header and its records sorted, recent timestamps replaced.
    fn file(&mut self, name: &str, path: &Path) {
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(false)
            .from_path(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut records: Vec<String> = reader
            .byte_records()
            .map(|r| {
                let r = r.unwrap();
                r.iter()
                    .map(|f| normalize_field(&String::from_utf8_lossy(f)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect();
        let header = if records.is_empty() {
            Vec::new()
        } else {
            vec![records.remove(0)]
        };
        records.sort();
        self.add(name, [header, records].concat());
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, lines) in &self.sections {
            out.push_str(&format!("== {name}\n"));
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// A timestamp the run wrote itself (within the last two days: the generated data ends in 2024)
/// reads `(now)`; anything else stays. Every date the sequence names is absolute too: the
/// layouts' suites run minutes apart, and an age like `400d` would move between them.
fn normalize_field(field: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(field) {
        Ok(t) if chrono::Utc::now().signed_duration_since(t) < chrono::Duration::days(2) => "(now)".into(),
        _ => field.to_string(),
    }
}

/// A summary without what differs by design (see the module's comment).
fn normalize_summary(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    !(k.ends_with("_ms")
                        || k.ends_with("_at")
                        || k.ends_with("file")
                        || k.starts_with("archive")
                        || [
                            "database",
                            "rows_per_sec",
                            "batches",
                            "retries",
                            "partitions_dropped",
                            "since",
                            // No fingerprints on the distributed layout (Citus runs no
                            // triggers to forget them): the same rows unchanged, unparsed or not.
                            "unchanged_by_fingerprint",
                        ]
                        .contains(&k.as_str()))
                })
                .map(|(k, v)| (k.clone(), normalize_summary(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalize_summary).collect()),
        other => other.clone(),
    }
}

/// The corrections a person would make in a spreadsheet of exported tickets.
fn edit_export(exported: &Path, edited: &Path) {
    let mut reader = csv::Reader::from_path(exported).unwrap();
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (status, priority, tags, subject) = (column("status"), column("priority"), column("tags"), column("subject"));
    let mut writer = csv::Writer::from_path(edited).unwrap();
    writer.write_record(&header).unwrap();
    for (n, record) in reader.records().enumerate() {
        let mut row: Vec<String> = record.unwrap().iter().map(String::from).collect();
        if n % 3 == 0 {
            row[status] = "solved".into();
        }
        if n % 5 == 0 {
            row[priority] = "urgent".into();
        }
        if n % 7 == 0 {
            row[tags] = format!("fixed;{}", row[tags]);
        }
        if n % 11 == 0 {
            row[subject] = format!("{} [edited]", row[subject]);
        }
        if n == 1 {
            row[status] = "bogus".into();
        }
        writer.write_record(&row).unwrap();
    }
    writer.flush().unwrap();
}

#[test]
fn the_same_commands_leave_the_same_record_on_every_layout() {
    let db = TestDb::new();
    let dir = scratch("layout-record");
    let tickets = |name: &str, seed: &str| {
        let args = [
            "tickets",
            "--rows",
            "3000",
            "--seed",
            seed,
            "--bad-share",
            "0.03",
            "--duplicate-share",
            "0.05",
            "--users",
            "300",
            "--start",
            "2023-01-01",
        ];
        generate(&dir, name, &args)
    };
    generate(
        &dir,
        "users.csv",
        &["users", "--rows", "300", "--seed", "7", "--bad-share", "0.02"],
    );
    tickets("first.csv", "7");
    tickets("second.csv", "8");
    let comments = ["comments", "--tickets", "3000", "--bad-share", "0.02", "--rows"];
    generate(&dir, "c1.csv", &[&comments[..], &["1500", "--seed", "7"]].concat());
    generate(&dir, "c2.csv", &[&comments[..], &["800", "--seed", "9"]].concat());
    // Some rows are bad on purpose (invalid UTF-8 among them).
    let second = String::from_utf8_lossy(&std::fs::read(dir.join("second.csv")).unwrap()).into_owned();
    let listed: Vec<&str> = second
        .lines()
        .filter(|l| l.starts_with("T-"))
        .filter_map(|l| l.split(',').next())
        .step_by(40)
        .collect();
    std::fs::write(dir.join("ids.csv"), format!("external_id\n{}\n", listed.join("\n"))).unwrap();

    let mut record = Record::default();
    let mut operations: BTreeMap<&str, String> = BTreeMap::new();
    let mut step = |name: &'static str, args: &[&str]| {
        let run = ticketops(Some(&db), &dir, &[&["--json"], args].concat()).run();
        assert!(
            matches!(run.code, 0 | 3) && !run.stderr.contains("panicked"),
            "{name}: {}",
            run.explain()
        );
        let summary = run.json();
        if args[0] == "import" {
            assert_accounted(&summary, &run);
        }
        if let Some(id) = summary["operation_id"].as_i64() {
            operations.insert(name, id.to_string());
        }
        record.add(
            name,
            vec![format!("exit {}", run.code), normalize_summary(&summary).to_string()],
        );
        operations.clone()
    };
    step("users", &["import", "users", "users.csv", "--rejects", "users.rej"]);
    step(
        "first",
        &[
            "import",
            "tickets",
            "first.csv",
            "--jobs",
            "2",
            "--rejects",
            "first.rej",
        ],
    );
    step("comments", &["import", "comments", "c1.csv", "--rejects", "c1.rej"]);
    step(
        "first again",
        &["import", "tickets", "first.csv", "--rejects", "again.rej"],
    );
    step(
        "second",
        &["import", "tickets", "second.csv", "--rejects", "second.rej"],
    );
    step(
        "comments again",
        &["import", "comments", "c2.csv", "--rejects", "c2.rej"],
    );
    let apply_args = ["--apply", "--yes"];
    let fix_set = [
        "fix",
        "set",
        "priority=high",
        "assignee=agent5@support.example.org",
        "--status",
        "pending",
        "--priority",
        "low",
    ];
    step("fix set", &[&fix_set[..], &apply_args].concat());
    let fix_tag = [
        "fix",
        "tag",
        "--channel",
        "email",
        "--created-before",
        "2023-09-01",
        "--add",
        "layout-tag",
        "--remove",
        "billing",
    ];
    step("fix tag", &[&fix_tag[..], &apply_args].concat());
    ticketops(
        Some(&db),
        &dir,
        &["export", "tickets", "--ids-file", "ids.csv", "-o", "selected.csv"],
    )
    .run()
    .expect_code(0);
    edit_export(&dir.join("selected.csv"), &dir.join("edits.csv"));
    step(
        "fix apply",
        &[
            &["fix", "apply", "edits.csv", "--rejects", "apply.rej"],
            &apply_args[..],
        ]
        .concat(),
    );
    let ops = step(
        "soft-delete",
        &[
            "cleanup",
            "soft-delete",
            "--status",
            "closed",
            "--created-before",
            "2024-01-01",
        ],
    );
    step("restore", &["restore", "--operation", &ops["soft-delete"]]);
    step(
        "soft-delete again",
        &[
            "cleanup",
            "soft-delete",
            "--status",
            "solved",
            "--created-before",
            "2024-06-01",
        ],
    );
    let purge = [
        "cleanup",
        "purge",
        "--deleted-before",
        "0d",
        "--archive",
        "purged.csv",
        "--archive-comments",
        "purged-comments.csv",
    ];
    step("purge", &purge);
    let retention = [
        "cleanup",
        "retention",
        "--created-before",
        "2023-05-01",
        "--archive",
        "old.csv",
        "--archive-comments",
        "old-comments.csv",
    ];
    let ops = step("retention", &[&retention[..], &apply_args].concat());
    for undone in ["second", "comments again", "fix set"] {
        step("undo", &[&["undo", ops[undone].as_str()], &apply_args[..]].concat());
    }
    let merge = [
        "fix",
        "merge-users",
        "--from",
        "agent3@support.example.org",
        "--into",
        "agent4@support.example.org",
    ];
    step("merge-users", &[&merge[..], &apply_args].concat());
    step("report summary", &["report", "summary"]);
    step("report agents", &["report", "agents", "--days", "3000"]);
    for dataset in ["tickets", "comments", "users"] {
        let out = format!("export-{dataset}.csv");
        ticketops(Some(&db), &dir, &["export", dataset, "--include-deleted", "-o", &out])
            .run()
            .expect_code(0);
    }
    let exported = csv::Reader::from_path(dir.join("export-tickets.csv"))
        .unwrap()
        .records()
        .count();
    assert_eq!(exported as i64, db.scalar("SELECT count(*) FROM tickets"));

    for file in [
        "users.rej",
        "first.rej",
        "c1.rej",
        "again.rej",
        "second.rej",
        "c2.rej",
        "apply.rej",
        "purged.csv",
        "purged-comments.csv",
        "old.csv",
        "old-comments.csv",
        "export-tickets.csv",
        "export-comments.csv",
        "export-users.csv",
    ] {
        record.file(file, &dir.join(file));
    }
    let path = record_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, record.text()).unwrap();
}
