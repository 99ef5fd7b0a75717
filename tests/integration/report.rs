//! `report summary|backlog|flow|agents` against a database with known data: every number
//! checked, filters, deleted rows, the empty database, and the three output formats.

use serde_json::{Value, json};

use crate::support::*;

type SeedTicket = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
);

/// Three users (a customer, agents ann and bob) and tickets whose ages are relative to now.
fn seeded(name: &str) -> (TestDb, std::path::PathBuf) {
    let db = TestDb::new();
    db.execute(
        "INSERT INTO users (id, email, role) VALUES
           (1, 'cust@example.com', 'customer'), (2, 'ann@support.example', 'agent'),
           (3, 'bob@support.example', 'agent');
         INSERT INTO organizations (id, name) VALUES (1, 'Acme');",
    );
    // external_id, status, priority, channel, assignee, created ago, solved ago, deleted
    let rows: &[SeedTicket] = &[
        ("T1", "new", "urgent", "email", "2", "2 hours", "", false),
        ("T2", "open", "high", "web", "2", "3 days", "", false),
        ("T3", "pending", "normal", "chat", "3", "10 days", "", false),
        ("T4", "on_hold", "low", "phone", "NULL", "45 days", "", false),
        ("T5", "open", "normal", "email", "2", "100 days", "", false),
        ("T6", "solved", "normal", "email", "2", "5 days 1 hour", "5 days", false),
        ("T7", "closed", "high", "api", "2", "3 days 2 hours", "3 days", false),
        ("T8", "solved", "low", "web", "2", "2 days 10 hours", "2 days", false),
        ("T9", "solved", "normal", "email", "2", "41 days", "40 days", false),
        ("T10", "open", "urgent", "social", "3", "1 day 1 hour", "", true),
        ("T11", "closed", "low", "other", "NULL", "200 days", "199 days", false),
    ];
    for (ext, status, priority, channel, assignee, created, solved, deleted) in rows {
        let solved = if solved.is_empty() {
            "NULL".to_string()
        } else {
            format!("now() - interval '{solved}'")
        };
        let deleted = if *deleted { "now()" } else { "NULL" };
        let org = if ext.len() == 2 { "1" } else { "NULL" };
        db.execute(&format!(
            "INSERT INTO tickets (external_id, subject, status, priority, channel, requester_id, assignee_id,
                                  organization_id, created_at, updated_at, solved_at, deleted_at)
             VALUES ('{ext}', 'Subject {ext}', '{status}', '{priority}', '{channel}', 1, {assignee}, {org},
                     now() - interval '{created}', now(), {solved}, {deleted})"
        ));
    }
    (db, scratch(name))
}

fn report(db: &TestDb, dir: &std::path::Path, args: &[&str]) -> Value {
    let mut all = vec!["--json", "report"];
    all.extend_from_slice(args);
    ticketops(Some(db), dir, &all).run().expect_code(0).json()
}

#[test]
fn summary_counts_every_value_and_leaves_deleted_tickets_out() {
    let (db, dir) = seeded("report-1");
    let v = report(&db, &dir, &["summary"]);
    assert_eq!(v["total"], 10);
    assert_eq!(v["deleted"], 1);
    assert_eq!(
        v["by_status"],
        json!({"new": 1, "open": 2, "pending": 1, "on_hold": 1, "solved": 3, "closed": 2})
    );
    assert_eq!(v["by_priority"], json!({"low": 3, "normal": 4, "high": 2, "urgent": 1}));
    assert_eq!(
        v["by_channel"],
        json!({"email": 4, "web": 2, "chat": 1, "phone": 1, "social": 0, "api": 1, "other": 1})
    );
    assert_eq!(v["oldest_open"]["external_id"], "T5");
    assert_eq!(v["oldest_open"]["age_days"], 100);

    let v = report(&db, &dir, &["summary", "--include-deleted"]);
    assert_eq!(v["total"], 11);
    assert_eq!(v["by_status"]["open"], 3);
    assert_eq!(v["by_channel"]["social"], 1);

    let v = report(&db, &dir, &["summary", "--only-deleted"]);
    assert_eq!(v["total"], 1);
    assert_eq!(v["by_priority"]["urgent"], 1);
    assert_eq!(v["oldest_open"]["external_id"], "T10");

    // Filters narrow every number, the deleted count too.
    let v = report(&db, &dir, &["summary", "--assignee", "ann@support.example"]);
    assert_eq!(v["total"], 7);
    assert_eq!(v["deleted"], 0);
    assert_eq!(v["by_status"]["solved"], 3);
    let v = report(&db, &dir, &["summary", "--assignee", "none", "--organization", "Acme"]);
    assert_eq!(v["total"], 1, "only T4 is unassigned and in Acme: {v}");
    let v = report(
        &db,
        &dir,
        &["summary", "--status", "solved,closed", "--created-after", "30d"],
    );
    assert_eq!(v["total"], 3);
    assert_eq!(v["oldest_open"], Value::Null);
}

#[test]
fn backlog_buckets_unsolved_tickets_by_age_and_priority() {
    let (db, dir) = seeded("report-2");
    let v = report(&db, &dir, &["backlog"]);
    let buckets = v["buckets"].as_array().unwrap();
    let ages: Vec<&str> = buckets.iter().map(|b| b["age"].as_str().unwrap()).collect();
    assert_eq!(ages, ["< 1 day", "1-7 days", "7-30 days", "30-90 days", "> 90 days"]);
    let expect = [("urgent", 1), ("high", 1), ("normal", 1), ("low", 1), ("normal", 1)];
    for (bucket, (priority, n)) in buckets.iter().zip(expect) {
        assert_eq!(bucket[priority], n, "{bucket}");
        assert_eq!(bucket["total"], 1, "{bucket}");
    }
    assert_eq!(v["total"], 5);
    assert_eq!(v["by_priority"], json!({"low": 1, "normal": 2, "high": 1, "urgent": 1}));

    // The deleted T10 (urgent, a day old) only with --include-deleted.
    let v = report(&db, &dir, &["backlog", "--include-deleted"]);
    assert_eq!(v["buckets"][1]["urgent"], 1);
    assert_eq!(v["buckets"][1]["total"], 2);
    assert_eq!(v["total"], 6);

    let v = report(&db, &dir, &["backlog", "--priority", "normal"]);
    assert_eq!(v["total"], 2);
}

#[test]
fn agents_count_open_and_solved_with_resolution_percentiles() {
    let (db, dir) = seeded("report-3");
    let v = report(&db, &dir, &["agents"]);
    assert_eq!(v["days"], 30);
    let agents = v["agents"].as_array().unwrap();
    let names: Vec<Value> = agents.iter().map(|a| a["assignee"].clone()).collect();
    assert_eq!(
        names,
        [json!("ann@support.example"), json!("bob@support.example"), Value::Null]
    );
    let ann = &agents[0];
    assert_eq!((ann["open"].as_i64(), ann["solved"].as_i64()), (Some(3), Some(3)));
    // Resolution times 1 h, 2 h and 10 h: median 2, 90th percentile (interpolated) 8.4.
    let close = |x: &Value, want: f64| (x.as_f64().unwrap() - want).abs() < 0.01;
    assert!(close(&ann["median_resolution_hours"], 2.0), "{ann}");
    assert!(close(&ann["p90_resolution_hours"], 8.4), "{ann}");
    let bob = &agents[1];
    assert_eq!((bob["open"].as_i64(), bob["solved"].as_i64()), (Some(1), Some(0)));
    assert_eq!(bob["median_resolution_hours"], Value::Null);
    // T4 is unassigned and unsolved; T11 was solved long before the period.
    assert_eq!(
        (agents[2]["open"].as_i64(), agents[2]["solved"].as_i64()),
        (Some(1), Some(0))
    );

    // A longer period takes in T9 (24 h): 1, 2, 10, 24 → median 6, p90 19.8.
    let v = report(
        &db,
        &dir,
        &["agents", "--days", "60", "--assignee", "ann@support.example"],
    );
    let agents = v["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["solved"], 4);
    assert!(close(&agents[0]["median_resolution_hours"], 6.0));
    assert!(close(&agents[0]["p90_resolution_hours"], 19.8));
}

#[test]
fn flow_counts_created_and_solved_per_utc_day() {
    let db = TestDb::new();
    let dir = scratch("report-flow");
    db.execute("INSERT INTO users (id, email) VALUES (1, 'cust@example.com')");
    let midnight = "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')";
    // external_id, created (from today's midnight), solved, deleted
    let rows = [
        ("F1", "interval '1 minute'", "interval '2 minutes'", false),
        ("F2", "interval '-1 day 1 hour'", "", false),
        ("F3", "interval '-1 day 2 hours'", "interval '-1 day 3 hours'", false),
        ("F4", "interval '-5 days 1 hour'", "interval '1 minute'", false),
        ("F5", "interval '-1 day 5 hours'", "", true),
    ];
    for (ext, created, solved, deleted) in rows {
        let (status, solved) = if solved.is_empty() {
            ("open", "NULL".to_string())
        } else {
            ("solved", format!("{midnight} + {solved}"))
        };
        let deleted = if deleted { "now()" } else { "NULL" };
        db.execute(&format!(
            "INSERT INTO tickets (external_id, subject, status, requester_id, created_at, solved_at, deleted_at)
             VALUES ('{ext}', 's', '{status}', 1, {midnight} + {created}, {solved}, {deleted})"
        ));
    }
    let v = report(&db, &dir, &["flow", "--days", "3"]);
    let days: Vec<(i64, i64)> = v["per_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["created"].as_i64().unwrap(), d["solved"].as_i64().unwrap()))
        .collect();
    assert_eq!(days, [(0, 0), (2, 1), (1, 2)], "{v}");
    assert_eq!((v["created"].as_i64(), v["solved"].as_i64()), (Some(3), Some(3)));
    let today = db
        .strings("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
        .remove(0);
    assert_eq!(v["to"], today.as_str());

    let v = report(&db, &dir, &["flow", "--days", "7", "--include-deleted"]);
    assert_eq!(v["per_day"].as_array().unwrap().len(), 7);
    assert_eq!(v["created"], 5);

    // The table ends with a one-line chart per series.
    let run = ticketops(Some(&db), &dir, &["report", "flow", "--days", "3"]).run();
    let out = &run.expect_code(0).stdout;
    let created_line = out.lines().find(|l| l.starts_with("created ")).unwrap();
    assert_eq!(created_line, "created  █▄  3", "{out}");
    assert!(
        out.lines().any(|l| l.split_whitespace().eq(["total", "3", "3"])),
        "{out}"
    );
}

#[test]
fn an_empty_database_gives_zeroes_not_errors() {
    let db = TestDb::new();
    let dir = scratch("report-empty");
    let v = report(&db, &dir, &["summary"]);
    assert_eq!(v["total"], 0);
    assert_eq!(v["by_status"].as_object().unwrap().len(), 6);
    assert!(v["by_channel"].as_object().unwrap().values().all(|n| n == 0));
    assert_eq!(v["oldest_open"], Value::Null);
    assert_eq!(report(&db, &dir, &["backlog"])["total"], 0);
    let flow = report(&db, &dir, &["flow"]);
    assert_eq!(flow["per_day"].as_array().unwrap().len(), 30);
    assert_eq!(flow["created"], 0);
    assert_eq!(report(&db, &dir, &["agents"])["agents"], json!([]));
}

#[test]
fn csv_and_table_outputs_carry_the_same_numbers() {
    let (db, dir) = seeded("report-4");
    for (report, header, rows) in [
        ("summary", "group,value,tickets", 2 + 6 + 4 + 7),
        // No total row in CSV (a spreadsheet would count it as data); the table has one.
        ("backlog", "age,low,normal,high,urgent,total", 5),
        ("flow", "date,created,solved", 30),
        ("agents", "assignee,name,open,solved,median_hours,p90_hours", 3),
    ] {
        let run = ticketops(Some(&db), &dir, &["report", report, "--format", "csv"]).run();
        let out = &run.expect_code(0).stdout;
        assert_eq!(out.lines().next(), Some(header), "{}", run.explain());
        let mut reader = csv::Reader::from_reader(out.as_bytes());
        let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), rows, "{report}{}", run.explain());
        assert!(records.iter().all(|r| r.len() == header.split(',').count()));
        if report != "summary" {
            assert!(records.iter().all(|r| &r[0] != "total"), "{report}: {out}");
            let table = ticketops(Some(&db), &dir, &["report", report]).run();
            assert!(
                table.expect_code(0).stdout.lines().any(|l| l.starts_with("total")) || report == "agents",
                "{report}: the table keeps its total row"
            );
        }
        if report == "summary" {
            assert_eq!(&records[0][2], "10");
        }
        if report == "agents" {
            assert_eq!(&records[0][0], "ann@support.example");
            assert_eq!(&records[0][4], "2.0");
            assert_eq!(&records[2][0], "(unassigned)");
        }
    }
    let run = ticketops(Some(&db), &dir, &["report", "summary"]).run();
    let out = &run.expect_code(0).stdout;
    assert!(out.lines().any(|l| l.split_whitespace().eq(["total", "10"])), "{out}");
    assert!(out.contains("oldest unsolved: T5"), "{out}");

    // --json is --format json; asking for two formats is a usage error.
    ticketops(Some(&db), &dir, &["--json", "report", "summary", "--format", "csv"])
        .run()
        .expect_code(2);
    let plans = ticketops(Some(&db), &dir, &["report", "backlog", "--explain"]).run();
    plans.expect_code(0).stderr_has("Execution Time");
}
