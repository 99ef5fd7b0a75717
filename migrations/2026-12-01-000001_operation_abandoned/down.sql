-- PostgreSQL cannot drop an enum value; operations marked abandoned become failed.
UPDATE bulk_operations SET status = 'failed' WHERE status = 'abandoned';
