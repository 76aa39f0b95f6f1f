-- Packed closed months (issue 18; owner: pipeline store, job `reading-retention`, see
-- docs/storage.md "Packed months").
--
-- Plain PostgreSQL's stand-in for TimescaleDB's native compression: a closed month's rows move
-- out of `reading_rows` into one row per (meter, series, month) of `reading_packs` holding
-- arrays (timestamps and frame numbers delta-encoded, so a regular series compresses to almost
-- nothing under TOAST/lz4), and the frames those rows use move into one row per (meter, month)
-- of `frame_packs` (the 32-byte hashes concatenated in one bytea). The `readings` view shows
-- both forms identically.
--
-- Dedup and late data: a (meter, month) is packed or in row form, never both. Whoever writes a
-- reading older than the pack horizon first unpacks that meter's month (`wm_unpack_readings`),
-- so the unique key of `reading_rows` judges duplicates exactly as before; the next job run
-- packs it again. Locks (advisory, key 1464684626 = 'WMPR'):
--   (K, 0)        shared by every writer while it reads the horizon (held to its commit),
--                 exclusive by `wm_pack_raise_horizon`: a writer either saw the new horizon
--                 or committed before it was raised;
--   (K, month)    shared by a writer unpacking in that month, exclusive by `wm_pack_month`.

CREATE TABLE IF NOT EXISTS wm_pack_state (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Readings with ts < horizon may be packed; writers of such readings unpack first.
    horizon   timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO wm_pack_state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One row per (meter, series, month). Element i of every array is the i-th reading by ts.
CREATE TABLE IF NOT EXISTS reading_packs (
    meter_key   integer NOT NULL,
    series_id   smallint NOT NULL,
    month       date NOT NULL,
    ts_first    timestamptz NOT NULL,
    -- Microseconds since the previous reading (the first element is 0).
    ts_step     bigint[] NOT NULL,
    value       numeric(20, 6)[] NOT NULL,
    unit_id     smallint[] NOT NULL,
    storage     smallint[] NOT NULL,
    quality     smallint[] NOT NULL,
    flags       smallint[] NOT NULL,
    -- Position in the (meter, month) frame pack, as the step from the previous reading's.
    frame_step  integer[] NOT NULL,
    PRIMARY KEY (meter_key, series_id, month) WITH (fillfactor = 100)
) WITH (toast_tuple_target = 128, fillfactor = 100);

-- One row per (meter, month): the frames its packed readings use, ordered by frame id.
CREATE TABLE IF NOT EXISTS frame_packs (
    meter_key    integer NOT NULL,
    month        date NOT NULL,
    frame_id     bigint[] NOT NULL,
    received_at  timestamptz[] NOT NULL,
    spool_seq    bigint[] NOT NULL,      -- elements may be NULL
    source_key   integer[] NOT NULL,
    -- Frame i's hash is bytes 32(i-1)+1 .. 32i; zeros where the frame has none.
    hashes       bytea NOT NULL,
    -- NULL when every frame has a hash, else false where it has none.
    has_hash     boolean[],
    -- NULL when no frame has a label (a hash text kept verbatim).
    labels       text[],
    PRIMARY KEY (meter_key, month) WITH (fillfactor = 100)
) WITH (toast_tuple_target = 128, fillfactor = 100);

DO $$
DECLARE
    c text;
BEGIN
    -- lz4 when the server has it (faster and here smaller than pglz); pglz otherwise.
    BEGIN
        FOREACH c IN ARRAY ARRAY['ts_step', 'value', 'unit_id', 'storage', 'quality', 'flags',
                                 'frame_step'] LOOP
            EXECUTE format('ALTER TABLE reading_packs ALTER COLUMN %I SET COMPRESSION lz4', c);
        END LOOP;
        FOREACH c IN ARRAY ARRAY['frame_id', 'received_at', 'spool_seq', 'source_key', 'hashes',
                                 'has_hash', 'labels'] LOOP
            EXECUTE format('ALTER TABLE frame_packs ALTER COLUMN %I SET COMPRESSION lz4', c);
        END LOOP;
    EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
        NULL;
    END;
END
$$;

CREATE OR REPLACE FUNCTION wm_month_lock_key(m timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (extract(year FROM m AT TIME ZONE 'UTC') * 12
            + extract(month FROM m AT TIME ZONE 'UTC'))::integer
$$;

-- The rows of a segment, in ts order (inlined into the view).
CREATE OR REPLACE FUNCTION wm_segment_rows(
    ts_first timestamptz, ts_step bigint[], value numeric[], unit_id smallint[],
    storage smallint[], quality smallint[], flags smallint[], frame_step integer[])
RETURNS TABLE (ts timestamptz, value numeric, unit_id smallint, storage smallint,
               quality smallint, flags smallint, frame_no integer)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ts_first + (sum(u.dt) OVER w) * interval '1 microsecond', u.v, u.uid, u.st, u.q,
           u.fl, (sum(u.fs) OVER w)::integer
    FROM unnest(ts_step, value, unit_id, storage, quality, flags, frame_step)
         WITH ORDINALITY AS u(dt, v, uid, st, q, fl, fs, i)
    WINDOW w AS (ORDER BY u.i ROWS UNBOUNDED PRECEDING)
$$;

-- The horizon, read under the shared horizon lock (held until the caller commits).
CREATE OR REPLACE FUNCTION wm_pack_horizon() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1464684626, 0);
    -- A new statement, so a new snapshot: the value committed before the lock was granted.
    RETURN (SELECT horizon FROM wm_pack_state);
END
$$;

-- Raises the horizon (never lowers it). Run in its own transaction before packing up to `h`.
CREATE OR REPLACE FUNCTION wm_pack_raise_horizon(h timestamptz) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    out_h timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(1464684626, 0);
    UPDATE wm_pack_state SET horizon = greatest(horizon, h) RETURNING horizon INTO out_h;
    RETURN out_h;
END
$$;

-- Moves one packed (meter, month) back into rows and frames. The caller holds the month lock.
CREATE OR REPLACE FUNCTION wm_unpack_meter_month(mk integer, m date) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO frames (frame_id, received_at, spool_seq, source_key, frame_hash, frame_label)
    SELECT f.fid, f.rat, f.seq, f.sk,
           CASE WHEN coalesce(p.has_hash[f.i], true)
                THEN substring(p.hashes FROM (f.i::integer - 1) * 32 + 1 FOR 32) END,
           p.labels[f.i]
    FROM frame_packs p,
         unnest(p.frame_id, p.received_at, p.spool_seq, p.source_key)
             WITH ORDINALITY AS f(fid, rat, seq, sk, i)
    -- A row whose frame was already gone is packed with an empty frame entry.
    WHERE p.meter_key = mk AND p.month = m AND f.rat IS NOT NULL
    ON CONFLICT (frame_id) DO NOTHING;
    WITH gone AS (DELETE FROM reading_packs p WHERE p.meter_key = mk AND p.month = m
                  RETURNING p.*)
    INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
                              flags, value)
    SELECT e.ts, fp.frame_id[e.frame_no], g.meter_key, g.series_id, e.unit_id, e.storage,
           e.quality, e.flags, e.value
    FROM gone g
    CROSS JOIN LATERAL wm_segment_rows(g.ts_first, g.ts_step, g.value, g.unit_id, g.storage,
                                       g.quality, g.flags, g.frame_step) e
    JOIN frame_packs fp ON fp.meter_key = mk AND fp.month = m
    ORDER BY g.series_id, e.ts;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM frame_packs WHERE meter_key = mk AND month = m;
    RETURN n;
END
$$;

-- Unpacks the (meter, month)s of readings about to be written, for those older than the
-- horizon: afterwards `reading_rows`' unique key sees every stored reading of those keys.
-- Returns the rows moved back.
CREATE OR REPLACE FUNCTION wm_unpack_readings(mk integer[], ts timestamptz[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    h timestamptz := wm_pack_horizon();
    mm record;
    seg record;
    n bigint := 0;
BEGIN
    -- Month locks in one order (no deadlock between two writers and the packer).
    FOR mm IN SELECT DISTINCT date_trunc('month', t AT TIME ZONE 'UTC')::date AS m
              FROM unnest(ts) AS t WHERE t < h ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared(1464684626, wm_month_lock_key(mm.m::timestamp AT TIME ZONE 'UTC'));
    END LOOP;
    FOR seg IN SELECT DISTINCT p.meter_key, p.month
               FROM unnest(mk, ts) AS u(k, t)
               JOIN frame_packs p ON p.meter_key = u.k
                AND p.month = date_trunc('month', u.t AT TIME ZONE 'UTC')::date
               WHERE u.t < h
               ORDER BY 1, 2 LOOP
        n := n + wm_unpack_meter_month(seg.meter_key, seg.month);
    END LOOP;
    RETURN n;
END
$$;

-- Packs month `m` (a date in it): every row of the month moves to reading_packs, its frames to
-- frame_packs (a frame still used by a row in row form stays in `frames` as well). Refuses a
-- month not wholly below the horizon. A (meter, month) already packed with new rows beside it
-- cannot happen through the write paths (they unpack first); should it, the pack is unpacked
-- and packed again with them. Returns (segments, rows, frames) packed; a dry run counts what
-- it would pack and changes nothing.
CREATE OR REPLACE FUNCTION wm_pack_month(m date, dry_run boolean)
RETURNS TABLE (segments bigint, row_count bigint, frame_count bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lo timestamptz := date_trunc('month', m::timestamp) AT TIME ZONE 'UTC';
    hi timestamptz := (date_trunc('month', m::timestamp) + interval '1 month') AT TIME ZONE 'UTC';
    mon date := date_trunc('month', m::timestamp)::date;
    part text := format('readings_%s', to_char(mon, 'YYYYMM'));
    h timestamptz;
    seg record;
BEGIN
    IF dry_run THEN
        RETURN QUERY
        SELECT count(DISTINCT (r.meter_key, r.series_id)), count(*), count(DISTINCT r.frame_id)
        FROM reading_rows r WHERE r.ts >= lo AND r.ts < hi;
        RETURN;
    END IF;
    SELECT horizon INTO h FROM wm_pack_state;
    IF hi > h THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('month %s ends at %s, after the pack horizon %s: raise the horizon first',
                             to_char(mon, 'YYYY-MM'), hi, h);
    END IF;
    PERFORM pg_advisory_xact_lock(1464684626, wm_month_lock_key(lo));
    -- No writer can add rows to the month's partition while it is emptied and truncated.
    IF to_regclass(part) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', part);
    END IF;
    FOR seg IN SELECT DISTINCT p.meter_key FROM frame_packs p
               WHERE p.month = mon
                 AND EXISTS (SELECT 1 FROM reading_rows r
                             WHERE r.meter_key = p.meter_key AND r.ts >= lo AND r.ts < hi)
               ORDER BY 1 LOOP
        PERFORM wm_unpack_meter_month(seg.meter_key, mon);
    END LOOP;
    CREATE TEMP TABLE wm_pack_rows ON COMMIT DROP AS
    WITH moved AS (DELETE FROM reading_rows r WHERE r.ts >= lo AND r.ts < hi RETURNING r.*)
    SELECT * FROM moved;
    CREATE TEMP TABLE wm_pack_frames ON COMMIT DROP AS
    SELECT x.meter_key, x.frame_id, f.received_at, f.spool_seq, f.source_key, f.frame_hash,
           f.frame_label, row_number() OVER (PARTITION BY x.meter_key ORDER BY f.frame_id)
               ::integer AS frame_no
    FROM (SELECT DISTINCT meter_key, frame_id FROM wm_pack_rows) x
    LEFT JOIN frames f ON f.frame_id = x.frame_id;
    -- The hash is 32 bytes by construction (a 64-hex-digit text decoded); anything else
    -- would shift every later hash of its pack.
    IF EXISTS (SELECT 1 FROM wm_pack_frames WHERE octet_length(frame_hash) <> 32) THEN
        RAISE EXCEPTION 'a frame hash of month % is not 32 bytes; not packed', to_char(mon, 'YYYY-MM');
    END IF;
    CREATE INDEX ON wm_pack_frames (meter_key, frame_id);
    ANALYZE wm_pack_rows;
    ANALYZE wm_pack_frames;
    INSERT INTO frame_packs (meter_key, month, frame_id, received_at, spool_seq, source_key,
                             hashes, has_hash, labels)
    SELECT f.meter_key, mon,
           array_agg(f.frame_id ORDER BY f.frame_no),
           array_agg(f.received_at ORDER BY f.frame_no),
           array_agg(f.spool_seq ORDER BY f.frame_no),
           array_agg(f.source_key ORDER BY f.frame_no),
           string_agg(coalesce(f.frame_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea),
                      '\x'::bytea ORDER BY f.frame_no),
           CASE WHEN bool_and(f.frame_hash IS NOT NULL) THEN NULL
                ELSE array_agg(f.frame_hash IS NOT NULL ORDER BY f.frame_no) END,
           CASE WHEN bool_or(f.frame_label IS NOT NULL)
                THEN array_agg(f.frame_label ORDER BY f.frame_no) END
    FROM wm_pack_frames f
    GROUP BY f.meter_key
    ORDER BY f.meter_key;
    INSERT INTO reading_packs (meter_key, series_id, month, ts_first, ts_step, value, unit_id,
                              storage, quality, flags, frame_step)
    SELECT s.meter_key, s.series_id, mon, min(s.ts),
           array_agg(s.dt ORDER BY s.ts), array_agg(s.value ORDER BY s.ts),
           array_agg(s.unit_id ORDER BY s.ts), array_agg(s.storage ORDER BY s.ts),
           array_agg(s.quality ORDER BY s.ts), array_agg(s.flags ORDER BY s.ts),
           array_agg(s.fstep ORDER BY s.ts)
    FROM (SELECT r.*, f.frame_no,
                 coalesce((extract(epoch FROM r.ts - lag(r.ts) OVER w) * 1000000)::bigint, 0) AS dt,
                 f.frame_no - coalesce(lag(f.frame_no) OVER w, 0) AS fstep
          FROM wm_pack_rows r
          JOIN wm_pack_frames f ON f.meter_key = r.meter_key AND f.frame_id = r.frame_id
          WINDOW w AS (PARTITION BY r.meter_key, r.series_id ORDER BY r.ts)) s
    GROUP BY s.meter_key, s.series_id
    ORDER BY s.meter_key, s.series_id;
    -- Frames no row in row form uses any more live only in their packs.
    DELETE FROM frames f
    USING (SELECT DISTINCT frame_id FROM wm_pack_frames) x
    WHERE f.frame_id = x.frame_id
      AND x.frame_id NOT IN (SELECT r.frame_id FROM reading_rows r
                             WHERE r.frame_id BETWEEN (SELECT min(frame_id) FROM wm_pack_frames)
                                                  AND (SELECT max(frame_id) FROM wm_pack_frames));
    -- The emptied partition gives its heap and index back at once.
    IF to_regclass(part) IS NOT NULL THEN
        EXECUTE format('TRUNCATE %I', part);
    END IF;
    RETURN QUERY
    SELECT (SELECT count(DISTINCT (meter_key, series_id)) FROM wm_pack_rows),
           (SELECT count(*) FROM wm_pack_rows), (SELECT count(*) FROM wm_pack_frames);
    DROP TABLE wm_pack_rows;
    DROP TABLE wm_pack_frames;
END
$$;

-- The readable form: rows, then packs. Each branch is planned on its own with the columns a
-- query uses, so the LEFT JOINs on unique keys (details, frame packs, sources) are still
-- dropped when unused.
CREATE OR REPLACE VIEW readings AS
SELECT k.meter_id, r.ts, s.quantity, s.tariff, s.subunit, r.storage::integer AS storage,
       r.value, u.unit, wm_quality_text(r.quality) AS quality, d.quality_detail,
       wm_flag_text(r.flags) AS flags, fs.clock, fs.source, fs.source_id, fs.gateway_id,
       f.spool_seq, coalesce(encode(f.frame_hash, 'hex'), f.frame_label) AS frame_hash,
       f.received_at, fs.channel
FROM reading_rows r
JOIN meter_keys k ON k.meter_key = r.meter_key
JOIN reading_series s ON s.series_id = r.series_id
JOIN reading_units u ON u.unit_id = r.unit_id
LEFT JOIN reading_details d
       ON d.meter_key = r.meter_key AND d.series_id = r.series_id AND d.ts = r.ts
LEFT JOIN frames f ON f.frame_id = r.frame_id
LEFT JOIN frame_sources fs ON fs.source_key = f.source_key
UNION ALL
SELECT k.meter_id, e.ts, s.quantity, s.tariff, s.subunit, e.storage::integer,
       e.value::numeric(20, 6), u.unit, wm_quality_text(e.quality), d.quality_detail,
       wm_flag_text(e.flags), fs.clock, fs.source, fs.source_id, fs.gateway_id,
       fp.spool_seq[e.frame_no],
       coalesce(CASE WHEN coalesce(fp.has_hash[e.frame_no], true)
                     THEN encode(substring(fp.hashes FROM (e.frame_no - 1) * 32 + 1 FOR 32), 'hex')
                END,
                fp.labels[e.frame_no]),
       fp.received_at[e.frame_no], fs.channel
FROM reading_packs p
CROSS JOIN LATERAL wm_segment_rows(p.ts_first, p.ts_step, p.value, p.unit_id, p.storage,
                                   p.quality, p.flags, p.frame_step) e
JOIN meter_keys k ON k.meter_key = p.meter_key
JOIN reading_series s ON s.series_id = p.series_id
JOIN reading_units u ON u.unit_id = e.unit_id
LEFT JOIN reading_details d
       ON d.meter_key = p.meter_key AND d.series_id = p.series_id AND d.ts = e.ts
LEFT JOIN frame_packs fp ON fp.meter_key = p.meter_key AND fp.month = p.month
LEFT JOIN frame_sources fs ON fs.source_key = fp.source_key[e.frame_no];

-- Writers through the view unpack the (meter, month) they touch first (0080's function
-- otherwise unchanged).
CREATE OR REPLACE FUNCTION wm_readings_view_write() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mk integer;
    sid smallint;
    uid smallint;
    fid bigint;
    old_mk integer;
    old_sid smallint;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT meter_key INTO old_mk FROM meter_keys WHERE meter_id = OLD.meter_id;
        SELECT series_id INTO old_sid FROM reading_series
        WHERE quantity = OLD.quantity AND tariff = OLD.tariff AND subunit = OLD.subunit;
        PERFORM wm_unpack_readings(ARRAY[old_mk], ARRAY[OLD.ts]);
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM reading_rows WHERE meter_key = old_mk AND series_id = old_sid AND ts = OLD.ts;
        DELETE FROM reading_details WHERE meter_key = old_mk AND series_id = old_sid AND ts = OLD.ts;
        RETURN OLD;
    END IF;
    SELECT x.meter_key INTO mk FROM wm_meter_keys(ARRAY[NEW.meter_id]) x;
    SELECT x.series_id INTO sid FROM wm_series_keys(ARRAY[NEW.quantity],
        ARRAY[coalesce(NEW.tariff, 0)::smallint], ARRAY[coalesce(NEW.subunit, 0)::smallint]) x;
    SELECT x.unit_id INTO uid FROM wm_unit_keys(ARRAY[NEW.unit]) x;
    PERFORM wm_unpack_readings(ARRAY[mk], ARRAY[NEW.ts]);
    IF TG_OP = 'INSERT' THEN
        fid := wm_view_frame(NEW);
        INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
                                  flags, value)
        VALUES (NEW.ts, fid, mk, sid, uid, coalesce(NEW.storage, 0)::smallint,
                wm_quality_code(NEW.quality), wm_flag_bits(coalesce(NEW.flags, '{}')), NEW.value);
    ELSE
        IF (NEW.gateway_id, NEW.source, NEW.source_id, NEW.channel, NEW.clock, NEW.spool_seq,
            NEW.frame_hash, NEW.received_at)
           IS DISTINCT FROM
           (OLD.gateway_id, OLD.source, OLD.source_id, OLD.channel, OLD.clock, OLD.spool_seq,
            OLD.frame_hash, OLD.received_at) THEN
            fid := wm_view_frame(NEW);
        END IF;
        UPDATE reading_rows r SET ts = NEW.ts, meter_key = mk, series_id = sid, unit_id = uid,
            storage = coalesce(NEW.storage, 0)::smallint, quality = wm_quality_code(NEW.quality),
            flags = wm_flag_bits(coalesce(NEW.flags, '{}')), value = NEW.value,
            frame_id = coalesce(fid, r.frame_id)
        WHERE r.meter_key = old_mk AND r.series_id = old_sid AND r.ts = OLD.ts;
        DELETE FROM reading_details WHERE meter_key = old_mk AND series_id = old_sid AND ts = OLD.ts;
    END IF;
    IF NEW.quality_detail IS NOT NULL THEN
        INSERT INTO reading_details (meter_key, series_id, ts, quality_detail)
        VALUES (mk, sid, NEW.ts, NEW.quality_detail)
        ON CONFLICT (meter_key, series_id, ts) DO UPDATE SET quality_detail = excluded.quality_detail;
    END IF;
    RETURN NEW;
END
$$;
