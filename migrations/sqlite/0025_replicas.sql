-- The control-plane replicas sharing this database (PostgreSQL only; on SQLite there is one
-- control plane and the table stays empty). Each replica announces itself at start (before it
-- accepts agents), refreshes `seen_at` every few seconds and deletes its row on a graceful stop;
-- a row not refreshed for a while belongs to a replica that died and counts for nothing.
--
-- `quic_addrs`: JSON array of the "host:port" addresses agents dial for this replica (its
-- --quic-public-addrs); agents are told every live replica's addresses and fail over to them.
-- `relay_url`: base URL (http://host:port) other replicas use to reach this replica's HTTP
-- listener directly, not through a load balancer (--relay-url).
CREATE TABLE replicas (
    id          TEXT PRIMARY KEY,
    quic_addrs  TEXT NOT NULL,
    relay_url   TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
);

-- When the agent's connection to its replica was established (`connected_at` of GET /agents
-- when asked through another replica); NULL in rows written before this column.
ALTER TABLE agent_presence ADD COLUMN connected_at INTEGER;
