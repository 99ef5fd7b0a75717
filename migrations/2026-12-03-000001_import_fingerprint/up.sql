-- The fingerprint of the CSV record (with the import's column mapping and options) that last
-- wrote each ticket: a re-import skips a record whose fingerprint is the stored one without
-- parsing it or reading the ticket back. See docs/design.md, "Re-import by fingerprint".
--
-- A fingerprint vouches that the ticket, its tag links and the users, organization and tags
-- it names are as that record left them. Whatever changes one of those forgets it (sets it to
-- NULL), whoever writes: the application, psql, ticketops itself. Only the import writes one.
-- The distributed layout has none of the triggers (Citus runs triggers on distributed tables
-- only as "unsafe"), and there ticketops never skips a record by its fingerprint.
--
-- One statement (a DO block): on a Citus coordinator a query string of several statements
-- cannot carry the commands Citus propagates to its workers.
DO $migration$
BEGIN
    -- Nullable, no default: nothing is rewritten (instant at any size).
    ALTER TABLE tickets ADD COLUMN import_fingerprint bytea;
    IF (SELECT layout FROM ticketops_layout) = 'distributed' THEN
        RETURN;
    END IF;

    -- The ticket itself: any UPDATE that does not write a new fingerprint.
    CREATE FUNCTION ticketops_forget_fingerprint() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        NEW.import_fingerprint := NULL;
        RETURN NEW;
    END
    $fn$;

    -- Tag links added, removed or changed directly. A session that maintains fingerprints
    -- itself (an import, which writes them with the links) sets ticketops.fingerprints_kept;
    -- links deleted by a cascade (their ticket is being deleted) are left alone (trigger depth).
    CREATE FUNCTION ticketops_forget_fingerprints_of_links() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE tickets SET import_fingerprint = NULL
            WHERE id = NEW.ticket_id AND import_fingerprint IS NOT NULL;
        END IF;
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE tickets SET import_fingerprint = NULL
            WHERE id = OLD.ticket_id AND import_fingerprint IS NOT NULL;
        END IF;
        RETURN NULL;
    END
    $fn$;

    -- A user a ticket names (requester or assignee), an organization or a tag changed in a way
    -- a re-import would see: by e-mail or name it would find another one, or fill in again what
    -- was taken away (a name, an organization, the agent role).
    CREATE FUNCTION ticketops_forget_fingerprints_of_user() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE tickets SET import_fingerprint = NULL
        WHERE requester_id = OLD.id AND import_fingerprint IS NOT NULL;
        UPDATE tickets SET import_fingerprint = NULL
        WHERE assignee_id = OLD.id AND import_fingerprint IS NOT NULL;
        RETURN NULL;
    END
    $fn$;

    CREATE FUNCTION ticketops_forget_fingerprints_of_organization() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE tickets SET import_fingerprint = NULL
        WHERE organization_id = OLD.id AND import_fingerprint IS NOT NULL;
        RETURN NULL;
    END
    $fn$;

    CREATE FUNCTION ticketops_forget_fingerprints_of_tag() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE tickets SET import_fingerprint = NULL
        WHERE id IN (SELECT ticket_id FROM ticket_tags WHERE tag_id = OLD.id)
          AND import_fingerprint IS NOT NULL;
        RETURN NULL;
    END
    $fn$;

    -- The triggers themselves, also made by the partitioned layout's script for its new
    -- tickets (and dropped by the distributed layout's).
    CREATE FUNCTION ticketops_fingerprint_triggers() RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
        -- WHEN clauses: the functions run only when there is something to forget, so writers
        -- that clear the fingerprint in their own UPDATE pay nothing per row.
        CREATE OR REPLACE TRIGGER tickets_forget_fingerprint BEFORE UPDATE ON tickets FOR EACH ROW
            WHEN (OLD.import_fingerprint IS NOT NULL
                  AND NEW.import_fingerprint IS NOT DISTINCT FROM OLD.import_fingerprint)
            EXECUTE FUNCTION ticketops_forget_fingerprint();
        CREATE OR REPLACE TRIGGER ticket_tags_forget_fingerprints AFTER INSERT OR UPDATE OR DELETE ON ticket_tags
            FOR EACH ROW
            WHEN (pg_trigger_depth() = 0
                  AND current_setting('ticketops.fingerprints_kept', true) IS DISTINCT FROM 'on')
            EXECUTE FUNCTION ticketops_forget_fingerprints_of_links();
        CREATE OR REPLACE TRIGGER users_forget_fingerprints AFTER UPDATE ON users FOR EACH ROW
            WHEN (OLD.email IS DISTINCT FROM NEW.email
                  OR (coalesce(OLD.name, '') <> '' AND coalesce(NEW.name, '') = '')
                  OR (OLD.organization_id IS NOT NULL AND NEW.organization_id IS NULL)
                  OR (OLD.role <> 'customer' AND NEW.role = 'customer'))
            EXECUTE FUNCTION ticketops_forget_fingerprints_of_user();
        CREATE OR REPLACE TRIGGER organizations_forget_fingerprints AFTER UPDATE ON organizations FOR EACH ROW
            WHEN (OLD.name IS DISTINCT FROM NEW.name)
            EXECUTE FUNCTION ticketops_forget_fingerprints_of_organization();
        CREATE OR REPLACE TRIGGER tags_forget_fingerprints AFTER UPDATE ON tags FOR EACH ROW
            WHEN (OLD.name IS DISTINCT FROM NEW.name)
            EXECUTE FUNCTION ticketops_forget_fingerprints_of_tag();
    END
    $fn$;
    PERFORM ticketops_fingerprint_triggers();
END
$migration$;
