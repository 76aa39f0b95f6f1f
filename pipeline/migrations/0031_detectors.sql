-- Anomaly detectors (owner: pipeline detect, docs/detectors.md): alarm lifecycle and detector
-- state. Idempotent, like every migration here.

-- The meter's role in the network (shared with the registry migration: identical text).
ALTER TABLE meters ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT 'customer';
-- Set when a tamper alarm is raised; the meter is not billable until a person closes the alarm.
ALTER TABLE meters ADD COLUMN IF NOT EXISTS tampered_at timestamptz;

-- Alarm lifecycle: open -> acknowledged -> closed (auto-close when the condition clears, or by a
-- person), one open alarm per (meter, kind) (index alarms_open_uq, open = cleared_at IS NULL),
-- occurrences counted instead of new rows. `raised_at` stays the condition's start in event
-- time (= first_seen); `cleared_at` is when the alarm closed.
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'open'
    CHECK (state IN ('open', 'acknowledged', 'closed'));
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS first_seen timestamptz;
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS last_seen timestamptz;
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS occurrences integer NOT NULL DEFAULT 1;
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS acknowledged_by text;
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS acknowledged_at timestamptz;
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS closed_by text;       -- 'auto' for auto-close
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS alarms_state_idx ON alarms (state, kind) WHERE cleared_at IS NULL;

-- Detector state per meter, written in the ingest transaction of the readings that changed it
-- (so a crash or a redelivery neither loses nor repeats an alarm), read back at start.
CREATE TABLE IF NOT EXISTS detector_state (
    meter_id     text PRIMARY KEY,
    state        bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
