-- Runtime helpers: the condition a job's script set with `set_condition` (NULL: not set).

ALTER TABLE jobs ADD COLUMN condition INTEGER CHECK (condition IS NULL OR condition IN (0, 1));
