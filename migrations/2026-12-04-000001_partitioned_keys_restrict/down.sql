DO $$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;
    ALTER TABLE ticket_tags DROP CONSTRAINT ticket_tags_ticket_id_fkey,
        ADD CONSTRAINT ticket_tags_ticket_id_fkey
        FOREIGN KEY (ticket_id) REFERENCES ticket_keys (ticket_id) ON DELETE CASCADE;
    ALTER TABLE comments DROP CONSTRAINT comments_ticket_id_fkey,
        ADD CONSTRAINT comments_ticket_id_fkey
        FOREIGN KEY (ticket_id) REFERENCES ticket_keys (ticket_id) ON DELETE CASCADE;
END $$;
