-- Gateway health from the retained status (issue 23): the gateway re-publishes its `online`
-- status every ~10 s with a `health` object; `pipeline registry sync` keeps the latest here
-- for the fleet overview (online/offline, spool depth, uplink lag). The whole status message,
-- health included, stays in `gateways.status`.
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS spool_depth bigint;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS uplink_lag_s double precision;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS health_at timestamptz;
