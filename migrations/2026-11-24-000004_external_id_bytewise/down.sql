ALTER TABLE comments ALTER COLUMN external_id TYPE text COLLATE "default";
ALTER TABLE tickets ALTER COLUMN external_id TYPE text COLLATE "default";
