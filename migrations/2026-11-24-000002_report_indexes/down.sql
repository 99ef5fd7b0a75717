DROP INDEX tickets_solved_at_idx;
DROP INDEX tickets_created_at_idx;
