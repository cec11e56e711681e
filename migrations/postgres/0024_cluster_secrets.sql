-- The PostgreSQL twin of migrations/sqlite/0024_cluster_secrets.sql: the CA and the QUIC
-- stateless-reset secret every replica shares, sealed with ENCRYPTION_KEY.

CREATE TABLE cluster_secrets (
    name         TEXT PRIMARY KEY,
    sealed_value BYTEA NOT NULL,
    created_at   BIGINT NOT NULL
);

-- Which replica each agent is connected to (see the SQLite twin).
CREATE TABLE agent_presence (
    agent_id   TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    seen_at    BIGINT NOT NULL
);
