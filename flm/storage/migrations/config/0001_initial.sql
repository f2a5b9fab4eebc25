-- config.db: settings, engines and proxy bookkeeping.
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    notes TEXT
);

CREATE TABLE engines_cache (
    engine_id TEXT PRIMARY KEY,
    state_json TEXT NOT NULL,
    cached_at REAL NOT NULL
);

-- Engines the user registered (or FLM started itself: managed = 1).
CREATE TABLE engines (
    id TEXT PRIMARY KEY CHECK (id GLOB '[a-z0-9]*' AND length(id) <= 64),
    kind TEXT NOT NULL CHECK (kind IN ('ollama', 'vllm', 'lmstudio', 'llamacpp')),
    base_url TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    managed INTEGER NOT NULL DEFAULT 0 CHECK (managed IN (0, 1)),
    pid INTEGER,
    model_path TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE proxy_profiles (
    id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- One row per running proxy instance; rows whose pid is gone are "orphaned" (flm check).
CREATE TABLE proxy_handles (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    https_port INTEGER,
    bind TEXT NOT NULL,
    mode TEXT NOT NULL,
    config_json TEXT NOT NULL,
    started_at TEXT NOT NULL
);

CREATE TABLE model_profiles (
    id TEXT PRIMARY KEY,
    engine_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    label TEXT NOT NULL,
    parameters_json TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    updated_at TEXT NOT NULL
);

CREATE TABLE api_prompts (
    api_id TEXT PRIMARY KEY,
    template_text TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    updated_at TEXT NOT NULL
);
