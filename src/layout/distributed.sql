-- The distributed layout, applied by `ticketops migrate run --layout distributed` to an empty
-- database on a Citus coordinator whose plain schema the migrations have just created, with
-- the workers registered (`citus_add_node`). See docs/scaling.md for the choices.
--
-- * tickets, ticket_tags, comments and audit_log are hash-distributed by ticket id (audit_log by
--   row_id) and co-located: one company's tickets spread evenly over every worker, and a
--   ticket's tags, comments and history live on its shard, so the per-ticket joins, the
--   cascades and an UPDATE … RETURNING with its audit rows run on the workers.
-- * users, organizations, tags and bulk_operations are reference tables (a copy on every
--   node): the tickets' foreign keys to them are checked on the worker, and e-mail and name
--   stay unique by their own unique indexes.
-- * A unique key of a distributed table must contain its distribution column, so external_id
--   cannot be unique on tickets: ticket_keys, distributed by external_id, holds one row per
--   ticket (as on the partitioned layout), written in the same (two-phase) transaction.
--   comments.external_id likewise moves to comment_keys.
-- * Identity columns cannot be distributed: the ids come from sequences, which Citus gives
--   each node a disjoint range of; ticketops draws them on the coordinator.

-- Citus distributes no table with triggers (but as "unsafe"): the ones that forget import
-- fingerprints go, and an import on this layout never skips a record by its fingerprint.
DROP TRIGGER tickets_forget_fingerprint ON tickets;
DROP TRIGGER ticket_tags_inserted_forget_fingerprints ON ticket_tags;
DROP TRIGGER ticket_tags_updated_forget_fingerprints ON ticket_tags;
DROP TRIGGER ticket_tags_deleted_forget_fingerprints ON ticket_tags;
DROP TRIGGER users_forget_fingerprints ON users;
DROP TRIGGER organizations_forget_fingerprints ON organizations;
DROP TRIGGER tags_forget_fingerprints ON tags;

CREATE TABLE ticket_keys (
    external_id text COLLATE "C" PRIMARY KEY,
    ticket_id bigint NOT NULL,
    created_at timestamptz NOT NULL
);

-- Deleting tickets deletes their keys by ticket id.
CREATE INDEX ticket_keys_ticket_id_idx ON ticket_keys (ticket_id);

-- With the comment's ticket: the shard its comment lives on (and how a ticket's go with it).
CREATE TABLE comment_keys (
    external_id text COLLATE "C" PRIMARY KEY,
    comment_id bigint NOT NULL,
    ticket_id bigint NOT NULL
);
CREATE INDEX comment_keys_ticket_id_idx ON comment_keys (ticket_id);

-- Identities become sequences with the same names (pg_get_serial_sequence still finds them).
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['organizations', 'users', 'bulk_operations', 'tickets', 'comments', 'tags', 'audit_log'] LOOP
        EXECUTE format('ALTER TABLE %I ALTER COLUMN id DROP IDENTITY', t);
        EXECUTE format('CREATE SEQUENCE %I AS bigint OWNED BY %I.id', t || '_id_seq', t);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN id SET DEFAULT nextval(%L)', t, t || '_id_seq');
    END LOOP;
END $$;

ALTER TABLE tickets DROP CONSTRAINT tickets_external_id_key;
-- Lookups by external_id (tickets show, --ids-file, imports) probe this index on every shard.
CREATE INDEX tickets_external_id_idx ON tickets (external_id);
ALTER TABLE comments DROP CONSTRAINT comments_external_id_key;
CREATE INDEX comments_external_id_idx ON comments (external_id);
-- comments' own key must contain the distribution column.
ALTER TABLE comments DROP CONSTRAINT comments_pkey;
ALTER TABLE comments ADD PRIMARY KEY (ticket_id, id);
ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey;
ALTER TABLE audit_log ADD PRIMARY KEY (row_id, id);

-- Every batch writes tickets and audit rows on many shards at once and then its checkpoint in
-- bulk_operations; Citus refuses that write to a reference table that the distributed tables
-- hold foreign keys to. The operation ids come from ticketops alone: those two keys go.
ALTER TABLE tickets DROP CONSTRAINT tickets_last_operation_id_fkey;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_operation_id_fkey;

-- Foreign keys between the co-located tables come back once they are all distributed.
ALTER TABLE comments DROP CONSTRAINT comments_ticket_id_fkey;
ALTER TABLE ticket_tags DROP CONSTRAINT ticket_tags_ticket_id_fkey;

SELECT create_reference_table('organizations');
SELECT create_reference_table('users');
SELECT create_reference_table('bulk_operations');
SELECT create_reference_table('tags');
SELECT create_reference_table('ticketops_layout');
SELECT create_distributed_table('tickets', 'id');
SELECT create_distributed_table('ticket_tags', 'ticket_id', colocate_with := 'tickets');
SELECT create_distributed_table('comments', 'ticket_id', colocate_with := 'tickets');
SELECT create_distributed_table('audit_log', 'row_id', colocate_with := 'tickets');
SELECT create_distributed_table('ticket_keys', 'external_id');
SELECT create_distributed_table('comment_keys', 'external_id', colocate_with := 'ticket_keys');

ALTER TABLE comments ADD CONSTRAINT comments_ticket_id_fkey
    FOREIGN KEY (ticket_id) REFERENCES tickets (id) ON DELETE CASCADE;
ALTER TABLE ticket_tags ADD CONSTRAINT ticket_tags_ticket_id_fkey
    FOREIGN KEY (ticket_id) REFERENCES tickets (id) ON DELETE CASCADE;

UPDATE ticketops_layout SET layout = 'distributed', chosen_at = now();
