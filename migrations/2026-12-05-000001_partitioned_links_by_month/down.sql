-- Back to one table of tag links referencing ticket_keys ON DELETE RESTRICT (partitioned
-- layout only).
DO $migration$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;
    LOCK TABLE ticket_tags IN SHARE MODE;
    CREATE TABLE ticket_tags_unpartitioned (
        ticket_id bigint NOT NULL,
        tag_id bigint NOT NULL,
        PRIMARY KEY (ticket_id, tag_id)
    );
    INSERT INTO ticket_tags_unpartitioned SELECT ticket_id, tag_id FROM ticket_tags;
    DROP TABLE ticket_tags;
    DELETE FROM partman.part_config WHERE parent_table = 'public.ticket_tags';
    DROP TABLE IF EXISTS partman.template_public_ticket_tags;
    ALTER TABLE ticket_tags_unpartitioned RENAME TO ticket_tags;
    ALTER TABLE ticket_tags RENAME CONSTRAINT ticket_tags_unpartitioned_pkey TO ticket_tags_pkey;
    ALTER TABLE ticket_tags ADD CONSTRAINT ticket_tags_ticket_id_fkey
        FOREIGN KEY (ticket_id) REFERENCES ticket_keys (ticket_id) ON DELETE RESTRICT;
    ALTER TABLE ticket_tags ADD CONSTRAINT ticket_tags_tag_id_fkey FOREIGN KEY (tag_id) REFERENCES tags (id);
    CREATE INDEX ticket_tags_tag_id_idx ON ticket_tags (tag_id);
    PERFORM ticketops_fingerprint_triggers();
    DROP FUNCTION ticketops_create_months(timestamptz[], boolean);
    DROP FUNCTION ticketops_month_keys();
END
$migration$;
