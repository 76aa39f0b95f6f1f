-- Command service and control rules (owner: pipeline control, docs/control.md). Idempotent.

-- Who asked for a command, why, and how it relates to others. `cause` is the alarm, bill or
-- rule decision behind it; `parent_id` links a retry to the command it retries; a newer valve
-- command supersedes an older queued one (`superseded_by`). `published_at` is the outbox mark:
-- a row is written first (by the API, the CLI or a rule) and the control service publishes
-- every unpublished queued row to the serving gateway.
ALTER TABLE commands ADD COLUMN IF NOT EXISTS reason text NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN IF NOT EXISTS cause jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE commands ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 5
    CHECK (priority BETWEEN 0 AND 9);
ALTER TABLE commands ADD COLUMN IF NOT EXISTS approver text;
ALTER TABLE commands ADD COLUMN IF NOT EXISTS parent_id text REFERENCES commands (command_id);
ALTER TABLE commands ADD COLUMN IF NOT EXISTS attempt smallint NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN IF NOT EXISTS superseded_by text REFERENCES commands (command_id);
ALTER TABLE commands ADD COLUMN IF NOT EXISTS published_at timestamptz;
ALTER TABLE commands ADD COLUMN IF NOT EXISTS acknowledged_at timestamptz;
CREATE INDEX IF NOT EXISTS commands_pending_idx ON commands (device_id)
    WHERE state IN ('queued', 'sent', 'delivered');
CREATE INDEX IF NOT EXISTS commands_outbox_idx ON commands (priority DESC, issued_at)
    WHERE published_at IS NULL AND state = 'queued';
CREATE INDEX IF NOT EXISTS commands_confirm_idx ON commands (device_id)
    WHERE state = 'acknowledged';
CREATE INDEX IF NOT EXISTS commands_parent_idx ON commands (parent_id);

-- Every rule decision with its inputs (issued, deferred, refused, awaiting approval), so each
-- valve movement a rule caused — or did not cause — can be explained.
CREATE TABLE IF NOT EXISTS control_decisions (
    decision_id  bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    rule         text NOT NULL,           -- burst_auto_close | arrears_close | arrears_reopen | hydrant_*
    meter_id     text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('issued', 'deferred', 'refused',
                     'awaiting_approval', 'approved')),
    reason       text NOT NULL,
    inputs       jsonb NOT NULL,
    command_id   text REFERENCES commands (command_id)
);
CREATE INDEX IF NOT EXISTS control_decisions_meter_idx ON control_decisions (meter_id, rule, at);

-- Arrears safeguards (DOMAIN.md §3): the payment demand and the advance notice, with when they
-- were sent. The close rule counts only notices sent on or after the arrears' overdue date.
CREATE TABLE IF NOT EXISTS arrears_notices (
    notice_id    bigserial PRIMARY KEY,
    meter_id     text NOT NULL REFERENCES meters (meter_id),
    kind         text NOT NULL CHECK (kind IN ('payment_demand', 'advance_notice')),
    sent_at      timestamptz NOT NULL,
    recorded_by  text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS arrears_notices_meter_idx ON arrears_notices (meter_id, kind, sent_at);

-- Hydrant permits (EXT-1001 取水权限): unlock only inside an active permit, lock at its end.
CREATE TABLE IF NOT EXISTS hydrant_permits (
    permit_id        text PRIMARY KEY,
    hydrant_id       text NOT NULL,          -- meter id of the hydrant (`hydrant:<id>`)
    holder           text NOT NULL,
    valid_from       timestamptz NOT NULL,
    valid_to         timestamptz NOT NULL,
    volume_limit_m3  numeric(12, 3),
    issued_by        text NOT NULL,
    issued_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    lock_command_id  text REFERENCES commands (command_id),
    CHECK (valid_to > valid_from)
);
CREATE INDEX IF NOT EXISTS hydrant_permits_hydrant_idx ON hydrant_permits (hydrant_id, valid_from);

-- The control service listens on `wm_control`: a new command to publish, or arrears cleared
-- (payment: reopen at once).
CREATE OR REPLACE FUNCTION wm_control_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('wm_control', TG_TABLE_NAME);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS commands_control_notify ON commands;
CREATE TRIGGER commands_control_notify AFTER INSERT ON commands
    FOR EACH STATEMENT EXECUTE FUNCTION wm_control_notify();
DROP TRIGGER IF EXISTS arrears_control_notify ON arrears;
CREATE TRIGGER arrears_control_notify AFTER DELETE ON arrears
    FOR EACH STATEMENT EXECUTE FUNCTION wm_control_notify();
