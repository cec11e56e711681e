-- Per-event notifications: the names of the owner's tools to notify when a job of the event
-- ends. `notify_on_failure` is used for failed and cancelled jobs, `notify_on_success` for
-- completed ones; NULL notifies nobody. A name that no longer matches a tool (renamed or deleted)
-- is skipped and audited when a job settles.

ALTER TABLE events ADD COLUMN notify_on_failure TEXT;
ALTER TABLE events ADD COLUMN notify_on_success TEXT;
