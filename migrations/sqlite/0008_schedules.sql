-- Schedules: an event's cron schedule and its next fire time, the record of every slot the
-- scheduler handled (UNIQUE per event and slot: each slot fires at most once), and what
-- triggered a run.

ALTER TABLE events ADD COLUMN schedule_cron TEXT;
ALTER TABLE events ADD COLUMN schedule_timezone TEXT;
ALTER TABLE events ADD COLUMN schedule_dst TEXT CHECK (schedule_dst IN ('skip', 'once', 'twice'));
ALTER TABLE events ADD COLUMN schedule_misfire TEXT CHECK (schedule_misfire IN ('skip', 'run_once'));
ALTER TABLE events ADD COLUMN schedule_overlap TEXT CHECK (schedule_overlap IN ('allow', 'forbid', 'queue'));
-- The next slot (ms since the epoch) not handled yet; NULL without a schedule.
ALTER TABLE events ADD COLUMN next_run_at INTEGER;
CREATE INDEX events_next_run ON events (next_run_at) WHERE next_run_at IS NOT NULL;

-- One row per handled slot, written in the same transaction as the run it created (if any).
CREATE TABLE schedule_fires (
    event_id     TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    slot_at      INTEGER NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('fired', 'skipped', 'missed')),
    reason       TEXT,
    run_id       TEXT REFERENCES runs (id) ON DELETE SET NULL,
    missed_slots INTEGER NOT NULL DEFAULT 0,
    handled_at   INTEGER NOT NULL,
    UNIQUE (event_id, slot_at)
);

ALTER TABLE runs ADD COLUMN trigger TEXT NOT NULL DEFAULT 'manual' CHECK (trigger IN ('manual', 'schedule'));
ALTER TABLE runs ADD COLUMN slot_at INTEGER;
-- Slots missed during downtime that this run stands for (misfire policy run_once).
ALTER TABLE runs ADD COLUMN missed_slots INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_event_trigger ON runs (event_id, trigger, created_at);
