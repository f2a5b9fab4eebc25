-- security.db: keys, policy, audit trail and the protection state.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY CHECK (id GLOB '[0-9a-f]*' AND length(id) BETWEEN 8 AND 32),
    label TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    replaced_by TEXT REFERENCES api_keys(id)
);
CREATE INDEX api_keys_active ON api_keys(revoked_at);

CREATE TABLE security_policies (
    id TEXT PRIMARY KEY CHECK (id = 'default'),
    policy_json TEXT NOT NULL CHECK (json_valid(policy_json) AND json_type(policy_json) = 'object'),
    updated_at TEXT NOT NULL
);

CREATE TABLE audit_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    request_id TEXT,
    client_ip TEXT,
    api_key_id TEXT,
    endpoint TEXT,
    method TEXT,
    engine_id TEXT,
    model TEXT,
    status INTEGER,
    latency_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    error_type TEXT,
    event_type TEXT NOT NULL DEFAULT 'request',
    severity TEXT NOT NULL DEFAULT 'info' CHECK (severity IN ('info', 'low', 'medium', 'high', 'critical')),
    details_json TEXT
);
-- One index only: every index is paid on each of the (many) inserts; filters by event type,
-- severity or address scan the (archived, so bounded) table instead.
CREATE INDEX audit_logs_ts ON audit_logs(ts);

-- The audit trail is append-only: rows leave only through `flm security audit-logs archive`,
-- which sets the one-row switch below for the length of its own transaction.
CREATE TABLE audit_archive_gate (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    open INTEGER NOT NULL DEFAULT 0
);
INSERT INTO audit_archive_gate(id, open) VALUES (1, 0);

CREATE TRIGGER audit_logs_no_update BEFORE UPDATE ON audit_logs
BEGIN
    SELECT RAISE(ABORT, 'audit_logs is append-only');
END;

CREATE TRIGGER audit_logs_no_delete BEFORE DELETE ON audit_logs
WHEN (SELECT open FROM audit_archive_gate WHERE id = 1) = 0
BEGIN
    SELECT RAISE(ABORT, 'audit_logs rows can only leave through flm security audit-logs archive');
END;

CREATE TABLE audit_archives (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    archived_at TEXT NOT NULL,
    before TEXT NOT NULL,
    row_count INTEGER NOT NULL,
    file_path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);

CREATE TABLE ip_blocklist (
    ip TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    failure_count INTEGER NOT NULL DEFAULT 0,
    blocked_at TEXT NOT NULL,
    expires_at TEXT,
    permanent INTEGER NOT NULL DEFAULT 0 CHECK (permanent IN (0, 1))
);

CREATE TABLE intrusion_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    ip TEXT NOT NULL,
    score INTEGER NOT NULL,
    total_score INTEGER NOT NULL,
    reasons_json TEXT NOT NULL,
    path TEXT,
    user_agent TEXT,
    request_id TEXT
);
CREATE INDEX intrusion_attempts_ip ON intrusion_attempts(ip, ts);

CREATE TABLE anomaly_detections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    ip TEXT NOT NULL,
    anomaly_type TEXT NOT NULL,
    value REAL,
    threshold REAL,
    details_json TEXT,
    request_id TEXT
);
CREATE INDEX anomaly_detections_ip ON anomaly_detections(ip, ts);

CREATE TABLE rate_limit_states (
    bucket TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE certificates (
    id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    domain TEXT,
    cert_path TEXT NOT NULL,
    key_path TEXT NOT NULL,
    fingerprint_sha256 TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE dns_credentials (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    label TEXT NOT NULL,
    secret_ref TEXT NOT NULL,
    created_at TEXT NOT NULL
);
