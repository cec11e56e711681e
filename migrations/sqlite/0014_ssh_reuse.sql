-- SSH fallback connection reuse per server: with `ssh_reuse = 1` (the default) the control plane
-- keeps the authenticated connection open for a while and runs the server's next jobs on it, one
-- channel each; with 0 every job opens (and closes) a connection of its own.
ALTER TABLE servers ADD COLUMN ssh_reuse INTEGER NOT NULL DEFAULT 1 CHECK (ssh_reuse IN (0, 1));
