CREATE INDEX audit_log_operation_id_idx ON audit_log (operation_id);
DROP INDEX audit_log_operation_id_id_idx;
