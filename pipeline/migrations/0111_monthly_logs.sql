-- The API call log and the audit log partitioned by month (issue 18, seed §9.5.3; owners: api
-- for the rows, pipeline scheduler for the partitions: job `reading-partitions` creates them
-- ahead, see docs/operations.md).
--
-- Both become range-partitioned on their time column (`at`) with monthly partitions named
-- `<table>_YYYYMM` and a default partition, so no row is refused for lack of a partition. A
-- partitioned table's primary key must contain the partition key: the keys are now
-- (call_id, at) and (audit_id, at); the ids keep their sequences, so they stay unique.
--
-- The audit log's hash chain is unchanged: chain_seq, prev_hash and row_hash are moved as they
-- are (the triggers are created after the move, so nothing is re-chained), the chain trigger
-- and the append-only triggers are recreated on the partitioned table (row triggers are
-- cloned to every partition, present and future). chain_seq can no longer have a unique index
-- of its own (it would need `at`); it stays unique by construction (assigned under the
-- chain head's row lock) and `api::audit::verify` checks that positions are contiguous. Old
-- months can be detached and archived (`ALTER TABLE audit_log DETACH PARTITION ...`): the
-- verification then starts at the first retained position (docs/operations.md).
--
-- Bills are not partitioned here: `bill_lines.bill_id` and `bills.adjusts_bill_id` reference
-- `bills (bill_id)`, which needs a unique index on bill_id alone; a partitioned `bills` cannot
-- have one (docs/storage.md, "Still missing").

-- Monthly partitions of a table partitioned by range on a timestamptz: `<table>_YYYYMM` over
-- [from_month, from_month + months). A month whose rows already sit in the default partition
-- is built as a plain table, filled and attached (as wm_ensure_reading_partitions does).
-- Returns how many partitions it created; 0 when the table is not partitioned.
CREATE OR REPLACE FUNCTION wm_ensure_monthly_partitions(tbl text, col text, from_month date,
                                                        months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
    m date := date_trunc('month', from_month)::date;
    part text;
    def text := tbl || '_default';
    lo timestamptz;
    hi timestamptz;
    moved boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(tbl)) THEN
        RETURN 0;
    END IF;
    FOR i IN 1..months LOOP
        part := format('%s_%s', tbl, to_char(m, 'YYYYMM'));
        lo := m::timestamptz;
        hi := (m + interval '1 month')::timestamptz;
        IF to_regclass(part) IS NULL THEN
            moved := false;
            IF to_regclass(def) IS NOT NULL THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= %L AND %I < %L)',
                               def, col, lo, col, hi) INTO moved;
            END IF;
            IF moved THEN
                -- Row triggers of the parent (the audit log's append-only one) would refuse
                -- the move out of the default partition: it runs with them disabled, as the
                -- rows keep every value (nothing is re-chained or changed).
                EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                               part, tbl);
                EXECUTE format('ALTER TABLE %I DISABLE TRIGGER USER', def);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)
                     INSERT INTO %I SELECT * FROM moved', def, col, lo, col, hi, part);
                EXECUTE format('ALTER TABLE %I ENABLE TRIGGER USER', def);
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               tbl, part, lo, hi);
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               part, tbl, lo, hi);
            END IF;
            -- TRUNCATE of a partition does not fire the parent's statement trigger: the audit
            -- log's partitions refuse it themselves.
            IF tbl = 'audit_log' THEN
                EXECUTE format('CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %I
                                FOR EACH STATEMENT EXECUTE FUNCTION wm_audit_append_only()', part);
            END IF;
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END
$$;

-- The API call log -------------------------------------------------------------------------------
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table
               WHERE partrelid = 'api_call_log'::regclass) THEN
        RETURN;
    END IF;
    ALTER TABLE api_call_log RENAME TO api_call_log_flat;
    ALTER INDEX api_call_log_pkey RENAME TO api_call_log_flat_pkey;
    ALTER INDEX api_call_log_at_idx RENAME TO api_call_log_flat_at_idx;
    ALTER SEQUENCE api_call_log_call_id_seq OWNED BY NONE;
    CREATE TABLE api_call_log (
        call_id         bigint NOT NULL DEFAULT nextval('api_call_log_call_id_seq'),
        at              timestamptz NOT NULL,
        caller          text NOT NULL,
        request_digest  text NOT NULL,
        result          smallint NOT NULL,
        error_code      text,
        handler         text NOT NULL,
        peer            text,
        PRIMARY KEY (call_id, at)
    ) PARTITION BY RANGE (at);
    ALTER SEQUENCE api_call_log_call_id_seq OWNED BY api_call_log.call_id;
    CREATE INDEX api_call_log_at_idx ON api_call_log (at);
    CREATE TABLE api_call_log_default PARTITION OF api_call_log DEFAULT;
    -- Partitions for the months that have rows, and last month to three months ahead.
    PERFORM wm_ensure_monthly_partitions('api_call_log', 'at', m::date, 1)
    FROM (SELECT DISTINCT date_trunc('month', at) AS m FROM api_call_log_flat) s;
    PERFORM wm_ensure_monthly_partitions('api_call_log', 'at',
        (date_trunc('month', now()) - interval '1 month')::date, 5);
    INSERT INTO api_call_log SELECT * FROM api_call_log_flat;
    DROP TABLE api_call_log_flat;
END
$$;

-- The audit log ----------------------------------------------------------------------------------
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'audit_log'::regclass) THEN
        RETURN;
    END IF;
    ALTER TABLE audit_log RENAME TO audit_log_flat;
    ALTER INDEX audit_log_pkey RENAME TO audit_log_flat_pkey;
    ALTER INDEX audit_entity_idx RENAME TO audit_flat_entity_idx;
    ALTER INDEX audit_log_chain_seq_uq RENAME TO audit_log_flat_chain_seq_uq;
    ALTER SEQUENCE audit_log_audit_id_seq OWNED BY NONE;
    CREATE TABLE audit_log (
        audit_id     bigint NOT NULL DEFAULT nextval('audit_log_audit_id_seq'),
        at           timestamptz NOT NULL DEFAULT now(),
        actor        text NOT NULL,
        action       text NOT NULL,
        entity       text NOT NULL,
        entity_id    text NOT NULL,
        detail       jsonb NOT NULL DEFAULT '{}'::jsonb,
        chain_seq    bigint,
        prev_hash    bytea,
        row_hash     bytea,
        PRIMARY KEY (audit_id, at)
    ) PARTITION BY RANGE (at);
    ALTER SEQUENCE audit_log_audit_id_seq OWNED BY audit_log.audit_id;
    CREATE INDEX audit_entity_idx ON audit_log (entity, entity_id);
    CREATE INDEX audit_log_chain_seq_idx ON audit_log (chain_seq);
    CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
    -- Partitions for the months that have rows, and last month to three months ahead.
    PERFORM wm_ensure_monthly_partitions('audit_log', 'at', m::date, 1)
    FROM (SELECT DISTINCT date_trunc('month', at) AS m FROM audit_log_flat) s;
    PERFORM wm_ensure_monthly_partitions('audit_log', 'at',
        (date_trunc('month', now()) - interval '1 month')::date, 5);
    -- Every column moves as it is: the chain (chain_seq, prev_hash, row_hash) is not rebuilt,
    -- the triggers below are created after the move.
    INSERT INTO audit_log SELECT audit_id, at, actor, action, entity, entity_id, detail,
                                 chain_seq, prev_hash, row_hash
    FROM audit_log_flat;
    DROP TABLE audit_log_flat;
END
$$;

DROP TRIGGER IF EXISTS audit_log_chain ON audit_log;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION wm_audit_chain();
DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION wm_audit_append_only();
DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION wm_audit_append_only();
-- Every partition present (the default one too) refuses TRUNCATE as the parent does.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'audit_log'::regclass LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS audit_log_no_truncate ON %I', p.relname);
        EXECUTE format('CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION wm_audit_append_only()', p.relname);
    END LOOP;
END
$$;
