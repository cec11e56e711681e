-- The PostgreSQL twin of migrations/sqlite/0025_replicas.sql: the replicas sharing this database
-- (their agents' QUIC addresses and their relay URL), and when each agent's connection to its
-- replica was established.

CREATE TABLE replicas (
    id          TEXT PRIMARY KEY,
    quic_addrs  TEXT NOT NULL,
    relay_url   TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    seen_at     BIGINT NOT NULL
);

ALTER TABLE agent_presence ADD COLUMN connected_at BIGINT;
