-- One statement, as up.sql: back to a trigger a tag link, as import_fingerprint made it.
DO $migration$
BEGIN
    IF (SELECT layout FROM ticketops_layout) = 'distributed' THEN
        RETURN;
    END IF;
    DROP TRIGGER IF EXISTS ticket_tags_inserted_forget_fingerprints ON ticket_tags;
    DROP TRIGGER IF EXISTS ticket_tags_updated_forget_fingerprints ON ticket_tags;
    DROP TRIGGER IF EXISTS ticket_tags_deleted_forget_fingerprints ON ticket_tags;
    CREATE OR REPLACE FUNCTION ticketops_forget_fingerprints_of_tag() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE tickets SET import_fingerprint = NULL
        WHERE id IN (SELECT ticket_id FROM ticket_tags WHERE tag_id = OLD.id)
          AND import_fingerprint IS NOT NULL;
        RETURN NULL;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION ticketops_forget_fingerprints_of_links() RETURNS trigger LANGUAGE plpgsql AS $fn$
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

    CREATE OR REPLACE FUNCTION ticketops_fingerprint_triggers() RETURNS void LANGUAGE plpgsql AS $fn$
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
    DROP FUNCTION ticketops_forget_fingerprints_of(bigint[]);
END
$migration$;
