-- Dashboard (issue 23): people who log in, failed-login bookkeeping, gateway health columns,
-- and the live-event notifications behind `GET /api/v1/events`. Additive and idempotent.

-- People who log in to the dashboard (`api user-add`); the API signs their tokens itself.
-- `org` '*' = every organisation; `areas` empty = every area of `org`. `totp_secret` is the
-- RFC 6238 shared secret (base32) when the user has a second factor.
CREATE TABLE IF NOT EXISTS users (
    username       text PRIMARY KEY CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$'),
    password_hash  text NOT NULL,                 -- argon2id PHC string
    role           text NOT NULL CHECK (role IN ('meter_operator', 'meter_admin',
                       'meter_reader', 'billing', 'auditor', 'integration')),
    org            text NOT NULL DEFAULT '*',
    areas          text[] NOT NULL DEFAULT '{}',
    totp_secret    text,
    disabled       boolean NOT NULL DEFAULT false,
    last_login_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Failed logins, by the name tried (existing or not: no enumeration) and the peer address.
-- The login rate limit counts rows here, so it holds across API nodes.
CREATE TABLE IF NOT EXISTS login_failures (
    at        timestamptz NOT NULL DEFAULT now(),
    username  text NOT NULL,
    peer      text NOT NULL,
    reason    text NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_user_idx ON login_failures (username, at);
CREATE INDEX IF NOT EXISTS login_failures_peer_idx ON login_failures (peer, at);

-- Gateway health (also added by the demo's migration with the same statements).
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS spool_depth bigint;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS uplink_lag_s double precision;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS health_at timestamptz;

-- Live events for the dashboard: one small JSON notification on channel `wm_events` per changed
-- alarm, command or gateway row. Ids and states only; clients fetch details through the API,
-- which applies RBAC and data scope. Any API node can listen, so the SSE endpoint is stateless.
CREATE OR REPLACE FUNCTION wm_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'alarms' THEN
        PERFORM pg_notify('wm_events', json_build_object('kind', 'alarm', 'id', NEW.alarm_id::text,
            'meter', NEW.meter_id, 'state', NEW.state)::text);
    ELSIF TG_TABLE_NAME = 'commands' THEN
        PERFORM pg_notify('wm_events', json_build_object('kind', 'command', 'id', NEW.command_id,
            'meter', NEW.device_id, 'state', NEW.state)::text);
    ELSIF TG_TABLE_NAME = 'gateways' THEN
        PERFORM pg_notify('wm_events', json_build_object('kind', 'gateway', 'id', NEW.gateway_id,
            'state', CASE WHEN NEW.online THEN 'online' ELSE 'offline' END)::text);
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS alarms_events_notify ON alarms;
CREATE TRIGGER alarms_events_notify AFTER INSERT OR UPDATE OF state ON alarms
    FOR EACH ROW EXECUTE FUNCTION wm_events_notify();
DROP TRIGGER IF EXISTS commands_events_notify ON commands;
CREATE TRIGGER commands_events_notify AFTER INSERT OR UPDATE OF state ON commands
    FOR EACH ROW EXECUTE FUNCTION wm_events_notify();
-- Gateways: only when what the dashboard shows changes (not every status refresh).
DROP TRIGGER IF EXISTS gateways_events_notify ON gateways;
CREATE TRIGGER gateways_events_notify AFTER INSERT OR UPDATE OF online, spool_depth, uplink_lag_s ON gateways
    FOR EACH ROW EXECUTE FUNCTION wm_events_notify();
