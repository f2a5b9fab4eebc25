-- Model aliases: a name of the user's choosing (say gpt-4o-mini) that requests may use in place
-- of an flm://engine/model id. Running proxies load them at start and on every reload.
CREATE TABLE model_aliases (
    name TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
