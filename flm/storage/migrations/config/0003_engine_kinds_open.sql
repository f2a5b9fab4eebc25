-- Engine kinds are described in code, one descriptor each (flm/engines/kinds.py): the engines
-- table no longer lists them, so a new kind needs no migration. SQLite cannot drop a CHECK, so
-- the table is rebuilt with the same columns and rows.
CREATE TABLE engines_new (
    id TEXT PRIMARY KEY CHECK (id GLOB '[a-z0-9]*' AND length(id) <= 64),
    kind TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 32),
    base_url TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    managed INTEGER NOT NULL DEFAULT 0 CHECK (managed IN (0, 1)),
    pid INTEGER,
    model_path TEXT,
    created_at TEXT NOT NULL,
    api_key TEXT
);
INSERT INTO engines_new (id, kind, base_url, enabled, managed, pid, model_path, created_at,
                         api_key)
    SELECT id, kind, base_url, enabled, managed, pid, model_path, created_at, api_key
    FROM engines;
DROP TABLE engines;
ALTER TABLE engines_new RENAME TO engines;
