-- Host limits: an event's `user` and `limits` now apply to host jobs too (through the agent's
-- cgroups), so `pids` must tell "set" from "not set". NULL means not set: Docker jobs get the
-- default of 256, host jobs no PIDs limit. A stored 256 was the old default (or had the same
-- effect), so it becomes NULL; any other value was set on purpose and is kept.
-- Host jobs now also get a runtime_spec (JSON of the wire's RuntimeSpec); NULL in old rows
-- still means "host, own user, no limits".

ALTER TABLE events ADD COLUMN pids_limit INTEGER CHECK (pids_limit IS NULL OR pids_limit >= 1);
UPDATE events SET pids_limit = pids WHERE pids <> 256;
ALTER TABLE events DROP COLUMN pids;
ALTER TABLE events RENAME COLUMN pids_limit TO pids;
