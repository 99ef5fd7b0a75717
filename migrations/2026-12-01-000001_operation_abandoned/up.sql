-- An operation whose process died without recording its end (killed, or the server went away
-- before it could) is marked 'abandoned' by the next ticketops command that reads operations,
-- once no session holds the operation's advisory lock. Enum values cannot be dropped, so the
-- down migration leaves the value in place.
ALTER TYPE operation_status ADD VALUE IF NOT EXISTS 'abandoned';
