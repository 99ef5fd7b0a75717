-- One statement, as up.sql; the distributed layout has no triggers or functions of it.
DO $migration$
BEGIN
    IF (SELECT layout FROM ticketops_layout) <> 'distributed' THEN
        DROP TRIGGER IF EXISTS tickets_forget_fingerprint ON tickets;
        DROP TRIGGER IF EXISTS ticket_tags_forget_fingerprints ON ticket_tags;
        DROP TRIGGER IF EXISTS users_forget_fingerprints ON users;
        DROP TRIGGER IF EXISTS organizations_forget_fingerprints ON organizations;
        DROP TRIGGER IF EXISTS tags_forget_fingerprints ON tags;
    END IF;
    DROP FUNCTION IF EXISTS ticketops_fingerprint_triggers();
    DROP FUNCTION IF EXISTS ticketops_forget_fingerprints_of_tag();
    DROP FUNCTION IF EXISTS ticketops_forget_fingerprints_of_organization();
    DROP FUNCTION IF EXISTS ticketops_forget_fingerprints_of_user();
    DROP FUNCTION IF EXISTS ticketops_forget_fingerprints_of_links();
    DROP FUNCTION IF EXISTS ticketops_forget_fingerprint();
    ALTER TABLE tickets DROP COLUMN import_fingerprint;
END
$migration$;
