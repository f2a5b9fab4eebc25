-- Engine pools: engines that serve the same models, addressed as one (flm://pool:NAME/model).
-- A member names an engine id (a registered one or a kind's default endpoint, so no foreign
-- key); its weight scales its share of the load.
CREATE TABLE engine_pools (
    name TEXT PRIMARY KEY CHECK (name GLOB '[a-z0-9]*' AND length(name) <= 64),
    created_at TEXT NOT NULL
);

CREATE TABLE engine_pool_members (
    pool_name TEXT NOT NULL REFERENCES engine_pools(name) ON DELETE CASCADE,
    engine_id TEXT NOT NULL,
    weight REAL NOT NULL DEFAULT 1 CHECK (weight > 0 AND weight <= 1000),
    position INTEGER NOT NULL,
    PRIMARY KEY (pool_name, engine_id)
);
