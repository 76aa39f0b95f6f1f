-- Retention and archiving of readings as a job (issue 18; owner: pipeline store; the policy is
-- in docs/operations.md, the job `reading-retention` in pipeline::scheduler).
--
-- A month of readings older than `keep_months` is archived: its partition is detached from
-- reading_rows and moved, with the frames and quality details only its rows use, to the
-- schema wm_archive (`readings_YYYYMM`, `frames_YYYYMM`, `details_YYYYMM`), where the operator
-- dumps it (`pg_dump -n wm_archive`). Archived months older than `drop_months` are dropped.
-- Partitions are created ahead first. With `dry_run` nothing changes and the same plan is
-- returned. Plain PostgreSQL partitions only (TimescaleDB: add_retention_policy, see
-- docs/storage.md); the dictionaries are never pruned (one row per meter, series, unit).

CREATE SCHEMA IF NOT EXISTS wm_archive;

-- Frames are found by the rows that use them: frame ids grow with ingest time and rows are
-- appended in that order, so a BRIN index finds a range of frame ids in a few pages.
CREATE INDEX IF NOT EXISTS reading_rows_frame_brin ON reading_rows USING brin (frame_id);

CREATE OR REPLACE FUNCTION wm_reading_retention(
    keep_months integer, drop_months integer, months_ahead integer, dry_run boolean,
    at timestamptz DEFAULT now())
RETURNS TABLE (month text, action text, row_count bigint)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := date_trunc('month', at) - make_interval(months => keep_months);
    drop_cutoff timestamptz := date_trunc('month', at) - make_interval(months => drop_months);
    p record;
    n bigint;
    lo bigint;
    hi bigint;
    ahead date;
BEGIN
    IF keep_months < 1 OR drop_months < keep_months THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('retention needs 1 <= keep_months (%s) <= drop_months (%s)',
                             keep_months, drop_months);
    END IF;
    -- Create ahead.
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'reading_rows'::regclass) THEN
        FOR i IN 0..months_ahead LOOP
            ahead := (date_trunc('month', at) + make_interval(months => i))::date;
            IF to_regclass(format('public.readings_%s', to_char(ahead, 'YYYYMM'))) IS NULL THEN
                month := to_char(ahead, 'YYYY-MM');
                action := 'create';
                row_count := 0;
                IF NOT dry_run THEN
                    PERFORM wm_ensure_reading_partitions(ahead, 1);
                END IF;
                RETURN NEXT;
            END IF;
        END LOOP;
    END IF;
    -- Archive: attached monthly partitions wholly before the cutoff, oldest first.
    FOR p IN
        SELECT c.relname, substring(c.relname from 10) AS yyyymm
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace ns ON ns.oid = c.relnamespace AND ns.nspname = 'public'
        WHERE i.inhparent = 'reading_rows'::regclass AND c.relname ~ '^readings_[0-9]{6}$'
          AND to_timestamp(substring(c.relname from 10), 'YYYYMM') + interval '1 month' <= cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('SELECT count(*), min(frame_id), max(frame_id) FROM %I', p.relname)
            INTO n, lo, hi;
        month := to_char(to_date(p.yyyymm, 'YYYYMM'), 'YYYY-MM');
        action := 'archive';
        row_count := n;
        IF NOT dry_run THEN
            EXECUTE format('ALTER TABLE reading_rows DETACH PARTITION %I', p.relname);
            EXECUTE format('ALTER TABLE %I SET SCHEMA wm_archive', p.relname);
            -- Frames and details used by the month's rows go with it; a frame still used by a
            -- row online (a historic storage value dated in another month) stays as well.
            EXECUTE format(
                'CREATE TABLE wm_archive.%I AS SELECT f.* FROM frames f
                 WHERE f.frame_id BETWEEN %s AND %s
                   AND f.frame_id IN (SELECT frame_id FROM wm_archive.%I)',
                'frames_' || p.yyyymm, coalesce(lo, 0), coalesce(hi, -1), p.relname);
            EXECUTE format(
                'DELETE FROM frames f USING wm_archive.%I a
                 WHERE f.frame_id = a.frame_id
                   AND NOT EXISTS (SELECT 1 FROM reading_rows r
                                   WHERE r.frame_id = f.frame_id
                                     AND r.frame_id BETWEEN %s AND %s)',
                'frames_' || p.yyyymm, coalesce(lo, 0), coalesce(hi, -1));
            EXECUTE format('CREATE TABLE wm_archive.%I (LIKE reading_details)',
                'details_' || p.yyyymm);
            EXECUTE format(
                'WITH moved AS (DELETE FROM reading_details d
                     WHERE d.ts >= %L AND d.ts < %L RETURNING d.*)
                 INSERT INTO wm_archive.%I SELECT * FROM moved',
                to_timestamp(p.yyyymm, 'YYYYMM'),
                to_timestamp(p.yyyymm, 'YYYYMM') + interval '1 month',
                'details_' || p.yyyymm);
        END IF;
        RETURN NEXT;
    END LOOP;
    -- Drop archived months past drop_months.
    FOR p IN
        SELECT c.relname, substring(c.relname from 10) AS yyyymm
        FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
        WHERE ns.nspname = 'wm_archive' AND c.relkind = 'r'
          AND c.relname ~ '^readings_[0-9]{6}$'
          AND to_timestamp(substring(c.relname from 10), 'YYYYMM') + interval '1 month'
              <= drop_cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('SELECT count(*) FROM wm_archive.%I', p.relname) INTO n;
        month := to_char(to_date(p.yyyymm, 'YYYYMM'), 'YYYY-MM');
        action := 'drop';
        row_count := n;
        IF NOT dry_run THEN
            EXECUTE format('DROP TABLE wm_archive.%I', p.relname);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'frames_' || p.yyyymm);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'details_' || p.yyyymm);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
