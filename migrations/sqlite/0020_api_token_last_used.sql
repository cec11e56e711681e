-- When an API token was last used (ms since the epoch), for its owner's token list. Updated at
-- most once a minute per token, so authenticating does not write on every request.
ALTER TABLE api_tokens ADD COLUMN last_used_at INTEGER;
