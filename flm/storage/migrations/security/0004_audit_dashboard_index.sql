-- The web UI's dashboard reads the last hour (or day) of audit_logs: counts by minute and
-- status, latency percentiles, the busiest keys and engines, high-severity events, each key's
-- last use. This covering index replaces the plain ts index (still one index paid per insert),
-- so those range scans never visit the table rows and their cost follows the window's traffic,
-- not the table's size.
CREATE INDEX audit_logs_ts_cover
    ON audit_logs(ts, event_type, status, latency_ms, severity, api_key_id, engine_id);
DROP INDEX audit_logs_ts;
