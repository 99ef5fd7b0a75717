-- undo and restore walk one operation's audit rows in id order, a batch at a time
-- (`WHERE operation_id = $1 AND id < $2 ORDER BY id DESC LIMIT n`). With an index on
-- operation_id alone every batch read and sorted all of the operation's rows; this one hands
-- them over in order. It also serves the foreign key, so the old index goes.
CREATE INDEX audit_log_operation_id_id_idx ON audit_log (operation_id, id);
DROP INDEX audit_log_operation_id_idx;
