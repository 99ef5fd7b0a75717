-- On the partitioned layout, comments and tag links reference ticket_keys ON DELETE RESTRICT
-- instead of CASCADE. ticketops deletes a ticket's comments and tag links itself, set-based,
-- before its key; the cascades then found nothing but still ran a DELETE for every key deleted,
-- each setting up the tag links' transition capture: retention of 12 whole months of 1M
-- tickets 11.1-11.3 s, 9.5-9.6 s with RESTRICT (NO ACTION, which also looks for a new row with
-- the same key, took 12.4-12.5 s). Adding the new keys reads both tables (~0.25 s per million
-- tag links) while writes to them wait. Other layouts: nothing changes.
DO $$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;
    ALTER TABLE ticket_tags DROP CONSTRAINT ticket_tags_ticket_id_fkey,
        ADD CONSTRAINT ticket_tags_ticket_id_fkey
        FOREIGN KEY (ticket_id) REFERENCES ticket_keys (ticket_id) ON DELETE RESTRICT;
    ALTER TABLE comments DROP CONSTRAINT comments_ticket_id_fkey,
        ADD CONSTRAINT comments_ticket_id_fkey
        FOREIGN KEY (ticket_id) REFERENCES ticket_keys (ticket_id) ON DELETE RESTRICT;
END $$;
