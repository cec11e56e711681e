-- What every control-plane replica needs to serve any agent, shared through the database and
-- sealed with ENCRYPTION_KEY (nonce || AES-256-GCM ciphertext, like the other sealed columns):
-- `ca` (the CA certificate and its private key, as JSON) and `quic_reset_key` (the QUIC
-- stateless-reset and connection-id secret). A replica inserts a row only if it is absent and
-- then reads it back, so replicas starting at once agree on one value. `cronium keys rotate`
-- re-seals these rows like every other sealed column.

CREATE TABLE cluster_secrets (
    name         TEXT PRIMARY KEY,
    sealed_value BLOB NOT NULL,
    created_at   INTEGER NOT NULL
);

-- Which replica each agent is connected to (PostgreSQL only, where several replicas share the
-- database): written when the agent connects and every few seconds while it stays, deleted when
-- it disconnects. A row another replica has not refreshed for a while is stale (that replica
-- died). Other replicas read it to tell "connected elsewhere" from "offline".
CREATE TABLE agent_presence (
    agent_id   TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    seen_at    INTEGER NOT NULL
);
