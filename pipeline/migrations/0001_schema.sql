-- Core schema of the water-meter pipeline. Owner crates are named on each table.
-- Idempotent: every object is created IF NOT EXISTS, so running this file twice is harmless.

-- meters (owner: pipeline; written by the API's meter register, IF-METER-001)
CREATE TABLE IF NOT EXISTS meters (
    meter_id            text PRIMARY KEY,
    protocol            text NOT NULL,                 -- cjt188 | mbus | wmbus | modbus | named
    gateway_id          text,
    meter_class         text NOT NULL DEFAULT 'residential_dn15',
    customer_class      text NOT NULL DEFAULT 'residential',
    persons             integer NOT NULL DEFAULT 4 CHECK (persons > 0),
    meter_book          text,                          -- 抄表册: the unit of a bill run
    dma                 text,                          -- district metered area
    time_zone           text NOT NULL DEFAULT 'Asia/Shanghai',
    unit                text NOT NULL DEFAULT 'm3',
    register_capacity   numeric(20, 6) NOT NULL DEFAULT 100000,  -- rollover point (5 digits m3)
    nominal_flow_q3     numeric(12, 4) NOT NULL DEFAULT 2.5,     -- m3/h, DN15 R160
    has_valve           boolean NOT NULL DEFAULT false,
    protected_customer  boolean NOT NULL DEFAULT false,  -- never valve-closed for arrears
    installed_at        timestamptz,
    retired_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS meters_book_idx ON meters (meter_book);
CREATE INDEX IF NOT EXISTS meters_dma_idx ON meters (dma);

-- meter replacements (owner: pipeline): lets VEE and billing bridge a register reset
CREATE TABLE IF NOT EXISTS meter_replacements (
    meter_id            text NOT NULL REFERENCES meters (meter_id),
    replaced_at         timestamptz NOT NULL,
    old_final_value     numeric(20, 6) NOT NULL,
    new_initial_value   numeric(20, 6) NOT NULL,
    recorded_by         text NOT NULL,
    PRIMARY KEY (meter_id, replaced_at)
);

-- meter_state (owner: pipeline VEE): last validated register and profile, rebuilt on restart
CREATE TABLE IF NOT EXISTS meter_state (
    meter_id            text PRIMARY KEY,
    last_ts             timestamptz,
    last_value          numeric(20, 6),
    last_received_at    timestamptz,
    avg_daily_usage     numeric(20, 6),
    profile             jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- readings (owner: pipeline store). Unique on (meter, ts, quantity, tariff, subunit): for the
-- usual single-register meter (tariff 0, subunit 0) this is exactly (meter, ts, quantity), and
-- it keeps multi-tariff M-Bus registers apart. Re-delivery is harmless (ON CONFLICT DO NOTHING).
DO $$
BEGIN
    IF to_regclass('public.readings') IS NOT NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        -- TimescaleDB path: a hypertable with monthly chunks.
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        CREATE TABLE readings (
            meter_id     text NOT NULL,
            ts           timestamptz NOT NULL,
            quantity     text NOT NULL,
            tariff       smallint NOT NULL DEFAULT 0,
            subunit      smallint NOT NULL DEFAULT 0,
            storage      integer NOT NULL DEFAULT 0,
            value        numeric(20, 6) NOT NULL,
            unit         text NOT NULL,
            quality      text NOT NULL,
            quality_detail jsonb,
            flags        text[] NOT NULL DEFAULT '{}',
            clock        text NOT NULL,
            source       text NOT NULL,
            source_id    text NOT NULL DEFAULT '',
            gateway_id   text,
            spool_seq    bigint,
            frame_hash   text,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (meter_id, ts, quantity, tariff, subunit)
        );
        PERFORM create_hypertable('readings', 'ts', chunk_time_interval => interval '1 month');
    ELSE
        -- Plain PostgreSQL path: native monthly range partitions, created ahead by
        -- wm_ensure_reading_partitions; a default partition catches anything outside them so
        -- no accepted read is ever refused for lack of a partition.
        CREATE TABLE readings (
            meter_id     text NOT NULL,
            ts           timestamptz NOT NULL,
            quantity     text NOT NULL,
            tariff       smallint NOT NULL DEFAULT 0,
            subunit      smallint NOT NULL DEFAULT 0,
            storage      integer NOT NULL DEFAULT 0,
            value        numeric(20, 6) NOT NULL,
            unit         text NOT NULL,
            quality      text NOT NULL,
            quality_detail jsonb,
            flags        text[] NOT NULL DEFAULT '{}',
            clock        text NOT NULL,
            source       text NOT NULL,
            source_id    text NOT NULL DEFAULT '',
            gateway_id   text,
            spool_seq    bigint,
            frame_hash   text,
            received_at  timestamptz NOT NULL,
            PRIMARY KEY (meter_id, ts, quantity, tariff, subunit)
        ) PARTITION BY RANGE (ts);
        CREATE TABLE readings_default PARTITION OF readings DEFAULT;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS readings_ts_brin ON readings USING brin (ts);

-- Creates monthly partitions of readings covering [from_month, from_month + months).
-- A no-op under TimescaleDB (chunks are automatic). Returns how many partitions it created.
CREATE OR REPLACE FUNCTION wm_ensure_reading_partitions(from_month date, months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
    m date := date_trunc('month', from_month)::date;
    part text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'readings'::regclass) THEN
        RETURN 0;
    END IF;
    FOR i IN 1..months LOOP
        part := format('readings_%s', to_char(m, 'YYYYMM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                part, m::timestamptz, (m + interval '1 month')::timestamptz);
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END
$$;
SELECT wm_ensure_reading_partitions((date_trunc('month', now()) - interval '24 months')::date, 37);

-- Rollups (owner: pipeline store): consumption per meter per hour and per day, maintained
-- incrementally from validated volume reads. Dashboards and billing read these, not raw rows.
CREATE TABLE IF NOT EXISTS rollup_hourly (
    meter_id     text NOT NULL,
    bucket       timestamptz NOT NULL,
    consumption  numeric(20, 6) NOT NULL,
    first_value  numeric(20, 6) NOT NULL,
    last_value   numeric(20, 6) NOT NULL,
    read_count   integer NOT NULL,
    estimated    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (meter_id, bucket)
);
CREATE TABLE IF NOT EXISTS rollup_daily (
    meter_id     text NOT NULL,
    bucket       date NOT NULL,
    consumption  numeric(20, 6) NOT NULL,
    first_value  numeric(20, 6) NOT NULL,
    last_value   numeric(20, 6) NOT NULL,
    read_count   integer NOT NULL,
    estimated    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (meter_id, bucket)
);

-- Ingest bookkeeping (owner: pipeline ingest): highest spool sequence committed per gateway,
-- so a redelivered batch is recognised even before the row-level unique key is reached.
CREATE TABLE IF NOT EXISTS ingest_progress (
    gateway_id   text NOT NULL,
    partition    integer NOT NULL,
    max_seq      bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, partition)
);

-- alarms (owner: pipeline detectors)
CREATE TABLE IF NOT EXISTS alarms (
    alarm_id     bigserial PRIMARY KEY,
    meter_id     text NOT NULL,
    kind         text NOT NULL,
    severity     text NOT NULL,
    raised_at    timestamptz NOT NULL,
    cleared_at   timestamptz,
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- At most one open alarm of a kind per meter.
CREATE UNIQUE INDEX IF NOT EXISTS alarms_open_uq ON alarms (meter_id, kind) WHERE cleared_at IS NULL;

-- commands (owner: pipeline control; the API inserts operator commands)
CREATE TABLE IF NOT EXISTS commands (
    command_id   text PRIMARY KEY,             -- idempotency key
    gateway_id   text NOT NULL,
    device_id    text NOT NULL,
    action       jsonb NOT NULL,
    state        text NOT NULL,
    state_detail jsonb,
    issued_by    text NOT NULL,
    issued_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS command_events (
    command_id   text NOT NULL REFERENCES commands (command_id),
    at           timestamptz NOT NULL,
    state        text NOT NULL,
    detail       jsonb,
    PRIMARY KEY (command_id, at, state)
);

-- Billing (owner: pipeline billing trigger, computed by billing-core)
CREATE TABLE IF NOT EXISTS billing_cycles (
    cycle_id     bigserial PRIMARY KEY,
    meter_book   text NOT NULL,
    period_start date NOT NULL,
    period_end   date NOT NULL,                -- exclusive
    status       text NOT NULL DEFAULT 'open',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (meter_book, period_start, period_end),
    CHECK (period_end > period_start)
);
CREATE TABLE IF NOT EXISTS bills (
    bill_id        bigserial PRIMARY KEY,
    cycle_id       bigint NOT NULL REFERENCES billing_cycles (cycle_id),
    meter_id       text NOT NULL,
    revision       integer NOT NULL DEFAULT 0,  -- 0 = original; >0 = adjustment
    adjusts_bill_id bigint REFERENCES bills (bill_id),
    customer_class text NOT NULL,
    tariff_name    text NOT NULL,
    tariff_version text NOT NULL,              -- effective date + content hash of the tariff file
    start_ts       timestamptz NOT NULL,
    end_ts         timestamptz NOT NULL,
    start_value    numeric(20, 6) NOT NULL,
    end_value      numeric(20, 6) NOT NULL,
    usage_m3       numeric(20, 6) NOT NULL,
    estimated      boolean NOT NULL,
    total          numeric(14, 2) NOT NULL,    -- yuan, fen precision
    inputs         jsonb NOT NULL,             -- reads and parameters used, to reproduce the bill
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (cycle_id, meter_id, revision)
);
CREATE TABLE IF NOT EXISTS bill_lines (
    bill_id      bigint NOT NULL REFERENCES bills (bill_id),
    line_no      integer NOT NULL,
    component    text NOT NULL,
    tier         integer NOT NULL,
    volume_m3    numeric(20, 6) NOT NULL,
    unit_price   numeric(12, 4) NOT NULL,
    amount       numeric(14, 2) NOT NULL,
    PRIMARY KEY (bill_id, line_no)
);

-- audit_log (owner: every writer of human-visible state: edits, commands, bill runs)
CREATE TABLE IF NOT EXISTS audit_log (
    audit_id     bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    entity       text NOT NULL,
    entity_id    text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS audit_entity_idx ON audit_log (entity, entity_id);
