-- A block belongs to the listener whose rules produced it ('*': every listener, which is what
-- rows from before this migration were, and what blocks are when the policy shares them).
CREATE TABLE ip_blocklist_new (
    ip TEXT NOT NULL,
    listener TEXT NOT NULL DEFAULT '*',
    reason TEXT NOT NULL,
    failure_count INTEGER NOT NULL DEFAULT 0,
    blocked_at TEXT NOT NULL,
    expires_at TEXT,
    permanent INTEGER NOT NULL DEFAULT 0 CHECK (permanent IN (0, 1)),
    PRIMARY KEY (ip, listener)
);

INSERT INTO ip_blocklist_new(ip, listener, reason, failure_count, blocked_at, expires_at,
                             permanent)
SELECT ip, '*', reason, failure_count, blocked_at, expires_at, permanent FROM ip_blocklist;

DROP TABLE ip_blocklist;

ALTER TABLE ip_blocklist_new RENAME TO ip_blocklist;
