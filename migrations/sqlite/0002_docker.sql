-- The Docker runtime: per-event container settings, the settings a job was queued with, and
-- whether an agent reported a reachable Docker engine in its last hello.

ALTER TABLE events ADD COLUMN image TEXT;
ALTER TABLE events ADD COLUMN memory_mb INTEGER CHECK (memory_mb IS NULL OR memory_mb >= 4);
ALTER TABLE events ADD COLUMN cpus REAL CHECK (cpus IS NULL OR (cpus > 0 AND cpus <= 64));
ALTER TABLE events ADD COLUMN pids INTEGER NOT NULL DEFAULT 256 CHECK (pids >= 1);
ALTER TABLE events ADD COLUMN network TEXT NOT NULL DEFAULT 'none' CHECK (network IN ('none', 'bridge'));
ALTER TABLE events ADD COLUMN read_only INTEGER NOT NULL DEFAULT 0 CHECK (read_only IN (0, 1));
ALTER TABLE events ADD COLUMN run_as_user TEXT;

-- JSON snapshot of the container settings (image resolved) copied at trigger time; NULL: host.
ALTER TABLE jobs ADD COLUMN runtime_spec TEXT;

-- NULL until the agent's first hello after this migration.
ALTER TABLE agents ADD COLUMN docker INTEGER CHECK (docker IS NULL OR docker IN (0, 1));
