-- Back to an index on tickets.external_id in every month (partitioned layout only). Builds it
-- in the migration's transaction, holding off writers to tickets meanwhile (~1 s a million
-- tickets).
DO $migration$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'partitioned' THEN
        RETURN;
    END IF;
    CREATE INDEX IF NOT EXISTS tickets_external_id_idx ON tickets (external_id);
END
$migration$;
