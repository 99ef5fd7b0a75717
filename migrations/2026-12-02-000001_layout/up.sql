-- Which layout the schema has: `plain` (one tickets table), `partitioned` (tickets range-
-- partitioned by created_at with pg_partman, and a ticket_keys table that keeps external_id
-- unique across partitions), later `distributed` (Citus). Chosen once, on an empty database,
-- by `ticketops migrate run --layout …`; every command reads it. One row.
CREATE TABLE ticketops_layout (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    layout text NOT NULL DEFAULT 'plain' CHECK (layout IN ('plain', 'partitioned', 'distributed')),
    chosen_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO ticketops_layout DEFAULT VALUES;
