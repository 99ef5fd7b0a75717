-- On the partitioned layout, tag links carry their ticket's created_at and are partitioned by
-- it, month for month with tickets (by pg_partman, as tickets), each month of links with a
-- foreign key to its month of tickets instead of one from all links to ticket_keys. Retention
-- then drops a month of links with its month of tickets, where it deleted them row by row and
-- each key deleted was checked against them (of 12 whole months of 2M tickets, the links 1.7 s
-- and half the keys' 8.7 s; docs/performance.md). New partitioned databases get the same from
-- src/layout/partitioned.sql. The links are copied (a lock on them meanwhile); a link whose
-- ticket is gone (its month dropped outside ticketops) points at nothing and is not kept.
-- Other layouts: nothing changes.
DO $migration$
DECLARE
    t record;
    orphans bigint;
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;

    CREATE FUNCTION ticketops_month_keys() RETURNS integer LANGUAGE plpgsql AS $fn$
    DECLARE
        m record;
        added integer := 0;
    BEGIN
        FOR m IN
            SELECT l.oid::regclass AS links, t.oid::regclass AS tickets
            FROM pg_inherits li JOIN pg_class l ON l.oid = li.inhrelid
            JOIN pg_inherits ti ON ti.inhparent = 'tickets'::regclass
            JOIN pg_class t ON t.oid = ti.inhrelid
            WHERE li.inhparent = 'ticket_tags'::regclass
              AND pg_get_expr(l.relpartbound, l.oid) = pg_get_expr(t.relpartbound, t.oid)
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                              WHERE c.conrelid = l.oid AND c.contype = 'f' AND c.confrelid = t.oid)
              -- (adding one takes the owner: a role that may only write the tables leaves them)
              AND pg_has_role(l.relowner, 'USAGE') AND pg_has_role(t.relowner, 'USAGE')
            ORDER BY 1
        LOOP
            EXECUTE format('ALTER TABLE %s ADD FOREIGN KEY (ticket_id, ticket_created_at) REFERENCES %s (id, created_at)',
                           m.links, m.tickets);
            added := added + 1;
        END LOOP;
        RETURN added;
    END
    $fn$;

    CREATE FUNCTION ticketops_create_months(months timestamptz[], month_keys boolean DEFAULT true)
        RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM partman.create_partition_time('public.tickets', months, p_analyze := false);
        PERFORM partman.create_partition_time('public.ticket_tags', months, p_analyze := false);
        IF month_keys THEN
            PERFORM ticketops_month_keys();
        END IF;
    END
    $fn$;

    LOCK TABLE ticket_tags IN SHARE MODE;
    ALTER TABLE ticket_tags RENAME TO ticket_tags_before_months;
    ALTER TABLE ticket_tags_before_months RENAME CONSTRAINT ticket_tags_pkey TO ticket_tags_before_months_pkey;
    ALTER INDEX ticket_tags_tag_id_idx RENAME TO ticket_tags_before_months_tag_id_idx;
    ALTER TABLE ticket_tags_before_months RENAME CONSTRAINT ticket_tags_tag_id_fkey TO ticket_tags_before_months_tag_id_fkey;

    CREATE TABLE ticket_tags (
        ticket_id bigint NOT NULL,
        tag_id bigint NOT NULL REFERENCES tags (id),
        ticket_created_at timestamptz NOT NULL,
        PRIMARY KEY (ticket_id, ticket_created_at, tag_id)
    ) PARTITION BY RANGE (ticket_created_at);
    CREATE INDEX ticket_tags_tag_id_idx ON ticket_tags (tag_id);

    -- The months of tickets as they are, the same premake.
    PERFORM partman.create_parent(
        p_parent_table := 'public.ticket_tags',
        p_control := 'ticket_created_at',
        p_type := 'native',
        p_interval := 'monthly',
        p_premake := coalesce((SELECT premake FROM partman.part_config WHERE parent_table = 'public.tickets'), 4),
        p_start_partition := to_char(date_trunc('month', now()) - interval '12 months', 'YYYY-MM-DD HH24:MI:SS')
    );
    UPDATE partman.part_config SET infinite_time_partitions = true WHERE parent_table = 'public.ticket_tags';
    FOR t IN
        SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz AS starts
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tickets'::regclass AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
    LOOP
        PERFORM partman.create_partition_time('public.ticket_tags', ARRAY[t.starts], p_analyze := false);
    END LOOP;

    INSERT INTO ticket_tags (ticket_id, tag_id, ticket_created_at)
    SELECT l.ticket_id, l.tag_id, k.created_at
    FROM ticket_tags_before_months l
    JOIN ticket_keys k ON k.ticket_id = l.ticket_id
    WHERE EXISTS (SELECT 1 FROM tickets x WHERE x.id = k.ticket_id AND x.created_at = k.created_at);
    orphans := (SELECT count(*) FROM ticket_tags_before_months) - (SELECT count(*) FROM ticket_tags);
    IF orphans > 0 THEN
        RAISE NOTICE 'ticketops: % tag link(s) of tickets no longer in tickets (a month dropped outside ticketops) not kept',
            orphans;
    END IF;
    DROP TABLE ticket_tags_before_months;

    -- The triggers that forget import fingerprints, on the new table.
    PERFORM ticketops_fingerprint_triggers();
    PERFORM ticketops_month_keys();
END
$migration$;
