-- End-to-end delivery (issue 25; owner: pipeline ingest, see docs/reliability.md). Idempotent
-- like 0001.

-- Spool progress per (gateway, spool incarnation, partition): a gateway whose spool directory
-- was replaced, or whose spool cut a corrupt tail, numbers its readings under a new
-- incarnation, so its new sequence numbers are never mistaken for ones already committed.
-- Rows from gateways that predate incarnations keep incarnation ''.
ALTER TABLE ingest_progress ADD COLUMN IF NOT EXISTS incarnation text NOT NULL DEFAULT '';
DO $$
BEGIN
    IF (SELECT array_length(i.indkey::int2[], 1)
          FROM pg_index i
         WHERE i.indrelid = 'ingest_progress'::regclass AND i.indisprimary) <> 3 THEN
        ALTER TABLE ingest_progress DROP CONSTRAINT ingest_progress_pkey;
        ALTER TABLE ingest_progress ADD PRIMARY KEY (gateway_id, incarnation, partition);
    END IF;
END
$$;

-- Creates monthly partitions of readings covering [from_month, from_month + months), as in
-- 0001, but a month whose rows already sit in readings_default (a read dated ahead of the
-- prepared months, stored before ingest refused such reads) no longer makes
-- `CREATE TABLE ... PARTITION OF` fail ("updated partition constraint for default partition
-- would be violated") and with it the worker's start: the month is built as a plain table,
-- the rows are moved into it and it is attached.
CREATE OR REPLACE FUNCTION wm_ensure_reading_partitions(from_month date, months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
    m date := date_trunc('month', from_month)::date;
    part text;
    lo timestamptz;
    hi timestamptz;
    cols text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'readings'::regclass) THEN
        RETURN 0;
    END IF;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
      FROM pg_attribute
     WHERE attrelid = 'readings'::regclass AND attnum > 0 AND NOT attisdropped;
    FOR i IN 1..months LOOP
        part := format('readings_%s', to_char(m, 'YYYYMM'));
        lo := m::timestamptz;
        hi := (m + interval '1 month')::timestamptz;
        IF to_regclass(part) IS NULL THEN
            IF to_regclass('readings_default') IS NOT NULL
               AND EXISTS (SELECT 1 FROM readings_default WHERE ts >= lo AND ts < hi) THEN
                EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM readings_default WHERE ts >= %L AND ts < %L RETURNING %s)
                     INSERT INTO %I (%s) SELECT %s FROM moved',
                    lo, hi, cols, part, cols, cols);
                EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    part, lo, hi);
            ELSE
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                    part, lo, hi);
            END IF;
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END
$$;
