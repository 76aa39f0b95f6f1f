-- Bills and their lines partitioned by month (issue 18, seed §9.5.3; owner: pipeline billing for
-- the rows, pipeline scheduler for the partitions: job `reading-partitions` creates them ahead,
-- see docs/storage.md and docs/operations.md).
--
-- Partition key: `period_start`, the first day of the bill's billing cycle (a copy of
-- `billing_cycles.period_start`, held equal by a foreign key on (cycle_id, period_start)). Not
-- the issue date: every billing query selects by cycle (the standing bill of a cycle and meter,
-- the previous cycle's end read, the tariff year's usage by cycle end), and an original bill and
-- every adjustment of it share their cycle, so they share their partition whenever they are
-- issued. That also keeps the old key `UNIQUE (cycle_id, meter_id, revision)` exact: extended
-- with period_start, which is a function of cycle_id, it still allows one row per revision.
--
-- Keys: a partitioned table's unique keys must contain the partition key, so bills are keyed
-- (bill_id, period_start); bill_lines carry their bill's period_start (they follow their bill's
-- month) and reference bills (bill_id, period_start); an adjustment references the bill it
-- adjusts by (adjusts_bill_id, adjusts_period_start), MATCH FULL (both or neither).
--
-- bill_id stays globally unique: it still comes from the sequence bills_bill_id_seq, and
-- `bill_index (bill_id PRIMARY KEY, period_start)`, filled by a trigger on every insert,
-- refuses a second bill with the same id in any month (a constraint, not a convention). It is
-- also how a bill is found by id without visiting every month: read its month from the index,
-- then select with both keys, so only that month's partition is scanned. Index rows outlive
-- a detached (archived) month, so an archived bill's id is never reused.
--
-- A default partition takes any bill whose month has no partition yet (a cycle far in the
-- past or future), so no bill is refused; `wm_ensure_bill_partitions` moves such rows into
-- their month when it creates it.

-- The composite key the bills' cycle reference needs (cycle_id alone is already unique).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'billing_cycles_cycle_period_key') THEN
        ALTER TABLE billing_cycles
            ADD CONSTRAINT billing_cycles_cycle_period_key UNIQUE (cycle_id, period_start);
    END IF;
END
$$;

-- Bill id → month of its partition; one row per bill ever written.
CREATE TABLE IF NOT EXISTS bill_index (
    bill_id      bigint PRIMARY KEY,
    period_start date NOT NULL
);

CREATE OR REPLACE FUNCTION wm_bill_index_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bill_index (bill_id, period_start) VALUES (NEW.bill_id, NEW.period_start);
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'bills'::regclass) THEN
        RETURN;
    END IF;
    ALTER TABLE bill_lines RENAME TO bill_lines_flat;
    ALTER INDEX bill_lines_pkey RENAME TO bill_lines_flat_pkey;
    ALTER TABLE bills RENAME TO bills_flat;
    ALTER INDEX bills_pkey RENAME TO bills_flat_pkey;
    ALTER INDEX bills_cycle_id_meter_id_revision_key RENAME TO bills_flat_cycle_key;
    ALTER INDEX bills_meter_idx RENAME TO bills_flat_meter_idx;
    ALTER SEQUENCE bills_bill_id_seq OWNED BY NONE;

    CREATE TABLE bills (
        bill_id         bigint NOT NULL DEFAULT nextval('bills_bill_id_seq'),
        cycle_id        bigint NOT NULL,
        meter_id        text NOT NULL,
        revision        integer NOT NULL DEFAULT 0,  -- 0 = original; >0 = adjustment
        adjusts_bill_id bigint,
        customer_class  text NOT NULL,
        tariff_name     text NOT NULL,
        tariff_version  text NOT NULL,
        start_ts        timestamptz NOT NULL,
        end_ts          timestamptz NOT NULL,
        start_value     numeric(20, 6) NOT NULL,
        end_value       numeric(20, 6) NOT NULL,
        usage_m3        numeric(20, 6) NOT NULL,
        estimated       boolean NOT NULL,
        total           numeric(14, 2) NOT NULL,
        inputs          jsonb NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        kind            text NOT NULL DEFAULT 'original',
        effective_total numeric(14, 2),
        inputs_hash     text,
        run_id          bigint CONSTRAINT bills_run_fkey REFERENCES bill_runs (run_id),
        -- The cycle's first day: the partition key (see the header).
        period_start    date NOT NULL,
        -- The partition of the adjusted bill.
        adjusts_period_start date,
        CONSTRAINT bills_pkey PRIMARY KEY (bill_id, period_start),
        CONSTRAINT bills_cycle_key UNIQUE (cycle_id, meter_id, revision, period_start),
        CONSTRAINT bills_cycle_fkey FOREIGN KEY (cycle_id, period_start)
            REFERENCES billing_cycles (cycle_id, period_start),
        CONSTRAINT bills_adjusts_fkey FOREIGN KEY (adjusts_bill_id, adjusts_period_start)
            REFERENCES bills (bill_id, period_start) MATCH FULL
    ) PARTITION BY RANGE (period_start);
    ALTER SEQUENCE bills_bill_id_seq OWNED BY bills.bill_id;
    CREATE INDEX bills_meter_idx ON bills (meter_id, cycle_id, revision);
    CREATE TABLE bills_default PARTITION OF bills DEFAULT;

    CREATE TABLE bill_lines (
        bill_id        bigint NOT NULL,
        line_no        integer NOT NULL,
        component      text NOT NULL,
        tier           integer NOT NULL,
        volume_m3      numeric(20, 6) NOT NULL,
        unit_price     numeric(12, 4) NOT NULL,
        amount         numeric(14, 2) NOT NULL,
        kind           text NOT NULL DEFAULT 'charge',
        period_from    date,
        period_to      date,
        tariff_version text,
        -- Its bill's period_start: lines live in their bill's month.
        period_start   date NOT NULL,
        CONSTRAINT bill_lines_pkey PRIMARY KEY (bill_id, period_start, line_no),
        CONSTRAINT bill_lines_bill_fkey FOREIGN KEY (bill_id, period_start)
            REFERENCES bills (bill_id, period_start)
    ) PARTITION BY RANGE (period_start);
    CREATE TABLE bill_lines_default PARTITION OF bill_lines DEFAULT;
END
$$;

-- Monthly partitions `bills_YYYYMM` and `bill_lines_YYYYMM` over [from_month, from_month +
-- months), created together (lines follow their bill's month). Rows waiting in a default
-- partition for a month it creates are moved into it (wm_ensure_monthly_partitions). A bill
-- cannot simply be moved out of bills_default while lines or adjustments reference it:
-- PostgreSQL checks a reference to a partitioned table against the partition the row left, so
-- the move would be refused. When rows wait, the two references (lines → bill, adjustment →
-- adjusted bill) are dropped for the move and added back right after it, validated over every
-- row, in the same transaction; that is a full scan of bills and lines, paid only when a bill
-- sat in the default partition (a cycle outside the months prepared). Returns how many bills
-- partitions it created (the lines' are the same months).
CREATE OR REPLACE FUNCTION wm_ensure_bill_partitions(from_month date, months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer;
    lo date := date_trunc('month', from_month)::date;
    hi date := (date_trunc('month', from_month) + make_interval(months => months))::date;
    waiting boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('bills')) THEN
        RETURN 0;
    END IF;
    -- Rows in a default partition inside the range belong to a month without a partition (the
    -- default partition can hold no row of an existing one).
    SELECT EXISTS (SELECT 1 FROM bills_default WHERE period_start >= lo AND period_start < hi)
        OR EXISTS (SELECT 1 FROM bill_lines_default WHERE period_start >= lo AND period_start < hi)
    INTO waiting;
    IF waiting THEN
        ALTER TABLE bill_lines DROP CONSTRAINT bill_lines_bill_fkey;
        ALTER TABLE bills DROP CONSTRAINT bills_adjusts_fkey;
    END IF;
    created := wm_ensure_monthly_partitions('bills', 'period_start', lo, months);
    PERFORM wm_ensure_monthly_partitions('bill_lines', 'period_start', lo, months);
    IF waiting THEN
        ALTER TABLE bills ADD CONSTRAINT bills_adjusts_fkey
            FOREIGN KEY (adjusts_bill_id, adjusts_period_start)
            REFERENCES bills (bill_id, period_start) MATCH FULL;
        ALTER TABLE bill_lines ADD CONSTRAINT bill_lines_bill_fkey
            FOREIGN KEY (bill_id, period_start) REFERENCES bills (bill_id, period_start);
    END IF;
    RETURN created;
END
$$;

-- Existing rows move unchanged (ids, revisions, totals, inputs, timestamps), each bill into the
-- month of its cycle's start, each line after its bill, each adjustment with the month of the
-- bill it adjusts.
DO $$
BEGIN
    IF to_regclass('bills_flat') IS NULL THEN
        RETURN;
    END IF;
    -- Partitions for the months that have bills, and last month to three months ahead.
    PERFORM wm_ensure_bill_partitions(m::date, 1)
    FROM (SELECT DISTINCT date_trunc('month', c.period_start) AS m
          FROM bills_flat b JOIN billing_cycles c ON c.cycle_id = b.cycle_id) s;
    PERFORM wm_ensure_bill_partitions((date_trunc('month', now()) - interval '1 month')::date, 5);
    INSERT INTO bills (bill_id, cycle_id, meter_id, revision, adjusts_bill_id, customer_class,
                       tariff_name, tariff_version, start_ts, end_ts, start_value, end_value,
                       usage_m3, estimated, total, inputs, created_at, kind, effective_total,
                       inputs_hash, run_id, period_start, adjusts_period_start)
    SELECT b.bill_id, b.cycle_id, b.meter_id, b.revision, b.adjusts_bill_id, b.customer_class,
           b.tariff_name, b.tariff_version, b.start_ts, b.end_ts, b.start_value, b.end_value,
           b.usage_m3, b.estimated, b.total, b.inputs, b.created_at, b.kind, b.effective_total,
           b.inputs_hash, b.run_id, c.period_start, ac.period_start
    FROM bills_flat b
    JOIN billing_cycles c ON c.cycle_id = b.cycle_id
    LEFT JOIN bills_flat a ON a.bill_id = b.adjusts_bill_id
    LEFT JOIN billing_cycles ac ON ac.cycle_id = a.cycle_id;
    INSERT INTO bill_lines (bill_id, line_no, component, tier, volume_m3, unit_price, amount,
                            kind, period_from, period_to, tariff_version, period_start)
    SELECT l.bill_id, l.line_no, l.component, l.tier, l.volume_m3, l.unit_price, l.amount,
           l.kind, l.period_from, l.period_to, l.tariff_version, c.period_start
    FROM bill_lines_flat l
    JOIN bills_flat b ON b.bill_id = l.bill_id
    JOIN billing_cycles c ON c.cycle_id = b.cycle_id;
    DROP TABLE bill_lines_flat;
    DROP TABLE bills_flat;
END
$$;

-- Every bill has its index row (those moved above included); every new bill adds one, and a
-- second bill with an id already used in any month is refused by bill_index's primary key.
INSERT INTO bill_index (bill_id, period_start)
SELECT bill_id, period_start FROM bills
ON CONFLICT (bill_id) DO NOTHING;
DROP TRIGGER IF EXISTS bills_index ON bills;
CREATE TRIGGER bills_index AFTER INSERT ON bills
    FOR EACH ROW EXECUTE FUNCTION wm_bill_index_add();
