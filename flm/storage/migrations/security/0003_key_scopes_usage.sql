-- Per-key scope and limits, and usage rollups per key x model x engine.
-- models_json: a JSON array of `flm://engine/model` ids and globs; NULL means every model.
ALTER TABLE api_keys ADD COLUMN models_json TEXT
    CHECK (models_json IS NULL OR (json_valid(models_json) AND json_type(models_json) = 'array'));
ALTER TABLE api_keys ADD COLUMN rpm INTEGER CHECK (rpm IS NULL OR rpm > 0);
ALTER TABLE api_keys ADD COLUMN burst INTEGER CHECK (burst IS NULL OR burst > 0);
ALTER TABLE api_keys ADD COLUMN tpm INTEGER CHECK (tpm IS NULL OR tpm > 0);
ALTER TABLE api_keys ADD COLUMN daily_tokens INTEGER CHECK (daily_tokens IS NULL OR daily_tokens > 0);
ALTER TABLE api_keys ADD COLUMN daily_requests INTEGER
    CHECK (daily_requests IS NULL OR daily_requests > 0);
ALTER TABLE api_keys ADD COLUMN expires_at TEXT;
ALTER TABLE api_keys ADD COLUMN read_only INTEGER NOT NULL DEFAULT 0 CHECK (read_only IN (0, 1));
ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;

-- One row per minute (unix time // 60) and key x model x engine; kept 48 hours.
-- An empty model/engine is a request that named none (a 404, a refused request).
CREATE TABLE usage_minute (
    minute INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    engine_id TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    -- requests whose token counts FLM estimated from the text (the engine reported none)
    estimated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, key_id, model, engine_id)
) WITHOUT ROWID;
CREATE INDEX usage_minute_key ON usage_minute(key_id, minute);

-- The same per hour (unix time // 3600); kept 90 days.
CREATE TABLE usage_hour (
    hour INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    engine_id TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    estimated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key_id, model, engine_id)
) WITHOUT ROWID;
CREATE INDEX usage_hour_key ON usage_hour(key_id, hour);
