//! The partitioned layout (`migrate run --layout partitioned`): what only it can get wrong.
//! These tests make their own partitioned database whatever the suite's layout; the rest of
//! the suite runs on it too with `TICKETOPS_TEST_LAYOUT=partitioned` (scripts/test does).

use crate::support::*;

fn partitioned_db(name: &str) -> (TestDb, std::path::PathBuf) {
    (TestDb::with_layout("partitioned"), scratch(name))
}

/// The partition a ticket's row lives in.
fn partition_of(db: &TestDb, external_id: &str) -> String {
    db.strings(&format!(
        "SELECT tableoid::regclass::text FROM tickets WHERE external_id = '{external_id}'"
    ))
    .remove(0)
}

/// The month of tickets that holds `time`, as pg_partman names it.
fn partition_of_time(db: &TestDb, time: &str) -> String {
    db.strings(&format!(
        "SELECT partition_table::text FROM partman.show_partition_name('public.tickets', '{time}')"
    ))
    .remove(0)
}

/// A login role named after the database and `suffix` that may read and write the tables
/// through tickets but owns nothing (as a DBA may set up an import or cleanup job), and the URL
/// to connect as it. `DROP OWNED BY role; DROP ROLE role` removes it.
fn writer_role(db: &TestDb, suffix: &str) -> (String, String) {
    let role = format!("{}_{suffix}", db.name);
    db.execute(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA partman TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA partman TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON tickets, ticket_tags, ticket_keys, users, organizations, tags,
               comments, comment_keys, audit_log, bulk_operations TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
         GRANT SELECT ON ticketops_layout, __diesel_schema_migrations TO {role};"
    ));
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    (role.clone(), format!("{scheme}://{role}@{host}"))
}

/// Drops the monthly partitions of tickets (and of their tag links and comments) that `which` selects (a
/// clause over `starts`, when each month begins), as if pg_partman's maintenance had not made
/// them.
fn drop_months(db: &TestDb, which: &str) {
    db.execute(&format!(
        "DO $$ DECLARE r record; l record; BEGIN
           FOR r IN SELECT p, bound FROM (
                      SELECT c.oid::regclass AS p, pg_get_expr(c.relpartbound, c.oid) AS bound,
                             (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz AS starts
                      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                      WHERE i.inhparent = 'tickets'::regclass AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
                    ) m {which}
           LOOP
             FOR l IN SELECT c.oid::regclass AS p FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                      WHERE i.inhparent IN ('ticket_tags'::regclass, 'comments'::regclass)
                        AND pg_get_expr(c.relpartbound, c.oid) = r.bound
             LOOP EXECUTE format('DROP TABLE %s', l.p); END LOOP;
             EXECUTE format('DROP TABLE %s', r.p);
           END LOOP; END $$"
    ));
}

fn assert_every_ticket_and_only_they_keyed(db: &TestDb) {
    assert_eq!(
        db.scalar("SELECT count(*) FROM ticket_keys k LEFT JOIN tickets t ON t.id = k.ticket_id WHERE t.id IS NULL"),
        0,
        "no key outlives its ticket"
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM tickets t LEFT JOIN ticket_keys k ON k.ticket_id = t.id AND k.created_at = t.created_at
             WHERE k.ticket_id IS NULL"
        ),
        0,
        "every ticket keeps its key"
    );
}

const TWO_MONTHS: &str = "\
external_id,subject,status,requester_email,tags,created_at
A-1,First of March,open,ann@example.com,vip,2023-03-05T10:00:00Z
B-1,First of July,open,bob@example.com,vip,2024-07-09T10:00:00Z
";

#[test]
fn a_soft_delete_changes_its_own_rows_even_where_two_partitions_share_a_ctid() {
    let (db, dir) = partitioned_db("ctid");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // Each is the first row of its month's partition: the same ctid, (0,1).
    assert_ne!(partition_of(&db, "A-1"), partition_of(&db, "B-1"));
    assert_eq!(
        db.strings("SELECT DISTINCT ctid::text FROM tickets WHERE external_id IN ('A-1', 'B-1')"),
        set(&["(0,1)"]),
        "the hazard is planted"
    );
    std::fs::write(dir.join("ids.csv"), "external_id\nA-1\n").unwrap();
    let v = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--ids-file", "ids.csv"],
    )
    .run()
    .expect_code(0)
    .json();
    assert_eq!(v["soft_deleted"], 1);
    assert_eq!(
        db.strings("SELECT external_id || ' ' || (deleted_at IS NOT NULL) FROM tickets ORDER BY 1"),
        set(&["A-1 true", "B-1 false"]),
        "only the selected ticket, not its ctid twin in the other partition"
    );
    // Restore by operation: the same, the other way.
    let op = v["operation_id"].to_string();
    db.execute("UPDATE tickets SET deleted_at = now() - interval '1 day' WHERE external_id = 'B-1'");
    ticketops(Some(&db), &dir, &["restore", "--operation", &op])
        .run()
        .expect_code(0);
    assert_eq!(
        db.strings("SELECT external_id || ' ' || (deleted_at IS NOT NULL) FROM tickets ORDER BY 1"),
        set(&["A-1 false", "B-1 true"])
    );
}

/// A soft-delete goes month by month (each month's batches in id order), and between and
/// around the months through the default partition: every matching ticket, whichever month
/// or none, and with --created-after/--created-before only those of the months they reach.
#[test]
fn a_soft_delete_walks_the_months_and_the_default_partition_and_misses_no_ticket() {
    let (db, dir) = partitioned_db("soft-delete-months");
    // Ids in the file's order, months out of it: batches of 2 cross months and come back.
    let file = dir.join("months.csv");
    let mut csv = String::from("external_id,subject,status,requester_email,created_at\n");
    for (i, day) in [
        "2023-03-05",
        "2024-07-09",
        "2023-03-06",
        "2023-04-01",
        "2024-07-10",
        "2023-03-07",
        "2023-04-02",
    ]
    .iter()
    .enumerate()
    {
        csv.push_str(&format!("M-{i},Ticket {i},closed,ann@example.com,{day}T10:00:00Z\n"));
    }
    std::fs::write(&file, csv).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // Rows without a month: before the first, between two, after the last (as an application
    // may write them into the default partition).
    for (id, day) in [(9001, "2019-01-01"), (9002, "2023-12-24"), (9003, "2099-01-01")] {
        db.execute(&format!(
            "INSERT INTO tickets (id, external_id, subject, status, requester_id, created_at)
             VALUES ({id}, 'D-{id}', 'stray', 'closed', (SELECT min(id) FROM users), '{day}')"
        ));
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE tableoid = 'tickets_default'::regclass"),
        3,
        "the stray rows are in the default partition"
    );
    let deleted = || db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL");
    let soft_delete = |args: &[&str]| {
        let mut all = vec!["--json", "cleanup", "soft-delete", "--batch-size", "2"];
        all.extend_from_slice(args);
        let run = ticketops(Some(&db), &dir, &all).run();
        run.expect_code(0);
        run
    };
    // March 2023 alone.
    let run = soft_delete(&["--created-after", "2023-03-01", "--created-before", "2023-04-01"]);
    assert_eq!(run.json()["soft_deleted"], 3, "{}", run.explain());
    assert_eq!(deleted(), set(&["M-0", "M-2", "M-5"]));
    // Everything else, in batches that cross from month to month and through the default partition.
    let run = soft_delete(&["--status", "closed"]);
    assert_eq!(run.json()["soft_deleted"], 7, "{}", run.explain());
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE deleted_at IS NULL"), 0);
    // And its restore brings back exactly those.
    let op = run.json()["operation_id"].to_string();
    ticketops(Some(&db), &dir, &["restore", "--operation", &op])
        .run()
        .expect_code(0);
    assert_eq!(deleted(), set(&["M-0", "M-2", "M-5"]));
}

#[test]
fn a_soft_delete_by_partition_honours_what_is_declared_on_tickets_alone() {
    let (db, dir) = partitioned_db("declared");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    std::fs::write(dir.join("a.csv"), "external_id\nA-1\n").unwrap();
    std::fs::write(dir.join("b.csv"), "external_id\nB-1\n").unwrap();
    let deleted = || db.strings("SELECT external_id FROM tickets WHERE deleted_at IS NOT NULL");

    // A statement-level trigger on tickets does not fire for an UPDATE of a partition named
    // directly: with one, the batch goes through the parent, and the trigger sees it.
    db.execute(
        "CREATE TABLE statements_seen (n int);
         CREATE FUNCTION note_statement() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO statements_seen VALUES (1); RETURN NULL; END $$;
         CREATE TRIGGER note_statement AFTER UPDATE ON tickets
           FOR EACH STATEMENT EXECUTE FUNCTION note_statement();",
    );
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--ids-file", "a.csv"],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 1, "{}", run.explain());
    assert_eq!(deleted(), set(&["A-1"]));
    assert!(
        db.scalar("SELECT count(*) FROM statements_seen") >= 1,
        "the statement trigger fired"
    );
    db.execute("DROP TRIGGER note_statement ON tickets");

    // UPDATE granted on tickets' columns reaches no partition named directly: the batch goes
    // through the parent for such a user, and changes exactly its own row.
    let (role, url) = db.cleaner_role("part_cleaner");
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "cleanup", "soft-delete", "--ids-file", "b.csv"],
    )
    .env("DATABASE_URL", &url)
    .run();
    assert_eq!(run.expect_code(0).json()["soft_deleted"], 1, "{}", run.explain());
    assert_eq!(deleted(), set(&["A-1", "B-1"]));
    db.execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

/// An import by a role that may write the tables but does not own them (as a DBA may set up an
/// import job): its rows go through the parent into the months that exist, which it may not
/// write directly. A month it would have to make it cannot (pg_partman attaches it, which takes
/// the owner): the error names the months and the statement the owner can run, after which the
/// import goes through.
#[test]
fn an_import_by_a_role_that_does_not_own_tickets_writes_through_the_parent_and_asks_for_months() {
    let (db, dir) = partitioned_db("importer");
    let (role, url) = writer_role(&db, "importer");
    let today = db.strings("SELECT to_char(now(), 'YYYY-MM-DD')").remove(0);
    let file = dir.join("now.csv");
    std::fs::write(
        &file,
        format!(
            "external_id,subject,status,requester_email,tags,created_at\nN-1,Now,open,ann@example.com,vip,{today}\n"
        ),
    )
    .unwrap();
    let as_role = |file: &std::path::Path| {
        ticketops(
            Some(&db),
            &dir,
            &[
                "--json",
                "import",
                "tickets",
                file.to_str().unwrap(),
                "--rejects",
                "r.csv",
            ],
        )
        .env("DATABASE_URL", &url)
        .run()
    };
    let run = as_role(&file);
    assert_eq!(run.expect_code(0).json()["inserted"], 1, "{}", run.explain());
    assert!(
        partition_of(&db, "N-1").starts_with("tickets_p"),
        "in its month, not the default partition"
    );
    // A month of tag links without its foreign key (as pg_partman's maintenance makes them): the
    // role's import goes on, leaving the key to the owner.
    let unkeyed = "SELECT count(*) FROM pg_inherits i WHERE i.inhparent = 'ticket_tags'::regclass
                     AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = i.inhrelid AND c.contype = 'f'
                                       AND c.confrelid IN (SELECT inhrelid FROM pg_inherits
                                                           WHERE inhparent = 'tickets'::regclass))";
    db.execute(&format!(
        "DO $$ DECLARE c record; BEGIN
           FOR c IN SELECT conname FROM pg_constraint
                    WHERE conrelid = '{}'::regclass AND contype = 'f' AND conparentid = 0 LOOP
             EXECUTE format('ALTER TABLE {} DROP CONSTRAINT %I', c.conname);
           END LOOP; END $$",
        partition_of(&db, "N-1").replace("tickets_", "ticket_tags_"),
        partition_of(&db, "N-1").replace("tickets_", "ticket_tags_")
    ));
    assert_eq!(db.scalar(unkeyed), 1);
    let again = dir.join("again.csv");
    std::fs::write(&again, std::fs::read_to_string(&file).unwrap().replace("N-1", "N-2")).unwrap();
    let run = as_role(&again);
    assert_eq!(run.expect_code(0).json()["inserted"], 1, "{}", run.explain());
    assert_eq!(db.scalar(unkeyed), 1, "the role makes no foreign key");
    db.execute("SELECT ticketops_month_keys()");
    assert_eq!(db.scalar(unkeyed), 0);
    let old = dir.join("old.csv");
    std::fs::write(
        &old,
        "external_id,subject,status,requester_email,created_at\nO-1,Old,closed,bob@example.com,2019-05-05\n",
    )
    .unwrap();
    as_role(&old).expect_code(1).stderr_has(
        "(2019-05): permission denied for schema public — the owner of tickets makes them: run the import as the \
         owner, or have the owner run SELECT ticketops_create_months(ARRAY['2019-05-01']::timestamptz[]) first",
    );
    db.execute("SELECT ticketops_create_months(ARRAY['2019-05-01']::timestamptz[])");
    let run = as_role(&old);
    assert_eq!(run.expect_code(0).json()["inserted"], 1, "{}", run.explain());
    assert_eq!(partition_of(&db, "O-1"), "tickets_p2019_05");
    db.execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

/// `--initial-load` drops and rebuilds indexes and keys, which takes the tables' owner: a role
/// that may only write them is told so, and what to do, before anything is locked or written.
#[test]
fn an_initial_load_by_a_role_that_does_not_own_the_tables_says_what_to_do() {
    let (db, dir) = partitioned_db("initial-load-role");
    let (role, url) = writer_role(&db, "loader");
    // Of this month and the last: months that exist (the role could not make others).
    let days = db.strings("SELECT to_char(d, 'YYYY-MM-DD') FROM unnest(ARRAY[now(), now() - interval '1 month']) d");
    let file = dir.join("recent.csv");
    std::fs::write(
        &file,
        format!(
            "external_id,subject,status,requester_email,created_at\nR-1,One,open,ann@example.com,{}\nR-2,Two,open,bob@example.com,{}\n",
            days[0], days[1]
        ),
    )
    .unwrap();
    let as_role = |extra: &[&str]| {
        let mut args = vec!["--json", "import", "tickets", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        ticketops(Some(&db), &dir, &args).env("DATABASE_URL", &url).run()
    };
    as_role(&["--initial-load"]).expect_code(1).stderr_has(
        "this role does not own ticket_keys, ticket_tags, tickets: run it as the owner, or import without --initial-load",
    );
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    let run = as_role(&[]);
    assert_eq!(run.expect_code(0).json()["inserted"], 2, "{}", run.explain());
    db.execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

/// After an initial load autovacuum analyzes the months within its naptime, and the load
/// analyzes only the parents (which autovacuum never does); where autovacuum would not reach a
/// month — off for one of them, or for the server — the load analyzes every month itself.
#[test]
fn an_initial_load_analyzes_the_months_itself_where_autovacuum_would_not() {
    let (db, dir) = partitioned_db("initial-load-analyze");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    let a_month = db.strings("SELECT relid::regclass::text FROM pg_partition_tree('tickets') WHERE isleaf LIMIT 1");
    db.execute(&format!("ALTER TABLE {} SET (autovacuum_enabled = off)", a_month[0]));
    let run = ticketops(
        Some(&db),
        &dir,
        &["-v", "import", "tickets", file.to_str().unwrap(), "--initial-load"],
    )
    .run();
    run.expect_code(0).stderr_has("ticket_tags, tickets and its ");
    // Every month that holds rows, of tickets and of their tag links.
    assert_eq!(
        db.strings(
            "SELECT s.relname::text FROM pg_stat_user_tables s
             WHERE s.n_live_tup > 0 AND s.last_analyze IS NOT NULL
               AND s.relid IN (SELECT relid FROM pg_partition_tree('tickets') WHERE isleaf
                               UNION ALL SELECT relid FROM pg_partition_tree('ticket_tags') WHERE isleaf)
             ORDER BY 1"
        ),
        [
            "ticket_tags_p2023_03",
            "ticket_tags_p2024_07",
            "tickets_p2023_03",
            "tickets_p2024_07"
        ]
    );
    // doctor names months without statistics when autovacuum will not analyze them.
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    db.execute("DELETE FROM pg_statistic WHERE starelid = 'tickets_p2023_03'::regclass");
    let run = ticketops(Some(&db), &dir, &["--json", "doctor"]).run();
    run.expect_code(1).stderr_has(
        "1 month(s) of tickets and tag links hold rows but have no statistics, and autovacuum will not analyze them",
    );
    let partitions = &run.json()["partitions"];
    assert_eq!(partitions["months_without_statistics"], 1, "{}", run.explain());
    assert_eq!(partitions["autovacuum_analyzes_months"], false);
}

/// The initial load rebuilds the partitioned indexes month by month, attaching each month's to
/// its parent's: an index a month has of its own (made on it alone) stays as it was, and is not
/// taken for the one just made.
#[test]
fn an_initial_load_rebuilds_the_months_indexes_around_an_index_a_month_has_of_its_own() {
    let (db, dir) = partitioned_db("initial-load-own-index");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    // A month made ahead (those of the file's rows the load makes).
    let month = db.strings(
        "SELECT relid::regclass::text FROM pg_partition_tree('tickets')
         WHERE isleaf AND relid::regclass::text LIKE 'tickets_p%' ORDER BY 1 LIMIT 1",
    )[0]
    .clone();
    db.execute(&format!("CREATE INDEX {month}_subject_idx ON {month} (subject)"));
    let run = ticketops(
        Some(&db),
        &dir,
        &["import", "tickets", file.to_str().unwrap(), "--initial-load"],
    )
    .run();
    run.expect_code(0);
    assert_eq!(
        db.strings(&format!(
            "SELECT c.relname || ' ' || EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = '{month}'::regclass ORDER BY 1"
        )),
        db.strings(&format!(
            "SELECT '{month}_subject_idx false' UNION ALL
             SELECT replace(c.relname, 'tickets_', '{month}_') || ' true'
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = 'tickets'::regclass ORDER BY 1"
        )),
        "the month's own index, and each of the parent's attached"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid"), 0);
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
}

/// The initial load writes the months' rows into tables of their own, committed on a second
/// connection, and puts each in place of its empty month at its end. A month with something of
/// its own (here an insert trigger, then an index) is kept and gets its rows copied in: a
/// failure there fails the load whole — tickets empty, the schema as it was, no staged table
/// left, and one left by a killed load dropped; a month with its own index keeps it. The others
/// are swapped in, named and attached as pg_partman's months.
#[test]
fn an_initial_load_puts_its_staged_months_in_place_and_keeps_a_month_that_has_its_own() {
    let (db, dir) = partitioned_db("initial-load-staged");
    let file = dir.join("three.csv");
    let today = db.strings("SELECT to_char(now(), 'YYYY-MM-DD')").remove(0);
    let next = db
        .strings("SELECT to_char(now() + interval '1 month', 'YYYY-MM-DD')")
        .remove(0);
    let after = db
        .strings("SELECT to_char(now() + interval '2 months', 'YYYY-MM-DD')")
        .remove(0);
    std::fs::write(
        &file,
        format!(
            "{TWO_MONTHS}C-1,Of today,open,cat@example.com,vip,{today}T01:00:00Z\n\
             D-1,Of next month,open,dan@example.com,vip,{next}T01:00:00Z\n\
             E-1,Of the month after,open,eve@example.com,vip,{after}T01:00:00Z\n"
        ),
    )
    .unwrap();
    // This month's and the next, made ahead by pg_partman.
    let month = partition_of_time(&db, &format!("{today}T01:00:00Z"));
    let next_month = partition_of_time(&db, &format!("{next}T01:00:00Z"));
    let viewed_month = partition_of_time(&db, &format!("{after}T01:00:00Z"));
    db.execute(&format!("CREATE VIEW viewed AS SELECT external_id FROM {viewed_month}"));
    let indexes = |db: &TestDb| {
        db.strings(
            "SELECT c.relname::text FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
             WHERE i.indrelid IN (SELECT relid FROM pg_partition_tree('tickets')) ORDER BY 1",
        )
    };
    let before = indexes(&db);
    let staged_tables = "SELECT count(*) FROM pg_class WHERE relname LIKE 'ticketops\\_staged\\_%'";
    // What a killed load leaves (pid 1 is no server process): doctor names it.
    db.execute("CREATE TABLE ticketops_staged_1_0 (id bigint)");
    let run = ticketops(Some(&db), &dir, &["--json", "doctor"]).run();
    run.expect_code(1)
        .stderr_has("1 table(s) left by an initial load that did not end (ticketops_staged_1_0)");
    assert_eq!(
        run.json()["partitions"]["staged_tables_left"][0],
        "ticketops_staged_1_0"
    );
    db.execute(&format!(
        "CREATE FUNCTION no_c1() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.external_id = 'C-1' THEN RAISE EXCEPTION 'no C-1 here'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER no_c1 BEFORE INSERT ON {month} FOR EACH ROW EXECUTE FUNCTION no_c1()"
    ));
    let load = || {
        ticketops(
            Some(&db),
            &dir,
            &["--json", "import", "tickets", file.to_str().unwrap(), "--initial-load"],
        )
        .run()
    };
    load().expect_code(1).stderr_has("no C-1 here");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM ticket_keys"), 0);
    assert_eq!(indexes(&db), before, "the months and their indexes as they were");
    assert_eq!(
        db.scalar(staged_tables),
        0,
        "no staged table left, nor the killed load's"
    );

    db.execute(&format!(
        "DROP TRIGGER no_c1 ON {month}; CREATE INDEX {month}_subject_idx ON {month} (subject)"
    ));
    let oid = |month: &str| db.scalar(&format!("SELECT '{month}'::regclass::oid::bigint"));
    let (kept, swapped, viewed) = (oid(&month), oid(&next_month), oid(&viewed_month));
    let run = load();
    assert_eq!(run.expect_code(0).json()["inserted"], 5, "{}", run.explain());
    assert_eq!(partition_of(&db, "A-1"), "tickets_p2023_03");
    assert_eq!(partition_of(&db, "C-1"), month);
    assert_eq!(partition_of(&db, "D-1"), next_month);
    assert_eq!(oid(&month), kept, "the month with an index of its own kept");
    assert_eq!(oid(&viewed_month), viewed, "the month a view reads kept");
    assert_eq!(db.strings("SELECT external_id FROM viewed"), ["E-1"]);
    assert_ne!(
        oid(&next_month),
        swapped,
        "the empty month made ahead replaced by the staged one"
    );
    assert_eq!(db.scalar(staged_tables), 0);
    assert_eq!(
        db.strings(&format!(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = '{month}'::regclass
             AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = indexrelid)"
        )),
        [format!("{month}_subject_idx")],
        "the month's own index kept"
    );
    // Swapped months: named, indexed and keyed as pg_partman's, with no constraint or storage
    // option of their own, and referenced by their months of tag links and comments.
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM pg_class WHERE oid IN ('tickets_p2023_03'::regclass, '{next_month}'::regclass)
             AND reloptions IS NULL"
        )),
        2
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND confrelid = '{next_month}'::regclass"
        )),
        2
    );
    assert_eq!(
        indexes(&db)
            .into_iter()
            .filter(|i| i.starts_with("tickets_p2023_03"))
            .collect::<Vec<_>>(),
        db.strings(
            "SELECT replace(c.relname, 'tickets_', 'tickets_p2023_03_') FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'tickets'::regclass ORDER BY 1"
        )
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'tickets_p2023_03'::regclass AND conislocal
             AND contype <> 'p'"
        ),
        0
    );
    assert_eq!(db.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid"), 0);
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    // The rows as a regular import finds them: a re-import changes nothing.
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "import", "tickets", file.to_str().unwrap()],
    )
    .run();
    assert_eq!(run.expect_code(0).json()["unchanged"], 5, "{}", run.explain());
}

/// The initial load holds each month's rows in unnamed temporary files in TMPDIR: where it
/// cannot make one, the load fails whole — nothing written, every index and key back — and says
/// which directory; with a usable TMPDIR the same load then goes in.
#[test]
fn an_initial_load_that_cannot_hold_its_rows_in_tmpdir_fails_whole_and_names_the_directory() {
    let (db, dir) = partitioned_db("initial-load-tmpdir");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    let schema = "SELECT count(*) FROM pg_indexes WHERE tablename IN ('tickets', 'ticket_tags', 'ticket_keys')";
    let indexes = db.scalar(schema);
    let missing = dir.join("no-such-dir");
    let load = |tmpdir: &std::path::Path| {
        ticketops(
            Some(&db),
            &dir,
            &["--json", "import", "tickets", file.to_str().unwrap(), "--initial-load"],
        )
        .env("TMPDIR", tmpdir.to_str().unwrap())
        .run()
    };
    load(&missing)
        .expect_code(1)
        .stderr_has("cannot hold the rows for ")
        .stderr_has(&format!("in a temporary file in {} (TMPDIR)", missing.display()));
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM ticket_keys"), 0);
    assert_eq!(db.scalar(schema), indexes);
    let run = load(&dir);
    assert_eq!(run.expect_code(0).json()["inserted"], 2, "{}", run.explain());
    assert_eq!(partition_of(&db, "B-1"), "tickets_p2024_07");
    assert_eq!(db.scalar(schema), indexes);
}

#[test]
fn external_ids_stay_unique_across_partitions_by_the_database_itself() {
    let (db, dir) = partitioned_db("unique");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    // As an application writes a ticket: its key in the same transaction.
    let insert = |external_id: &str, created_at: &str| {
        let sql = format!(
            "BEGIN;
             INSERT INTO ticket_keys VALUES (999, '{external_id}', '{created_at}');
             INSERT INTO tickets (id, external_id, subject, status, requester_id, created_at)
             VALUES (999, '{external_id}', 's', 'open', (SELECT min(id) FROM users), '{created_at}');
             COMMIT;"
        );
        diesel::connection::SimpleConnection::batch_execute(&mut db.conn(), &sql)
    };
    // Another month's partition, the same external_id: refused by the key's unique index, and
    // the whole transaction with it.
    let err = insert("A-1", "2025-01-01T00:00:00Z").unwrap_err().to_string();
    assert!(err.contains("ticket_keys_external_id_key"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'A-1'"), 1);
    // With a key of its own, a new ticket goes in; ticketops' own import of a known key with
    // another month moves the ticket instead of making a second one.
    insert("C-1", "2025-01-01T00:00:00Z").unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 3);
    let moved = dir.join("moved.csv");
    std::fs::write(&moved, TWO_MONTHS.replace("2024-07-09", "2022-02-02")).unwrap();
    import(&db, &dir, "tickets", &moved, &[]).0.expect_code(0);
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'B-1'"), 1);
    assert_eq!(partition_of(&db, "B-1"), "tickets_p2022_02");
}

/// Tag links and comments are partitioned like tickets, each month of them referencing its month
/// of tickets; comment_keys keeps the comments' external_id unique. A database made before gets
/// the same from the migrations, its links and comments kept in their tickets' months.
#[test]
fn links_and_comments_live_in_their_tickets_months_and_the_migrations_put_them_there() {
    let (db, dir) = partitioned_db("restrict");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let comments = dir.join("comments.csv");
    std::fs::write(
        &comments,
        "external_id,ticket_external_id,author_email,body,created_at\nK-1,A-1,ann@example.com,hello,2023-03-06\n\
         ,B-1,ann@example.com,no key,2024-07-10\n",
    )
    .unwrap();
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    let actions = "SELECT string_agg(conname || '=' || confdeltype::text, ',' ORDER BY conname) FROM pg_constraint
                   WHERE conname IN ('comments_ticket_id_fkey', 'ticket_tags_ticket_id_fkey')";
    let links = "SELECT string_agg(k.external_id || ' ' || g.name || ' ' || tt.tableoid::regclass::text, ', '
                                   ORDER BY k.external_id)
                 FROM ticket_tags tt JOIN ticket_keys k ON k.ticket_id = tt.ticket_id JOIN tags g ON g.id = tt.tag_id";
    let comments_where = "SELECT string_agg(k.external_id || ' ' || c.body || ' ' || c.tableoid::regclass::text, ', '
                                            ORDER BY k.external_id)
                          FROM comments c JOIN ticket_keys k ON k.ticket_id = c.ticket_id";
    // Every month of links and of comments (the default ones too) references its month of tickets.
    let months_unkeyed = "SELECT count(*) FROM pg_inherits i
                          WHERE i.inhparent IN ('ticket_tags'::regclass, 'comments'::regclass)
                            AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = i.inhrelid AND c.contype = 'f'
                                              AND c.confrelid IN (SELECT inhrelid FROM pg_inherits
                                                                  WHERE inhparent = 'tickets'::regclass))";
    let months_of_comments = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'comments'::regclass";
    let keys = "SELECT string_agg(k.external_id || ' ' || c.body, ', ') FROM comment_keys k
                JOIN comments c ON c.id = k.comment_id AND c.ticket_id = k.ticket_id";
    let in_months = ["A-1 vip ticket_tags_p2023_03, B-1 vip ticket_tags_p2024_07"];
    let comments_in_months = ["A-1 hello comments_p2023_03, B-1 no key comments_p2024_07"];
    assert_eq!(db.strings(actions), [""]);
    assert_eq!(db.strings(links), in_months);
    assert_eq!(db.strings(comments_where), comments_in_months);
    assert_eq!(db.strings(keys), ["K-1 hello"]);
    assert_eq!(db.scalar(months_unkeyed), 0);
    assert!(db.scalar(months_of_comments) > 10);
    // A link or comment in another month than its ticket's points at no ticket there.
    for insert in [
        "INSERT INTO ticket_tags (ticket_id, tag_id, ticket_created_at)
         SELECT k.ticket_id, g.id, '2024-07-09T10:00:00Z' FROM ticket_keys k, tags g WHERE k.external_id = 'A-1'",
        "INSERT INTO comments (ticket_id, author_id, body, ticket_created_at)
         SELECT k.ticket_id, u.id, 'elsewhere', '2024-07-09T10:00:00Z' FROM ticket_keys k, users u
         WHERE k.external_id = 'A-1'",
    ] {
        let err = diesel::connection::SimpleConnection::batch_execute(&mut db.conn(), insert)
            .unwrap_err()
            .to_string();
        assert!(err.contains("violates foreign key constraint"), "{err}");
    }
    // The comments' external_id is unique across the months.
    let err = diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "INSERT INTO comment_keys (external_id, comment_id, ticket_id) SELECT 'K-1', 1, ticket_id FROM ticket_keys",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("comment_keys_pkey"), "{err}");

    // Databases made before: an index on tickets.external_id in every month; before that
    // comments referencing the keys RESTRICT with one table of links in months; before that
    // links referencing the keys too; before that with cascades.
    let external_id_indexes = "SELECT count(*) FROM pg_indexes WHERE indexname = 'tickets_external_id_idx'";
    assert_eq!(db.scalar(external_id_indexes), 0);
    ticketops(Some(&db), &dir, &["migrate", "revert"]).run().expect_code(0);
    assert_eq!(db.scalar(external_id_indexes), 1);
    ticketops(Some(&db), &dir, &["migrate", "revert"]).run().expect_code(0);
    assert_eq!(db.strings(actions), ["comments_ticket_id_fkey=r"]);
    assert_eq!(db.scalar(months_of_comments), 0);
    assert_eq!(db.strings(links), in_months);
    ticketops(Some(&db), &dir, &["migrate", "revert"]).run().expect_code(0);
    assert_eq!(
        db.strings(actions),
        ["comments_ticket_id_fkey=r,ticket_tags_ticket_id_fkey=r"]
    );
    assert_eq!(db.strings(links), ["A-1 vip ticket_tags, B-1 vip ticket_tags"]);
    ticketops(Some(&db), &dir, &["migrate", "revert"]).run().expect_code(0);
    assert_eq!(
        db.strings(actions),
        ["comments_ticket_id_fkey=c,ticket_tags_ticket_id_fkey=c"]
    );
    ticketops(Some(&db), &dir, &["migrate", "run"]).run().expect_code(0);
    assert_eq!(db.scalar(external_id_indexes), 0);
    assert_eq!(db.strings(actions), [""]);
    assert_eq!(db.strings(links), in_months);
    assert_eq!(db.strings(comments_where), comments_in_months);
    assert_eq!(db.strings(keys), ["K-1 hello"]);
    assert_eq!(db.scalar(months_unkeyed), 0);
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    // The comments' ids go on from where they were.
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    std::fs::write(
        &comments,
        "external_id,ticket_external_id,author_email,body\nK-2,B-1,ann@example.com,later\n",
    )
    .unwrap();
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM comments WHERE id > (SELECT max(id) FROM comments WHERE body <> 'later')"),
        1
    );
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), 3);
}

#[test]
fn a_reimport_that_changes_created_at_moves_the_ticket_with_its_tags_comments_and_history() {
    let (db, dir) = partitioned_db("move");
    let file = dir.join("two.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let comments = dir.join("comments.csv");
    std::fs::write(
        &comments,
        "external_id,ticket_external_id,author_email,body,created_at\nK-1,A-1,ann@example.com,hello,2023-03-06\n",
    )
    .unwrap();
    import(&db, &dir, "comments", &comments, &[]).0.expect_code(0);
    let before = partition_of(&db, "A-1");
    let moved = dir.join("moved.csv");
    std::fs::write(
        &moved,
        TWO_MONTHS.replace("2023-03-05T10:00:00Z", "2021-11-20T08:00:00Z"),
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &moved, &[]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 1, 1, 0, 0, 0], "{}", run.explain());
    let after = partition_of(&db, "A-1");
    assert_ne!(before, after);
    assert_eq!(
        after, "tickets_p2021_11",
        "a month before any partition pg_partman made: the import made it"
    );
    assert_eq!(
        db.strings(
            "SELECT k.created_at = t.created_at FROM ticket_keys k JOIN tickets t ON t.id = k.ticket_id
             WHERE t.external_id = 'A-1'"
        ),
        set(&["true"]),
        "the key follows the ticket"
    );
    assert_eq!(
        db.strings(
            "SELECT c.body || ' ' || g.name FROM tickets t JOIN comments c ON c.ticket_id = t.id
             JOIN ticket_tags x ON x.ticket_id = t.id JOIN tags g ON g.id = x.tag_id WHERE t.external_id = 'A-1'"
        ),
        set(&["hello vip"]),
        "comments and tag links stay with the ticket"
    );
    let links_month = |db: &TestDb| {
        db.strings(
            "SELECT DISTINCT x.tableoid::regclass::text FROM ticket_tags x JOIN ticket_keys k ON k.ticket_id = x.ticket_id
             WHERE k.external_id = 'A-1'",
        )
    };
    assert_eq!(
        links_month(&db),
        ["ticket_tags_p2021_11"],
        "its links moved to its month"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets_default"),
        0,
        "nothing lands in the default partition"
    );
    // The re-import is undone: back to March 2023, key and all.
    let op = db.scalar("SELECT max(id) FROM bulk_operations WHERE kind = 'import tickets'");
    apply(&db, &dir, &["undo", &op.to_string()]);
    assert_eq!(partition_of(&db, "A-1"), before);
    assert_eq!(links_month(&db), [before.replace("tickets_", "ticket_tags_")]);
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM ticket_keys k JOIN tickets t ON t.id = k.ticket_id AND t.created_at = k.created_at"
        ),
        2
    );
    // And the same file again changes nothing.
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 0, 2, 0, 0, 0], "{}", run.explain());
}

#[test]
fn old_dumps_get_their_months_and_doctor_watches_the_partitions() {
    let (db, dir) = partitioned_db("months");
    let file = dir.join("old.csv");
    std::fs::write(
        &file,
        "external_id,subject,status,requester_email,created_at\n\
         O-1,Old,closed,ann@example.com,2019-02-10\nO-2,Older,closed,ann@example.com,2018-12-31T23:30:00Z\n",
    )
    .unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    assert_eq!(partition_of(&db, "O-1"), "tickets_p2019_02");
    assert_eq!(partition_of(&db, "O-2"), "tickets_p2018_12");
    let v = ticketops(Some(&db), &dir, &["--json", "doctor"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(v["layout"], "partitioned");
    assert_eq!(v["partitions"]["default_rows"], 0);
    assert!(v["partitions"]["partitions"].as_i64().unwrap() >= 17 + 2, "{v}");
    // The server's lock table, against which doctor weighs the number of months.
    let settings = db.scalar(
        "SELECT current_setting('max_locks_per_transaction')::bigint
                * (current_setting('max_connections')::bigint + current_setting('max_prepared_transactions')::bigint)",
    );
    assert_eq!(v["partitions"]["lock_table"], settings, "{v}");
    // Partitions that run out (pg_partman's maintenance not scheduled) are reported with what
    // to do, and its maintenance makes the months ahead again.
    drop_months(&db, "WHERE starts > now()");
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("partman.run_maintenance()");
    // It makes the months of tickets and of tag links; the foreign keys between them come from
    // ticketops (an import, or the function doctor names).
    db.execute("SELECT partman.run_maintenance()");
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("month(s) of tag links lack the foreign key to their month of tickets")
        .stderr_has("month(s) of comments lack the foreign key to their month of tickets")
        .stderr_has("SELECT ticketops_month_keys()");
    db.execute("SELECT ticketops_month_keys()");
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    let this_month = db
        .strings("SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T00:00:00Z\"')")
        .remove(0);
    let v = ticketops(Some(&db), &dir, &["--json", "doctor"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(v["partitions"]["maintenance_ran_since"], this_month.as_str(), "{v}");
    // Maintenance that stopped two months ago is reported while months ahead remain: as if
    // its last runs had not made the two newest.
    drop_months(&db, "ORDER BY starts DESC LIMIT 2");
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("pg_partman's maintenance has not run since");
    // Maintained for tickets alone, their newest months have no months of tag links or comments.
    db.execute("SELECT partman.run_maintenance('public.tickets')");
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("month(s) of tickets have no month of tag links")
        .stderr_has("month(s) of tickets have no month of comments")
        .stderr_has("SELECT ticketops_create_months(ARRAY[");
    db.execute("SELECT partman.run_maintenance(), ticketops_month_keys()");
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    // A stray row in the default partition (an application writing a month nobody made).
    db.execute(
        "INSERT INTO tickets (external_id, subject, status, requester_id, created_at)
         VALUES ('D-1', 'Far future', 'open', (SELECT min(id) FROM users), '2040-01-01')",
    );
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("1 row(s) in the default partition");
    db.execute("DELETE FROM tickets WHERE external_id = 'D-1'; DELETE FROM ticket_keys WHERE external_id = 'D-1'");
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    // A ticket of this month written without its key, as an application that does not know
    // about ticket_keys would (straight through a connection: `db.execute` would write its key);
    // the statement doctor names gives it its key.
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "INSERT INTO tickets (external_id, subject, status, requester_id, created_at)
         VALUES ('N-1', 'No key', 'open', (SELECT min(id) FROM users), now())",
    )
    .unwrap();
    let run = ticketops(Some(&db), &dir, &["doctor"]).run();
    run.expect_code(1)
        .stderr_has("1 ticket(s) created since ")
        .stderr_has("have no row in ticket_keys");
    let repair = run
        .stderr
        .split("and for these: ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    db.execute(repair);
    assert_eq!(
        db.strings("SELECT external_id FROM ticket_keys WHERE external_id = 'N-1'"),
        ["N-1"]
    );
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
    // Tickets of older months are not read (an anti-join of every ticket); O-1 (2019) loses its
    // key unnoticed.
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "DELETE FROM ticket_keys WHERE external_id = 'O-1'",
    )
    .unwrap();
    let v = ticketops(Some(&db), &dir, &["--json", "doctor"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(v["partitions"]["recent_without_key"], 0, "{v}");
}

#[test]
fn a_layout_is_chosen_once_on_an_empty_database() {
    let db = TestDb::new();
    let dir = scratch("layout-once");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "r.csv"]);
    let other = if partitioned() { "plain" } else { "partitioned" };
    ticketops(Some(&db), &dir, &["migrate", "run", "--layout", other])
        .run()
        .expect_code(2)
        .stderr_has("a layout is chosen once, on an empty database");
    // Naming the layout it has is fine, and so is naming none.
    ticketops(Some(&db), &dir, &["migrate", "run", "--layout", layout()])
        .run()
        .expect_code(0);
    let v = ticketops(Some(&db), &dir, &["--json", "migrate", "run"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(v["layout"], layout());
}

#[test]
fn retention_drops_whole_months_in_one_step_and_the_boundary_month_in_batches() {
    let (db, dir) = partitioned_db("retention-partitions");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    // A ticket an application wrote without a key (not through db.execute, which adds keys):
    // archived and counted like the rest.
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "INSERT INTO tickets (external_id, subject, status, requester_id, created_at)
         VALUES ('K-0', 'Keyless', 'open', (SELECT min(id) FROM users), '2023-04-02')",
    )
    .unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM ticket_keys WHERE external_id = 'K-0'"),
        0
    );
    let cutoff = "2023-06-15";
    let whole =
        db.strings("SELECT DISTINCT tableoid::regclass::text FROM tickets WHERE created_at < '2023-06-01' ORDER BY 1");
    assert_eq!(whole.len(), 5, "{whole:?}");
    let boundary = db.scalar(&format!(
        "SELECT count(*) FROM tickets WHERE created_at >= '2023-06-01' AND created_at < '{cutoff}'"
    ));
    let old = db.scalar(&format!("SELECT count(*) FROM tickets WHERE created_at < '{cutoff}'"));
    assert!(boundary > 0);
    let plan = ticketops(Some(&db), &dir, &retention(cutoff, "a.csv", &["--json"]))
        .run()
        .expect_code(0)
        .json();
    let planned: Vec<&str> = plan["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(planned, whole);
    assert_eq!(plan["batched"].as_i64(), Some(boundary));
    // The dry run's text says what would be done, not that it was.
    let text = ticketops(Some(&db), &dir, &retention(cutoff, "a.csv", &[])).run();
    let shown = &text.expect_code(0).stdout;
    assert!(shown.contains("5 whole partition(s) to archive and drop: "), "{shown}");
    assert!(
        shown.contains(&format!("{boundary} ticket(s) to remove in batches")),
        "{shown}"
    );

    // A month that cannot be dropped (something depends on it) goes not at all: still attached,
    // its archive cut back (the check of the archive below finds each ticket once); the next
    // run takes it.
    db.execute("CREATE VIEW blocker AS SELECT * FROM tickets_p2023_03");
    let run = ticketops(
        Some(&db),
        &dir,
        &retention(cutoff, "a.csv", &["--json", "--apply", "--yes"]),
    )
    .run();
    run.expect_code(1).stderr_has("cannot drop tickets_p2023_03");
    assert_eq!(
        run.json()["partitions_dropped"],
        serde_json::json!(["tickets_p2023_01", "tickets_p2023_02"])
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'tickets_p2023_03'::regclass"),
        1,
        "the month is still attached"
    );
    db.execute("DROP VIEW blocker");
    let in_months =
        db.scalar("SELECT count(*) FROM tickets WHERE created_at >= '2023-03-01' AND created_at < '2023-06-01'");
    // Up to the month's start: whole months only, no batch.
    let v = apply(&db, &dir, &retention("2023-06-01", "a.csv", &[]));
    assert_eq!(
        v["partitions_dropped"],
        serde_json::json!(["tickets_p2023_03", "tickets_p2023_04", "tickets_p2023_05"])
    );
    assert_eq!(v["removed"].as_i64(), Some(in_months), "{v}");
    // The run's duration covers its partitions (it once counted only the batches after them).
    assert!(
        v["duration_ms"].as_i64().unwrap() >= v["longest_batch_ms"].as_i64().unwrap(),
        "{v}"
    );
    let v = apply(&db, &dir, &retention(cutoff, "a.csv", &[]));
    assert_eq!(v["partitions_dropped"], serde_json::json!([]));
    assert_eq!(v["removed"].as_i64(), Some(boundary), "{v}");
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM tickets WHERE created_at < '{cutoff}'")),
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_class WHERE relname IN ('tickets_p2023_01', 'tickets_p2023_03', 'tickets_p2023_05')"),
        0,
        "the months are gone, not emptied"
    );
    assert_every_ticket_and_only_they_keyed(&db);
    // The archive holds every removed ticket once, whole months and boundary alike.
    let mut archived: Vec<String> = csv::Reader::from_path(dir.join("a.csv"))
        .unwrap()
        .records()
        .map(|r| r.unwrap()[0].to_string())
        .collect();
    let total = archived.len();
    archived.sort();
    archived.dedup();
    assert_eq!((total as i64, archived.len() as i64), (old, old));
    // The boundary month lost its old rows one by one; the live months were not touched.
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE created_at >= '2023-06-01' AND created_at < '2023-07-01'"),
        db.scalar("SELECT count(*) FROM tickets_p2023_06")
    );
}

/// Retention takes a month in one transaction; earlier versions took two, and one that
/// failed between them left the month detached (archived) with a mark. The next run drops it
/// with its keys, comments and tag links, and does not archive it again.
#[test]
fn retention_finishes_a_month_an_earlier_version_left_detached_and_archived() {
    let (db, dir) = partitioned_db("retention-leftover");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let month = "tickets_p2023_01";
    let ids = format!("SELECT id FROM {month}");
    let tickets = db.scalar(&format!("SELECT count(*) FROM {month}"));
    assert!(tickets > 0);
    let hanging = |table: &str| db.scalar(&format!("SELECT count(*) FROM {table} WHERE ticket_id IN ({ids})"));
    assert!(hanging("ticket_tags") > 0, "the month has tag links");
    db.execute(&format!(
        "ALTER TABLE tickets DETACH PARTITION {month};
         COMMENT ON TABLE {month} IS 'ticketops retention: detached and archived by operation 1'"
    ));
    let plan = ticketops(Some(&db), &dir, &retention("2000-01-01", "b.csv", &["--json"]))
        .run()
        .expect_code(0)
        .json();
    assert_eq!(plan["leftover_detached"], serde_json::json!([month]), "{plan}");
    let v = apply(&db, &dir, &retention("2000-01-01", "b.csv", &[]));
    assert_eq!(v["partitions_dropped"], serde_json::json!([month]), "{v}");
    assert_eq!(v["removed"].as_i64(), Some(tickets), "{v}");
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM pg_class WHERE relname = '{month}'")),
        0
    );
    assert_every_ticket_and_only_they_keyed(&db);
    let archived = std::fs::read_to_string(dir.join("b.csv")).unwrap_or_default();
    assert_eq!(archived.lines().count(), 0, "archived again: {archived}");
}

/// A comment an application adds to a ticket of a month while retention archives the month
/// must not be deleted unarchived: it goes into the month's comments, which retention holds
/// (SHARE) from before the archive, and waits. Either the month then goes and the comment fails
/// on its foreign key, as a comment on a purged ticket does; or the comment's insert holds
/// `comments` (its parent) while it waits, and either fails as a deadlock or retention cannot
/// take `comments` to detach the month within --lock-timeout, rolls back (the archive cut
/// back), the comment goes in, and the month is tried again, comment included. (When comments referenced the ticket's key, the month's
/// lock did not stop it.)
#[test]
fn a_comment_added_while_retention_archives_its_month_waits_for_it() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = partitioned_db("retention-late-comment");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let ticket = db.scalar("SELECT id FROM tickets ORDER BY created_at, id LIMIT 1");
    let author = db.scalar(&format!("SELECT requester_id FROM tickets WHERE id = {ticket}"));
    let month = db
        .strings(&format!(
            "SELECT tableoid::regclass::text FROM tickets WHERE id = {ticket}"
        ))
        .remove(0);
    let cutoff = db.strings(&format!(
        "SELECT to_char(date_trunc('month', created_at) + interval '1 month', 'YYYY-MM-DD') FROM tickets WHERE id = {ticket}"
    ))
    .remove(0);
    db.execute(&insert_comment_sql(
        &db,
        &ticket.to_string(),
        &author.to_string(),
        "early",
    ));
    let early = db.scalar("SELECT id FROM comments WHERE body = 'early'");
    // Holds the run inside the month's step, after the archive: its delete of the month's
    // comments waits for this row.
    let mut blocker = db.conn();
    blocker
        .batch_execute(&format!("BEGIN; SELECT 1 FROM comments WHERE id = {early} FOR UPDATE"))
        .unwrap();
    let archive_comments = dir.join("late-comments.csv");
    // (Its ticket read before the run: readers of tickets wait behind the run's lock of tickets
    // while the blocker holds it up.)
    let late = insert_comment_sql(&db, &ticket.to_string(), &author.to_string(), "late");
    let mut child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "-v",
            "cleanup",
            "retention",
            "--created-before",
            &cutoff,
            "--archive",
            "late.csv",
            "--archive-comments",
            archive_comments.to_str().unwrap(),
            "--apply",
            "--yes",
            "--lock-timeout",
            "3s",
        ],
    )
    .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(&archive_comments).map_or(true, |a| !a.contains("early")) {
        assert!(std::time::Instant::now() < deadline, "the month was not archived");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut app = db.conn();
    let late = std::thread::spawn(move || app.batch_execute(&late));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!late.is_finished(), "the comment went in while its month was archived");
    blocker.batch_execute("COMMIT").unwrap();
    let run = Run::from_output("cleanup retention".into(), child.wait_with_output().unwrap());
    let v = run.expect_code(0).json();
    assert_eq!(v["partitions_dropped"], serde_json::json!([month]), "{v}");
    let late_went_in = match late.join().unwrap() {
        Ok(()) => {
            assert!(v["retries"].as_i64().unwrap() >= 1, "{v}");
            1
        }
        Err(err) => {
            // (or, waiting for the month while holding comments, which the run waits for in
            // short tries, it is the one a deadlock check finds)
            let err = err.to_string();
            assert!(
                err.contains("foreign key") || err.contains("deadlock detected"),
                "{err}"
            );
            0
        }
    };
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), 0);
    let archived = std::fs::read_to_string(&archive_comments).unwrap();
    assert_eq!(
        (archived.matches("early").count(), archived.matches("late").count()),
        (1, late_went_in),
        "{archived}"
    );
}

/// A comment committed while retention waits for its month's lock is archived with the month:
/// the step's snapshot (its archive's and its deletes') is taken after the lock, not before it
/// by a query of the same transaction (the months of links and comments are looked up before
/// the transaction begins). Taken before, the comment was dropped with the month unarchived.
#[test]
fn a_comment_committed_while_retention_waits_for_its_month_is_archived() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = partitioned_db("retention-lock-wait");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let ticket = db.scalar("SELECT id FROM tickets ORDER BY created_at, id LIMIT 1");
    let author = db.scalar(&format!("SELECT requester_id FROM tickets WHERE id = {ticket}"));
    let month = partition_of(
        &db,
        &db.strings(&format!("SELECT external_id FROM tickets WHERE id = {ticket}"))
            .remove(0),
    );
    let cutoff = db
        .strings(&format!(
            "SELECT to_char(date_trunc('month', created_at) + interval '1 month', 'YYYY-MM-DD') FROM tickets WHERE id = {ticket}"
        ))
        .remove(0);
    let in_month = db.scalar(&format!("SELECT count(*) FROM {month}"));
    // An application's comment on a ticket of the month, not yet committed: the run's lock of
    // the month's comments waits for it.
    let mut app = db.conn();
    app.batch_execute(&format!(
        "BEGIN; {}",
        insert_comment_sql(&db, &ticket.to_string(), &author.to_string(), "waited-for")
    ))
    .unwrap();
    let archive_comments = dir.join("comments-archive.csv");
    let child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "cleanup",
            "retention",
            "--created-before",
            &cutoff,
            "--archive",
            "archive.csv",
            "--archive-comments",
            archive_comments.to_str().unwrap(),
            "--apply",
            "--yes",
            "--lock-timeout",
            "20s",
        ],
    )
    .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    // (pg_stat_activity is the whole server's.)
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'
                     AND query LIKE 'LOCK TABLE % IN SHARE MODE%'";
    while db.scalar(waiting) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never waited for the month's lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    app.batch_execute("COMMIT").unwrap();
    let run = Run::from_output("cleanup retention".into(), child.wait_with_output().unwrap());
    let v = run.expect_code(0).json();
    assert_eq!(v["partitions_dropped"], serde_json::json!([month]), "{v}");
    assert_eq!(v["removed"].as_i64(), Some(in_month), "{v}");
    assert_eq!(v["comments_removed"].as_i64(), Some(1), "{v}");
    assert_eq!(db.scalar("SELECT count(*) FROM comments"), 0);
    let archived = std::fs::read_to_string(&archive_comments).unwrap();
    assert_eq!(archived.matches("waited-for").count(), 1, "{archived}");
}

/// A month goes by dropping its partitions, which locks tickets, ticket_tags and comments
/// themselves and nothing else the application reads: a long transaction that has read
/// users, organizations, tags, ticketops' own operations and a live month does not hold it up.
/// (Detached first, a month took users, organizations, tags and bulk_operations exclusively —
/// the detached month's foreign keys get triggers of their own there, which its DROP then
/// removes — and locking the parents took every month, so this run timed out.)
#[test]
fn retention_drops_months_while_the_application_reads_users_and_the_live_months() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = partitioned_db("retention-readers");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let live = db
        .strings("SELECT tableoid::regclass::text FROM tickets WHERE created_at >= '2024-01-01' LIMIT 1")
        .remove(0);
    let gone =
        db.strings("SELECT DISTINCT tableoid::regclass::text FROM tickets WHERE created_at < '2023-03-01' ORDER BY 1");
    assert_eq!(gone, ["tickets_p2023_01", "tickets_p2023_02"]);
    let mut reader = db.conn();
    reader
        .batch_execute(&format!(
            "BEGIN; SELECT count(*) FROM users; SELECT count(*) FROM organizations; SELECT count(*) FROM tags;
             SELECT count(*) FROM bulk_operations; SELECT count(*) FROM {live}"
        ))
        .unwrap();
    let v = apply(
        &db,
        &dir,
        &retention("2023-03-01", "a.csv", &["--lock-timeout", "500ms", "--retries", "1"]),
    );
    assert_eq!(v["partitions_dropped"], serde_json::json!(gone), "{v}");
    assert_eq!(v["retries"], 0, "{v}");
    reader.batch_execute("COMMIT").unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE created_at < '2023-03-01'"),
        0
    );
    assert_every_ticket_and_only_they_keyed(&db);
}

/// Detaching and dropping a month takes the owner of the month and of tickets: a role that
/// may only read and write the tables removes the same tickets in batches, and says so.
#[test]
fn retention_by_a_role_that_does_not_own_the_months_goes_in_batches() {
    let (db, dir) = partitioned_db("retention-role");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    import(&db, &dir, "comments", &fixture("comments.csv"), &["--rejects", "c.csv"]);
    let (role, url) = writer_role(&db, "retainer");
    let cutoff = "2023-06-01";
    let old = db.scalar(&format!("SELECT count(*) FROM tickets WHERE created_at < '{cutoff}'"));
    let months = db.strings(&format!(
        "SELECT DISTINCT tableoid::regclass::text FROM tickets WHERE created_at < '{cutoff}' ORDER BY 1"
    ));
    let as_role = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "cleanup",
            "retention",
            "--created-before",
            cutoff,
            "--archive",
            "r.csv",
        ];
        args.extend_from_slice(extra);
        ticketops(Some(&db), &dir, &args).env("DATABASE_URL", &url).run()
    };
    let plan = as_role(&[]).expect_code(0).json();
    assert_eq!(plan["partitions"], serde_json::json!([]), "{plan}");
    assert_eq!(plan["months_not_owned"], serde_json::json!(months), "{plan}");
    assert_eq!(plan["batched"].as_i64(), Some(old), "{plan}");
    let run = as_role(&["--apply", "--yes"]);
    let v = run.expect_code(0).json();
    assert_eq!(
        (v["removed"].as_i64(), &v["partitions_dropped"]),
        (Some(old), &serde_json::json!([])),
        "{v}"
    );
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM tickets WHERE created_at < '{cutoff}'")),
        0
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM pg_class WHERE relname = '{}'",
            months[0]
        )),
        1,
        "the months stay, emptied"
    );
    assert_every_ticket_and_only_they_keyed(&db);
    let archived = csv::Reader::from_path(dir.join("r.csv")).unwrap().records().count();
    assert_eq!(archived as i64, old);
    db.execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"));
}

#[test]
fn retention_with_a_filter_goes_row_by_row_even_on_partitions() {
    let (db, dir) = partitioned_db("retention-filtered");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let closed_old = db.scalar("SELECT count(*) FROM tickets WHERE status = 'closed' AND created_at < '2024-01-01'");
    let all = db.scalar("SELECT count(*) FROM tickets");
    let v = apply(
        &db,
        &dir,
        &[
            "cleanup",
            "retention",
            "--created-before",
            "2024-01-01",
            "--status",
            "closed",
            "--archive",
            "a.csv",
        ],
    );
    assert_eq!(v["partitions_dropped"], serde_json::json!([]));
    assert_eq!(v["removed"].as_i64(), Some(closed_old));
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), all - closed_old);
    assert!(
        db.scalar("SELECT count(*) FROM tickets_p2023_01") > 0,
        "the month stays for its other tickets"
    );
}

#[test]
fn fix_apply_and_its_undo_read_each_ticket_in_its_month_and_one_without_a_key_by_id() {
    let (db, dir) = partitioned_db("fix-apply");
    let file = dir.join("three.csv");
    std::fs::write(
        &file,
        "external_id,subject,status,requester_email,created_at
A-1,March,open,ann@example.com,2023-03-05T10:00:00Z
B-1,July,open,bob@example.com,2024-07-09T10:00:00Z
C-1,Also July,open,bob@example.com,2024-07-19T10:00:00Z
",
    )
    .unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    std::fs::write(
        dir.join("fixes.csv"),
        "external_id,priority,subject\nA-1,high,\nB-1,,July (edited)\nC-1,urgent,\n",
    )
    .unwrap();
    let dry = ticketops(Some(&db), &dir, &["--json", "fix", "apply", "fixes.csv"])
        .run()
        .expect_code(0)
        .json();
    assert_eq!(dry["would_change"], 3, "{dry}");
    let applied = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "apply", "fixes.csv", "--apply", "--yes"],
    )
    .run()
    .expect_code(0)
    .json();
    assert_eq!(applied["changed"], 3, "{applied}");
    assert_eq!(
        db.strings("SELECT external_id || ' ' || priority || ' ' || subject FROM tickets ORDER BY 1"),
        set(&["A-1 high March", "B-1 normal July (edited)", "C-1 urgent Also July"])
    );
    let op = applied["operation_id"].as_i64().unwrap();
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM audit_log WHERE operation_id = {op}")),
        3
    );
    // As if an application had written C-1 without its key. The undo, too, finds each ticket
    // in its month, and the one without a key by id; two tickets edited since, one of them
    // C-1, are left alone, and reverted with --force (read and locked in their month first,
    // the one without a key by id).
    // (Straight through a connection: `db.execute` would give C-1 its key back.)
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        "DELETE FROM ticket_keys WHERE external_id = 'C-1';
         UPDATE tickets SET priority = 'low' WHERE external_id IN ('A-1', 'C-1')",
    )
    .unwrap();
    let undo = |force: bool| {
        let op = op.to_string();
        let mut args = vec!["--json", "undo", &op, "--apply", "--yes"];
        if force {
            args.push("--force");
        }
        ticketops(Some(&db), &dir, &args).run().expect_code(0).json()
    };
    let undone = undo(false);
    assert_eq!(
        (&undone["reverted"], &undone["conflicts"]),
        (&1.into(), &2.into()),
        "{undone}"
    );
    let forced = undo(true);
    assert_eq!(
        (&forced["reverted"], &forced["already_reverted"], &forced["conflicts"]),
        (&2.into(), &1.into(), &0.into()),
        "{forced}"
    );
    // Once more: all three are as before, the one without a key counted too.
    let again = undo(false);
    assert_eq!(
        (&again["reverted"], &again["already_reverted"], &again["conflicts"]),
        (&0.into(), &3.into(), &0.into()),
        "{again}"
    );
    assert_eq!(
        db.strings("SELECT external_id || ' ' || priority || ' ' || subject FROM tickets ORDER BY 1"),
        set(&["A-1 normal March", "B-1 normal July", "C-1 normal Also July"])
    );
    // Looked up by its external_id, a ticket without a key is found by nothing — as on the
    // distributed layout (tickets.external_id has no index on partitions): fix apply rejects it.
    let run = ticketops(
        Some(&db),
        &dir,
        &["--json", "fix", "apply", "fixes.csv", "--apply", "--yes"],
    )
    .run();
    let v = run.expect_code(3).json();
    assert_eq!(
        (v["changed"].as_i64(), v["unknown"].as_i64()),
        (Some(2), Some(1)),
        "{v}"
    );
    assert_eq!(
        db.strings("SELECT external_id || ' ' || priority FROM tickets ORDER BY 1"),
        set(&["A-1 high", "B-1 normal", "C-1 normal"])
    );
}

/// A changed import reads, compares and updates each changed ticket in its one month, found
/// through its key: by id through the parent, every partition was probed for each row (a
/// changed import of 20,000 tickets spread over 1M took 148 s against plain's 3.4).
#[test]
fn a_changed_import_reads_and_updates_each_ticket_in_its_month_alone() {
    let (db, dir) = partitioned_db("changed-month");
    let file = dir.join("three.csv");
    std::fs::write(
        &file,
        format!("{TWO_MONTHS}C-1,First of January,open,cid@example.com,,2024-01-15T10:00:00Z\n"),
    )
    .unwrap();
    import(&db, &dir, "tickets", &file, &[]).0.expect_code(0);
    let month = partition_of(&db, "A-1");
    // Scans of a month's partition, or of every other (each backend counts its own and adds
    // them to the server's when it exits: read until two readings agree).
    let scans = |of_month: bool| {
        let sql = format!(
            "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)), 0)::bigint FROM pg_stat_user_tables
             WHERE relname LIKE 'tickets\\_%' AND (relname = '{month}') = {of_month}"
        );
        let mut last = db.scalar(&sql);
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = db.scalar(&sql);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    };
    let (month_before, others_before) = (scans(true), scans(false));

    let changed = dir.join("changed.csv");
    std::fs::write(
        &changed,
        "external_id,subject,status,requester_email,tags,created_at\n\
         A-1,First of March (changed),pending,ann@example.com,vip,2023-03-05T10:00:00Z\n",
    )
    .unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &changed, &[]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 1, 0, 0, 0, 0], "{}", run.explain());
    assert!(scans(true) > month_before, "the ticket's month was read");
    assert_eq!(scans(false), others_before, "no other month was read");
    // (Read after the counts: by external_id, this reads every month.)
    assert_eq!(
        db.strings("SELECT subject || ' ' || status FROM tickets WHERE external_id = 'A-1'"),
        set(&["First of March (changed) pending"])
    );
}

/// An import in one transaction (`--dry-run`, `--atomic`) that makes months holds the default
/// partition locked to its end, and every read through the parent waits for that lock: the
/// read-ahead, on a second connection, waited the whole lock timeout at every batch and then
/// left the lookup to the writer (141 s for 60,000 rows of an old dump). It now gives up on
/// its own after one short wait. With a lock timeout of 20 s and six batches, the old
/// behaviour takes well over a minute.
#[test]
fn an_import_in_one_transaction_that_makes_months_does_not_wait_for_its_own_locks() {
    let (db, dir) = partitioned_db("one-transaction-months");
    let file = generate(&dir, "old.csv", &["tickets", "--rows", "300", "--start", "1999-01-01"]);
    for mode in ["--dry-run", "--atomic"] {
        let (run, s) = import(
            &db,
            &dir,
            "tickets",
            &file,
            &[mode, "--batch-size", "50", "--lock-timeout", "20s"],
        );
        run.expect_code(0);
        assert_eq!(s["inserted"], 300, "{mode}: {s}");
        assert!(
            s["duration_ms"].as_i64().unwrap() < 20_000,
            "{mode} waited for a lock of its own: {s}"
        );
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM tickets WHERE created_at < '2002-01-01' AND tableoid::regclass::text <> 'tickets_default'"),
        300
    );
}

/// An import commits the months it makes at once, in a short transaction of their own. Making
/// a month locks the default partitions exclusively (every query on tickets not pruned to its
/// months waits for them) and users, organizations, tags and bulk_operations against writes;
/// inside the batch's transaction, as one writer made them, those locks stayed until the batch
/// ended — here, while it waited for a ticket the application holds.
#[test]
fn an_import_commits_the_months_it_makes_before_its_batch_goes_on() {
    use diesel::connection::SimpleConnection;
    let (db, dir) = partitioned_db("months-committed-first");
    let header = "external_id,subject,requester_email,status,created_at";
    let first = dir.join("first.csv");
    std::fs::write(
        &first,
        format!("{header}\nT-1,Printer,ann@example.com,open,2024-05-01 10:00\n"),
    )
    .unwrap();
    import(&db, &dir, "tickets", &first, &[]).0.expect_code(0);
    let mut app = db.conn();
    // (In its month: through tickets the application would hold the default partitions too,
    // and making a month waits for that whoever makes it.)
    let month = partition_of(&db, "T-1");
    app.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM {month} WHERE external_id = 'T-1' FOR UPDATE"
    ))
    .unwrap();
    // The held ticket changed, and a ticket of a month the database has no partition for.
    let second = dir.join("second.csv");
    std::fs::write(
        &second,
        format!("{header}\nT-1,Printer on fire,ann@example.com,open,2024-05-01 10:00\nT-2,Old,bob@example.com,solved,2015-03-10 09:00\n"),
    )
    .unwrap();
    let child = ticketops(
        Some(&db),
        &dir,
        &[
            "--json",
            "import",
            "tickets",
            second.to_str().unwrap(),
            "--lock-timeout",
            "20s",
        ],
    )
    .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    // (pg_locks and pg_stat_activity are the whole server's; other tests' databases, cloned
    // from one template, have tables with the same OIDs.)
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    while db.scalar(waiting) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the import never waited for the held ticket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let held = db.strings(
        "SELECT relation::regclass::text FROM pg_locks
         WHERE granted AND mode = 'AccessExclusiveLock'
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND relation IN
               ('tickets_default'::regclass, 'ticket_tags_default'::regclass, 'comments_default'::regclass)
         ORDER BY 1",
    );
    let month_made = db.scalar("SELECT count(*) FROM pg_class WHERE relname = 'tickets_p2015_03'");
    app.batch_execute("COMMIT").unwrap();
    let run = Run::from_output("import".into(), child.wait_with_output().unwrap());
    let summary = run.expect_code(0).json();
    assert_eq!(
        (summary["inserted"].as_i64(), summary["updated"].as_i64()),
        (Some(1), Some(1)),
        "{summary}"
    );
    assert_eq!(
        held,
        Vec::<String>::new(),
        "the batch held the default partitions while it waited"
    );
    assert_eq!(month_made, 1, "the month was not committed before the batch went on");
    assert_eq!(partition_of(&db, "T-2"), "tickets_p2015_03");
}

#[test]
fn a_reimport_in_batches_finds_tickets_whose_created_at_moved_out_of_their_batch() {
    let (db, dir) = partitioned_db("moved-in-batches");
    // 40 tickets over 2023, in file order = id order, so that a re-import's read-ahead reads
    // each batch as the id range after the previous one, bounded by the batch's created_at.
    let rows = |moved: &dyn Fn(usize) -> Option<&'static str>| {
        let mut csv = String::from("external_id,subject,status,requester_email,created_at\n");
        for i in 0..40 {
            let created = moved(i)
                .map(str::to_string)
                .unwrap_or_else(|| format!("2023-{:02}-10T10:00:00Z", 1 + i % 12));
            csv.push_str(&format!("M-{i},Subject {i},open,user{i}@example.com,{created}\n"));
        }
        csv
    };
    let file = dir.join("first.csv");
    std::fs::write(&file, rows(&|_| None)).unwrap();
    import(&db, &dir, "tickets", &file, &["--batch-size", "10"])
        .0
        .expect_code(0);
    // One ticket of each batch of 10 moves to a year no other row of its batch has.
    let moved_to = |i: usize| match i % 10 {
        3 => Some(if i < 20 {
            "2021-06-01T00:00:00Z"
        } else {
            "2025-02-01T00:00:00Z"
        }),
        _ => None,
    };
    let second = dir.join("second.csv");
    std::fs::write(&second, rows(&moved_to)).unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &second, &["--batch-size", "10"]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 4, 36, 0, 0, 0], "{}", run.explain());
    assert_eq!(db.scalar("SELECT count(*) FROM tickets"), 40);
    assert_eq!(partition_of(&db, "M-3"), "tickets_p2021_06");
    assert_eq!(partition_of(&db, "M-33"), "tickets_p2025_02");
    // And again: nothing changes, whichever way each ticket is found.
    let (run, summary) = import(&db, &dir, "tickets", &second, &["--batch-size", "10"]);
    run.expect_code(0);
    assert_eq!(outcome(&summary), [0, 0, 40, 0, 0, 0], "{}", run.explain());
}

#[test]
fn an_import_refreshes_the_statistics_of_the_months_it_changed_enough_and_no_others() {
    let (db, dir) = partitioned_db("analyze-months");
    let analyzed = |db: &TestDb| {
        db.strings(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_partition_tree('tickets') t ON t.relid = s.relid
             WHERE s.last_analyze IS NOT NULL",
        )
    };
    // 2 tickets a month over two years: no month gains more than autovacuum's 50 rows.
    let spread = generate(&dir, "spread.csv", &["tickets", "--rows", "48", "--seed", "5"]);
    import(&db, &dir, "tickets", &spread, &[]).0.expect_code(0);
    assert_eq!(analyzed(&db), Vec::<String>::new());
    // 120 tickets in June 2025, 20 in July: June's statistics are stale, July's not yet.
    let mut csv = String::from("external_id,subject,status,requester_email,created_at\n");
    for i in 0..140 {
        let when = if i < 120 {
            format!("2025-06-{:02}T12:00:00Z", 1 + i % 30)
        } else {
            format!("2025-07-{:02}T12:00:00Z", 1 + i % 30)
        };
        csv.push_str(&format!("J-{i},June {i},open,ann@example.com,{when}\n"));
    }
    let file = dir.join("june.csv");
    std::fs::write(&file, csv).unwrap();
    let (run, _) = import(&db, &dir, "tickets", &file, &["-v"]);
    run.expect_code(0)
        .stderr_has("1 month(s) of")
        .stderr_has("of tickets and of their tag links");
    assert_eq!(analyzed(&db), vec![partition_of(&db, "J-0")]);
    // Its month of tag links with it, and no other month of them.
    assert_eq!(
        db.strings(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_partition_tree('ticket_tags') t ON t.relid = s.relid
             WHERE s.last_analyze IS NOT NULL"
        ),
        vec![partition_of(&db, "J-0").replace("tickets_", "ticket_tags_")]
    );
    assert_ne!(partition_of(&db, "J-0"), partition_of(&db, "J-139"));
}

/// A month removed outside ticketops (pg_partman's retention, a DROP by hand) leaves its
/// tickets' keys, comments and tag links: doctor flags a pg_partman retention on tickets, an
/// import of such a ticket fails naming the key and the cause, and the clean-up of
/// docs/scaling.md ("Removing old months") lets it through again.
#[test]
fn a_month_dropped_outside_ticketops_is_named_and_its_leftovers_can_be_cleaned_up() {
    let (db, dir) = partitioned_db("dropped-outside");
    let file = dir.join("two-months.csv");
    std::fs::write(&file, TWO_MONTHS).unwrap();
    import(&db, &dir, "tickets", &file, &[]);
    let comments = dir.join("comments.csv");
    std::fs::write(
        &comments,
        "external_id,ticket_external_id,author_email,body,created_at\n\
         C-1,A-1,ann@example.com,On the March ticket,2023-03-06T10:00:00Z\n\
         C-2,B-1,bob@example.com,On the July ticket,2024-07-10T10:00:00Z\n",
    )
    .unwrap();
    import(&db, &dir, "comments", &comments, &[]);

    db.execute("UPDATE partman.part_config SET retention = '12 months' WHERE parent_table = 'public.tickets'");
    ticketops(Some(&db), &dir, &["doctor"])
        .run()
        .expect_code(1)
        .stderr_has("pg_partman's retention is set for tickets (12 months)");
    db.execute("UPDATE partman.part_config SET retention = NULL WHERE parent_table = 'public.tickets'");

    // March 2023 goes as pg_partman's retention would take it, detached and dropped — which
    // its months of tag links and comments, referencing it, refuse — and then with those months.
    let march = partition_of(&db, "A-1");
    let err = diesel::connection::SimpleConnection::batch_execute(
        &mut db.conn(),
        &format!("ALTER TABLE tickets DETACH PARTITION {march}; DROP TABLE {march}"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("other objects depend on it"), "{err}");
    let links = march.replace("tickets_", "ticket_tags_");
    let of_comments = march.replace("tickets_", "comments_");
    db.execute(&format!(
        "ALTER TABLE ticket_tags DETACH PARTITION {links}; DROP TABLE {links};
         ALTER TABLE comments DETACH PARTITION {of_comments}; DROP TABLE {of_comments};
         ALTER TABLE tickets DETACH PARTITION {march}; DROP TABLE {march}"
    ));
    let run = ticketops(Some(&db), &dir, &["import", "tickets", file.to_str().unwrap()]).run();
    run.expect_code(1)
        .stderr_has("Key (external_id)=(A-1) already exists in ticket_keys")
        .stderr_has("month was dropped outside ticketops");

    // The clean-up as the docs give it (its \copy of the comments is psql's, left out here).
    let scaling = std::fs::read_to_string(project_dir().join("docs/scaling.md")).unwrap();
    let section = &scaling[scaling.find("### Removing old months").unwrap()..];
    let sql = &section[section.find("```sql\n").unwrap() + 7..];
    let sql: String = sql[..sql.find("```").unwrap()]
        .lines()
        .filter(|l| !l.starts_with("\\copy"))
        .collect::<Vec<_>>()
        .join("\n");
    db.execute(&sql);
    assert_every_ticket_and_only_they_keyed(&db);
    assert_eq!(db.strings("SELECT body FROM comments"), ["On the July ticket"]);
    assert_eq!(db.strings("SELECT external_id FROM comment_keys"), ["C-2"]);

    let (_, summary) = import(&db, &dir, "tickets", &file, &[]);
    assert_eq!(
        (summary["inserted"].as_u64(), summary["unchanged"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(db.scalar("SELECT count(*) FROM tickets WHERE external_id = 'A-1'"), 1);
}

/// Whole months are batches to `--sleep` and to the signals: a pause between two months, and
/// SIGTERM during the pause stops the run before the next month (exit 143, the months done
/// recorded, the rest still there for the next run).
#[test]
fn retention_sleeps_between_months_and_stops_between_them_on_sigterm() {
    let (db, dir) = partitioned_db("retention-sleep-term");
    import(&db, &dir, "tickets", &fixture("tickets.csv"), &["--rejects", "t.csv"]);
    let cutoff = "2023-06-01";
    let remaining = || {
        db.scalar(&format!(
            "SELECT count(DISTINCT tableoid) FROM tickets WHERE created_at < '{cutoff}'"
        ))
    };
    let months = remaining();
    assert_eq!(months, 5);
    let child = ticketops(
        Some(&db),
        &dir,
        &retention(cutoff, "a.csv", &["--json", "--apply", "--yes", "--sleep", "3s"]),
    )
    .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while remaining() == months {
        assert!(std::time::Instant::now() < deadline, "no month went");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The first month is gone and the run is pausing before the second.
    kill(&child, "-TERM");
    let run = Run::from_output("cleanup retention --sleep 3s".into(), child.wait_with_output().unwrap());
    let summary = run.expect_code(143).json();
    assert_eq!(summary["status"], "interrupted", "{summary}");
    assert_eq!(remaining(), months - 1, "{summary}");
    assert_eq!(
        summary["partitions_dropped"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    // The pause ends with the signal, not after its 3 s.
    assert!(summary["duration_ms"].as_u64().unwrap() < 2500, "{summary}");
    assert_every_ticket_and_only_they_keyed(&db);
}

#[test]
fn the_partitioned_layout_is_made_in_public_or_not_at_all() {
    // A database whose search_path puts another schema first: the plain tables went there and
    // the partitioned layout, whose SQL names public.tickets, then failed half way.
    let db = TestDb::empty();
    let dir = scratch("search-path");
    db.execute(&format!(
        "CREATE SCHEMA app; ALTER DATABASE {} SET search_path = app, public",
        db.name
    ));
    ticketops(Some(&db), &dir, &["migrate", "run", "--layout", "partitioned"])
        .run()
        .expect_code(2)
        .stderr_has("would make them in \"app\" (search_path = app, public)")
        .stderr_has("PGOPTIONS='-c search_path=public'");
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname IN ('app', 'public')"),
        0,
        "nothing migrated"
    );
    ticketops(Some(&db), &dir, &["migrate", "run", "--layout", "partitioned"])
        .env("PGOPTIONS", "-c search_path=public")
        .run()
        .expect_code(0);
    // Every later command finds the tables in public through the database's own search_path.
    let file = dir.join("dataset.csv");
    std::fs::write(&file, DATASET).unwrap();
    let (run, summary) = import(&db, &dir, "tickets", &file, &[]);
    run.expect_code(0);
    assert_eq!(summary["inserted"], 6);
    assert!(partition_of(&db, "C-1").starts_with("tickets_p2023_01"));
    ticketops(Some(&db), &dir, &["doctor"]).run().expect_code(0);
}
