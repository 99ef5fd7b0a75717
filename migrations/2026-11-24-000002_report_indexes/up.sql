-- Indexes the reports need (issue 6): `report flow` counts tickets created and solved per day
-- over the last N days, `report summary` finds the oldest unsolved ticket, and `report agents`
-- looks at tickets solved in a period. Each is a range or an ordered walk on one timestamp.
CREATE INDEX tickets_created_at_idx ON tickets (created_at);
CREATE INDEX tickets_solved_at_idx ON tickets (solved_at) WHERE solved_at IS NOT NULL;
