-- Meter registry (owner: pipeline::registry; IF-METER-001, IF-METER-002, METER-003).
-- Additive over 0001's `meters`: `meter_id` stays the protocol address and the key every other
-- table uses; `meter_no` is the utility's meter number that people search by. Idempotent.

-- Role of a meter in the network (shared with the detectors' migration: identical statement).
ALTER TABLE meters ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT 'customer';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'meters_role_registry_check') THEN
        ALTER TABLE meters ADD CONSTRAINT meters_role_registry_check
            CHECK (role IN ('customer', 'inlet', 'outlet', 'hydrant', 'pressure'));
    END IF;
END
$$;

-- Meter models: per-model behaviour is data. Which CJ/T 188 status bits (ST1/ST2 as one
-- 16-bit word, bit 0 = ST1 bit 0) mean what differs between manufacturers.
CREATE TABLE IF NOT EXISTS meter_models (
    model_code    text PRIMARY KEY,
    manufacturer  text NOT NULL DEFAULT '',
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS meter_model_status_bits (
    model_code    text NOT NULL REFERENCES meter_models (model_code) ON DELETE CASCADE,
    bit           smallint NOT NULL CHECK (bit BETWEEN 0 AND 15),
    meaning       text NOT NULL CHECK (meaning IN ('magnetic_tamper', 'valve_closed',
                      'valve_fault', 'battery_low', 'reverse_flow', 'leak', 'empty_pipe',
                      'cover_open', 'other')),
    PRIMARY KEY (model_code, bit)
);

-- Meter books (抄表册): the unit of a bill run; one cycle length per book.
CREATE TABLE IF NOT EXISTS meter_books (
    book_code     text PRIMARY KEY,
    name          text NOT NULL,
    reader        text,
    cycle         text NOT NULL DEFAULT 'monthly' CHECK (cycle IN ('monthly', 'bimonthly')),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Gateways as the registry knows them; status columns are written by the gateway sync
-- (retained `{root}/{gateway}/status`), the device-set columns by the publisher.
CREATE TABLE IF NOT EXISTS gateways (
    gateway_id           text PRIMARY KEY,
    online               boolean,
    last_seen            timestamptz,
    firmware             text,
    status               jsonb,
    device_set_version   bigint NOT NULL DEFAULT 0,   -- last published
    device_set_hash      text,
    device_set_applied   bigint,                      -- last the gateway reported applied
    device_set_error     text,                        -- last refusal the gateway reported
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Registry columns on meters. Rows inserted without them (tests, older tools) are in
-- service: status defaults to 'active'; `registry register` starts a meter 'in_stock'.
ALTER TABLE meters ADD COLUMN IF NOT EXISTS meter_no text;
CREATE UNIQUE INDEX IF NOT EXISTS meters_meter_no_uq ON meters (meter_no);
ALTER TABLE meters ADD COLUMN IF NOT EXISTS model_code text REFERENCES meter_models (model_code);
ALTER TABLE meters ADD COLUMN IF NOT EXISTS caliber_dn smallint CHECK (caliber_dn > 0);
ALTER TABLE meters ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'active';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'meters_status_check') THEN
        ALTER TABLE meters ADD CONSTRAINT meters_status_check
            CHECK (status IN ('in_stock', 'installed', 'active', 'faulty', 'replaced', 'retired'));
    END IF;
END
$$;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS org text;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS area text;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS latitude numeric(9, 6) CHECK (latitude BETWEEN -90 AND 90);
ALTER TABLE meters ADD COLUMN IF NOT EXISTS longitude numeric(9, 6) CHECK (longitude BETWEEN -180 AND 180);
ALTER TABLE meters ADD COLUMN IF NOT EXISTS address text;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS auto_close_on_burst boolean NOT NULL DEFAULT false;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS customer_account text;
ALTER TABLE meters ADD COLUMN IF NOT EXISTS gateway_source text;     -- source id on the gateway
ALTER TABLE meters ADD COLUMN IF NOT EXISTS gateway_address text;    -- protocol address there
ALTER TABLE meters ADD COLUMN IF NOT EXISTS key_ref text;            -- name in the gateway's key file
ALTER TABLE meters ADD COLUMN IF NOT EXISTS register_map text;       -- Modbus map name
ALTER TABLE meters ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS meters_gateway_idx ON meters (gateway_id);
CREATE INDEX IF NOT EXISTS meters_org_area_idx ON meters (org, area);

-- Customer bindings with history (the seed's biz_cust_meter): at most one open per meter.
CREATE TABLE IF NOT EXISTS meter_customer_bindings (
    binding_id    bigserial PRIMARY KEY,
    meter_id      text NOT NULL REFERENCES meters (meter_id),
    account_id    text NOT NULL,
    bound_at      timestamptz NOT NULL,
    bound_by      text NOT NULL,
    unbound_at    timestamptz,
    unbound_by    text,
    CHECK (unbound_at IS NULL OR unbound_at >= bound_at)
);
CREATE UNIQUE INDEX IF NOT EXISTS meter_customer_open_uq
    ON meter_customer_bindings (meter_id) WHERE unbound_at IS NULL;
CREATE INDEX IF NOT EXISTS meter_customer_account_idx ON meter_customer_bindings (account_id);

-- Last frame per meter as seen by ingest (which gateway, when); written behind by the
-- registry sync, not in the ingest transaction.
CREATE TABLE IF NOT EXISTS meter_last_frame (
    meter_id      text PRIMARY KEY,
    gateway_id    text NOT NULL,
    received_at   timestamptz NOT NULL,
    unexpected    boolean NOT NULL DEFAULT false,  -- not the gateway the registry names
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS meter_last_frame_unexpected_idx ON meter_last_frame (meter_id)
    WHERE unexpected;

-- Live registry changes: every statement that changes meters or meter_replacements sends
-- the changed meter ids (comma-separated) on channel `wm_registry`, or `*` when there are
-- too many for one notification (8000-byte payload limit): workers then reload every meter.
CREATE OR REPLACE FUNCTION wm_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    SELECT string_agg(DISTINCT meter_id, ',') INTO ids FROM changed;
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    IF length(ids) > 7000 THEN
        ids := '*';
    END IF;
    PERFORM pg_notify('wm_registry', ids);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS meters_registry_ins ON meters;
CREATE TRIGGER meters_registry_ins AFTER INSERT ON meters
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wm_registry_notify();
DROP TRIGGER IF EXISTS meters_registry_upd ON meters;
CREATE TRIGGER meters_registry_upd AFTER UPDATE ON meters
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wm_registry_notify();
DROP TRIGGER IF EXISTS meters_registry_del ON meters;
CREATE TRIGGER meters_registry_del AFTER DELETE ON meters
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wm_registry_notify();
DROP TRIGGER IF EXISTS replacements_registry_ins ON meter_replacements;
CREATE TRIGGER replacements_registry_ins AFTER INSERT ON meter_replacements
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wm_registry_notify();
