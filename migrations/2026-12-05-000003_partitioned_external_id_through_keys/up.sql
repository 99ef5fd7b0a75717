-- On the partitioned layout, every lookup of a ticket by external_id goes through ticket_keys
-- (unique there): the index on tickets.external_id, one a month, only cost each new ticket a
-- third index entry besides its key's two (a 1M import ~4 % slower, the initial load 0.8 s
-- more; docs/performance.md). A ticket written without its key is then found by no lookup by
-- external_id, as on the distributed layout (an application writing tickets must write their
-- keys; docs/scaling.md). Dropping the index takes tickets for a moment. New partitioned
-- databases get the same from src/layout/partitioned.sql. Other layouts: nothing changes.
DO $migration$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;
    DROP INDEX IF EXISTS tickets_external_id_idx;
END
$migration$;
