//! Faults and hostile input an ops engineer can hit on a production database: secrets in
//! connection errors, file modes, lost connections, lock waits, huge fields, full disks.

use crate::support::*;

/// Every spelling of the password must be absent from everything the binary prints.
fn assert_no_secret(run: &Run, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "{secret:?} leaked{}",
            run.explain()
        );
    }
}

#[test]
fn connection_errors_never_show_the_password() {
    let dir = scratch("secrets");
    let cases: &[(&str, &[&str])] = &[
        ("postgres://u:s3cr3tPW%zz@127.0.0.1:1/x", &["s3cr3tPW"]),
        ("postgresql://u:s3cr3tPW@[::1:5432/x", &["s3cr3tPW"]),
        ("postgres://u:s3cr3tPW@t3tPW@127.0.0.1:1/x", &["s3cr3tPW", "t3tPW"]),
        ("postgres://u:s3cr%00tPW@127.0.0.1:1/x", &["s3cr", "tPW"]),
        ("postgres://u:s3cr3tPW@127.0.0.1:1/x", &["s3cr3tPW"]),
        ("postgres://127.0.0.1:1/x?password=s3cr3tPW&port=zz", &["s3cr3tPW"]),
        ("host=127.0.0.1 port=zz password=s3cr3tPW", &["s3cr3tPW"]),
        ("host=127.0.0.1 password='s3cr3t PW", &["s3cr3t"]),
    ];
    for (url, secrets) in cases {
        for args in [&["--json", "report", "summary"][..], &["migrate", "run"], &["doctor"]] {
            let run = ticketops(None, &dir, args).env("DATABASE_URL", url).run();
            assert_ne!(run.code, 0, "{}", run.explain());
            assert!(!run.stderr.contains("panicked"), "{}", run.explain());
            assert_no_secret(&run, secrets);
        }
    }
}

#[test]
fn an_empty_user_in_a_keyvalue_string_stays_empty() {
    let db = TestDb::new();
    let dir = scratch("empty-user");
    // The test URL's host and port, as a key/value string ending in `user=`.
    let rows = db.json("SELECT inet_server_port() AS port");
    let port = rows[0]["port"].as_i64().unwrap();
    let url = format!("host=127.0.0.1 port={port} dbname={} user=", db.name);
    let run = ticketops(None, &dir, &["report", "summary"])
        .env("DATABASE_URL", &url)
        .run();
    assert!(
        !run.stderr.contains("application_name"),
        "the empty user swallowed the next parameter{}",
        run.explain()
    );
}
