-- Reading retention with packed months (issue 18; owner: pipeline store, job
-- `reading-retention`, policy in docs/operations.md).
--
-- 0120 packs closed months into reading_packs / frame_packs. Archiving a month now moves its
-- packs too (to wm_archive.rpacks_YYYYMM / fpacks_YYYYMM), counts packed rows in the month's
-- row count, and dropping an archived month drops them. Same signature and result as 0110.

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
    -- Months this run archives (dry run: would archive) and their row counts.
    archived text[] := '{}';
    archived_rows bigint[] := '{}';
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
        n := n + coalesce((SELECT sum(cardinality(rp.ts_step)) FROM reading_packs rp
                           WHERE rp.month = to_date(p.yyyymm, 'YYYYMM')), 0);
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
            -- A packed month's packs go with it (only when it has any).
            IF EXISTS (SELECT 1 FROM frame_packs fp WHERE fp.month = to_date(p.yyyymm, 'YYYYMM')) THEN
                EXECUTE format(
                    'CREATE TABLE wm_archive.%I AS WITH moved AS (DELETE FROM reading_packs
                         WHERE month = %L RETURNING *) SELECT * FROM moved',
                    'rpacks_' || p.yyyymm, to_date(p.yyyymm, 'YYYYMM'));
                EXECUTE format(
                    'CREATE TABLE wm_archive.%I AS WITH moved AS (DELETE FROM frame_packs
                         WHERE month = %L RETURNING *) SELECT * FROM moved',
                    'fpacks_' || p.yyyymm, to_date(p.yyyymm, 'YYYYMM'));
            END IF;
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
        archived := archived || p.yyyymm;
        archived_rows := archived_rows || n;
        RETURN NEXT;
    END LOOP;
    -- Drop archived months past drop_months.
    -- A dry run archives nothing, so the months it would archive are planned from the
    -- archive loop's list (0081 missed them: its dry run never showed a month archived and
    -- dropped by the same run, while the real run did both).
    FOR p IN
        SELECT a.yyyymm, a.n
        FROM (SELECT substring(c.relname from 10) AS yyyymm, NULL::bigint AS n
              FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
              WHERE ns.nspname = 'wm_archive' AND c.relkind = 'r'
                AND c.relname ~ '^readings_[0-9]{6}$'
              UNION ALL
              SELECT x.yyyymm, x.n FROM unnest(archived, archived_rows) AS x(yyyymm, n)
              WHERE dry_run) a
        WHERE to_timestamp(a.yyyymm, 'YYYYMM') + interval '1 month' <= drop_cutoff
        ORDER BY a.yyyymm
    LOOP
        IF p.n IS NULL THEN
            EXECUTE format('SELECT count(*) FROM wm_archive.%I', 'readings_' || p.yyyymm) INTO n;
            IF to_regclass(format('wm_archive.%I', 'rpacks_' || p.yyyymm)) IS NOT NULL THEN
                EXECUTE format('SELECT %s + coalesce(sum(cardinality(ts_step)), 0) FROM wm_archive.%I',
                               n, 'rpacks_' || p.yyyymm) INTO n;
            END IF;
        ELSE
            n := p.n;
        END IF;
        month := to_char(to_date(p.yyyymm, 'YYYYMM'), 'YYYY-MM');
        action := 'drop';
        row_count := n;
        IF NOT dry_run THEN
            EXECUTE format('DROP TABLE wm_archive.%I', 'readings_' || p.yyyymm);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'frames_' || p.yyyymm);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'details_' || p.yyyymm);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'rpacks_' || p.yyyymm);
            EXECUTE format('DROP TABLE IF EXISTS wm_archive.%I', 'fpacks_' || p.yyyymm);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
