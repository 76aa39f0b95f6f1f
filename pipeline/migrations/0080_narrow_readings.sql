-- Narrow readings (issue 18; owner: pipeline store, see docs/storage.md).
--
-- A stored reading was a wide row (meter id, quantity, unit, quality, clock, source as text, a
-- 64-character hex frame hash, gateway, channel and receive time on every row: ~390 bytes with
-- its index). It is now a narrow row of `reading_rows` whose every column is NOT NULL (so the
-- tuple has no null bitmap and its header stays 24 bytes):
--
--   meter_key int4   -> meter_keys (every meter id ever stored, registered or not)
--   series_id int2   -> reading_series (quantity, tariff, subunit): the dedup identity
--   ts, value numeric(20, 6) (exact, as before), unit_id int2 -> reading_units,
--   storage int2, quality int2 (wm_quality_code), flags int2 (bit set, wm_flag_bits),
--   frame_id int8    -> frames (provenance once per frame) -> frame_sources (gateway, source,
--                       source id, channel, clock: once per distinct combination)
--
-- `quality_detail` (estimates, edits, rejections only) lives in `reading_details`. The view
-- `readings` gives back the old columns, so every reader (VEE, billing, ledger, review, API,
-- detectors, Grafana) is unchanged; INSTEAD OF triggers let rare writers (edits, reviews,
-- tests) keep writing through it. The ingest path COPYs straight into the narrow tables.
--
-- Existing wide data is moved in this migration (one transaction), then the wide table is
-- dropped. Storage numbers above 32767 (none are produced by the decoders) make it fail loudly.

-- Dictionaries ---------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS meter_keys (
    meter_key  serial PRIMARY KEY,
    meter_id   text NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS reading_series (
    series_id  smallserial PRIMARY KEY,
    quantity   text NOT NULL,
    tariff     smallint NOT NULL,
    subunit    smallint NOT NULL,
    UNIQUE (quantity, tariff, subunit)
);
CREATE TABLE IF NOT EXISTS reading_units (
    unit_id    smallserial PRIMARY KEY,
    unit       text NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS frame_sources (
    source_key serial PRIMARY KEY,
    gateway_id text,
    source     text NOT NULL,
    source_id  text NOT NULL,
    channel    text,
    clock      text NOT NULL,
    UNIQUE NULLS NOT DISTINCT (gateway_id, source, source_id, channel, clock)
);

-- Provenance once per frame: frame_id = block << 20 | index, the block from one nextval per
-- ingest transaction (no sequence call per frame).
CREATE SEQUENCE IF NOT EXISTS wm_frame_block_seq;
CREATE TABLE IF NOT EXISTS frames (
    frame_id     bigint NOT NULL,
    received_at  timestamptz NOT NULL,
    spool_seq    bigint,
    source_key   integer NOT NULL,
    frame_hash   bytea,        -- the usual 64-hex-digit hash, as its 32 bytes
    frame_label  text,         -- any other frame hash text, kept verbatim
    PRIMARY KEY (frame_id) WITH (fillfactor = 100)
);
ALTER TABLE frames SET (fillfactor = 100);
CREATE INDEX IF NOT EXISTS frames_received_brin ON frames USING brin (received_at);

CREATE TABLE IF NOT EXISTS reading_details (
    meter_key      integer NOT NULL,
    series_id      smallint NOT NULL,
    ts             timestamptz NOT NULL,
    quality_detail jsonb NOT NULL,
    PRIMARY KEY (meter_key, series_id, ts)
);

-- Codes -----------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION wm_raise_smallint(msg text) RETURNS smallint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = msg;
END
$$;
CREATE OR REPLACE FUNCTION wm_quality_code(q text) RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE q WHEN 'actual' THEN 0 WHEN 'validated' THEN 1 WHEN 'estimated' THEN 2
                  WHEN 'edited' THEN 3 WHEN 'missing' THEN 4 WHEN 'rejected' THEN 5
                  ELSE wm_raise_smallint('unknown reading quality ' || q) END::smallint
$$;
CREATE OR REPLACE FUNCTION wm_quality_text(c smallint) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (ARRAY['actual', 'validated', 'estimated', 'edited', 'missing', 'rejected'])[c + 1]
$$;
-- Flag bits, in model::QualityFlag order; the text array keeps the stored order of the bits.
CREATE OR REPLACE FUNCTION wm_flag_names() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['clock_skew', 'out_of_order', 'rollover', 'reverse_flow', 'meter_replaced',
                 'spike', 'zero_consumption', 'unit_converted', 'superseded']
$$;
CREATE OR REPLACE FUNCTION wm_flag_bits(flags text[]) RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(bit_or(CASE WHEN p IS NULL
                               THEN wm_raise_smallint('unknown reading flag ' || f)::int
                               ELSE 1 << (p - 1) END), 0)::smallint
    FROM unnest(flags) AS f, LATERAL array_position(wm_flag_names(), f) AS p
$$;
CREATE OR REPLACE FUNCTION wm_flag_text(bits smallint) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(n ORDER BY i), '{}')
    FROM unnest(wm_flag_names()) WITH ORDINALITY AS t(n, i)
    WHERE bits & (1 << (i::int - 1)) <> 0
$$;

-- Dictionary lookups that add what is missing (one round trip per batch). Only the missing
-- values are inserted, so the serials are not burnt by ON CONFLICT on every batch.
CREATE OR REPLACE FUNCTION wm_meter_keys(ids text[])
RETURNS TABLE (meter_id text, meter_key integer) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meter_keys AS k (meter_id)
    SELECT DISTINCT i FROM unnest(ids) AS i
    WHERE NOT EXISTS (SELECT 1 FROM meter_keys m WHERE m.meter_id = i)
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT m.meter_id::text, m.meter_key FROM meter_keys m WHERE m.meter_id = ANY (ids);
END
$$;
CREATE OR REPLACE FUNCTION wm_series_keys(q text[], t smallint[], s smallint[])
RETURNS TABLE (quantity text, tariff smallint, subunit smallint, series_id smallint)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reading_series AS r (quantity, tariff, subunit)
    SELECT DISTINCT u.q, u.t, u.s FROM unnest(q, t, s) AS u(q, t, s)
    WHERE NOT EXISTS (SELECT 1 FROM reading_series x
                      WHERE x.quantity = u.q AND x.tariff = u.t AND x.subunit = u.s)
    ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT x.quantity::text, x.tariff, x.subunit, x.series_id
    FROM reading_series x JOIN (SELECT DISTINCT * FROM unnest(q, t, s)) AS u(q, t, s)
      ON x.quantity = u.q AND x.tariff = u.t AND x.subunit = u.s;
END
$$;
CREATE OR REPLACE FUNCTION wm_unit_keys(units text[])
RETURNS TABLE (unit text, unit_id smallint) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reading_units (unit)
    SELECT DISTINCT u FROM unnest(units) AS u
    WHERE NOT EXISTS (SELECT 1 FROM reading_units x WHERE x.unit = u)
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT x.unit::text, x.unit_id FROM reading_units x WHERE x.unit = ANY (units);
END
$$;
CREATE OR REPLACE FUNCTION wm_source_keys(g text[], src text[], sid text[], ch text[], clk text[])
RETURNS TABLE (gateway_id text, source text, source_id text, channel text, clock text,
               source_key integer)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO frame_sources (gateway_id, source, source_id, channel, clock)
    SELECT DISTINCT u.g, u.src, u.sid, u.ch, u.clk FROM unnest(g, src, sid, ch, clk)
        AS u(g, src, sid, ch, clk)
    WHERE NOT EXISTS (SELECT 1 FROM frame_sources x
                      WHERE x.gateway_id IS NOT DISTINCT FROM u.g AND x.source = u.src
                        AND x.source_id = u.sid AND x.channel IS NOT DISTINCT FROM u.ch
                        AND x.clock = u.clk)
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT x.gateway_id::text, x.source::text, x.source_id::text, x.channel::text,
                        x.clock::text, x.source_key
    FROM frame_sources x
    JOIN (SELECT DISTINCT * FROM unnest(g, src, sid, ch, clk)) AS u(g, src, sid, ch, clk)
      ON x.gateway_id IS NOT DISTINCT FROM u.g AND x.source = u.src AND x.source_id = u.sid
     AND x.channel IS NOT DISTINCT FROM u.ch AND x.clock = u.clk;
END
$$;

-- The wide table steps aside (its partitions too: the narrow ones take their names) --------
DO $$
DECLARE
    p record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'public' AND c.relname = 'readings' AND c.relkind IN ('r', 'p'))
    THEN
        ALTER TABLE readings RENAME TO readings_wide;
        FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'readings_wide'::regclass LOOP
            EXECUTE format('ALTER TABLE %I RENAME TO %I', p.relname, 'wide_' || p.relname);
        END LOOP;
    END IF;
END
$$;

-- The narrow table -------------------------------------------------------------------------------
DO $$
BEGIN
    IF to_regclass('public.reading_rows') IS NOT NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- TimescaleDB path (not exercised here: no TimescaleDB on the test machine; see
        -- docs/storage.md): monthly chunks, native compression of chunks older than 7 days
        -- segmented by meter, so a meter's month compresses to a few column blocks.
        CREATE TABLE reading_rows (
            ts         timestamptz NOT NULL,
            frame_id   bigint NOT NULL,
            meter_key  integer NOT NULL,
            series_id  smallint NOT NULL,
            unit_id    smallint NOT NULL,
            storage    smallint NOT NULL,
            quality    smallint NOT NULL,
            flags      smallint NOT NULL,
            value      numeric(20, 6) NOT NULL,
            PRIMARY KEY (meter_key, series_id, ts)
        );
        PERFORM create_hypertable('reading_rows', 'ts', chunk_time_interval => interval '1 month');
        EXECUTE 'ALTER TABLE reading_rows SET (timescaledb.compress,
                 timescaledb.compress_segmentby = ''meter_key, series_id'',
                 timescaledb.compress_orderby = ''ts'')';
        PERFORM add_compression_policy('reading_rows', interval '7 days');
    ELSE
        -- Plain PostgreSQL: monthly range partitions named readings_YYYYMM (as before), a
        -- default partition so no accepted read is refused for lack of a partition.
        CREATE TABLE reading_rows (
            ts         timestamptz NOT NULL,
            frame_id   bigint NOT NULL,
            meter_key  integer NOT NULL,
            series_id  smallint NOT NULL,
            unit_id    smallint NOT NULL,
            storage    smallint NOT NULL,
            quality    smallint NOT NULL,
            flags      smallint NOT NULL,
            value      numeric(20, 6) NOT NULL,
            PRIMARY KEY (meter_key, series_id, ts)
        ) PARTITION BY RANGE (ts);
        CREATE TABLE readings_default PARTITION OF reading_rows DEFAULT;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS reading_rows_ts_brin ON reading_rows USING brin (ts);

-- Monthly partitions of reading_rows over [from_month, from_month + months); as in 0032, a
-- month whose rows already sit in readings_default is built as a plain table, filled and
-- attached. A no-op under TimescaleDB. Returns how many partitions it created.
CREATE OR REPLACE FUNCTION wm_ensure_reading_partitions(from_month date, months integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
    m date := date_trunc('month', from_month)::date;
    part text;
    lo timestamptz;
    hi timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                   WHERE partrelid = 'reading_rows'::regclass) THEN
        RETURN 0;
    END IF;
    FOR i IN 1..months LOOP
        part := format('readings_%s', to_char(m, 'YYYYMM'));
        lo := m::timestamptz;
        hi := (m + interval '1 month')::timestamptz;
        IF to_regclass(part) IS NULL THEN
            IF to_regclass('readings_default') IS NOT NULL
               AND EXISTS (SELECT 1 FROM readings_default WHERE ts >= lo AND ts < hi) THEN
                EXECUTE format('CREATE TABLE %I (LIKE reading_rows INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM readings_default WHERE ts >= %L AND ts < %L RETURNING *)
                     INSERT INTO %I SELECT * FROM moved', lo, hi, part);
                EXECUTE format('ALTER TABLE reading_rows ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    part, lo, hi);
            ELSE
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF reading_rows FOR VALUES FROM (%L) TO (%L)',
                    part, lo, hi);
            END IF;
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END
$$;
SELECT wm_ensure_reading_partitions((date_trunc('month', now()) - interval '24 months')::date, 37);

-- Moving the wide rows ------------------------------------------------------------------------
DO $$
DECLARE
    block bigint;
    frames_n bigint;
BEGIN
    IF to_regclass('public.readings_wide') IS NULL THEN
        RETURN;
    END IF;
    -- Months the wide table had but the 37 prepared ones do not cover.
    PERFORM wm_ensure_reading_partitions(m::date, 1)
    FROM (SELECT DISTINCT date_trunc('month', ts) AS m FROM readings_wide
          WHERE ts >= '1990-01-01' AND ts < now() + interval '1 year') s;
    INSERT INTO meter_keys (meter_id)
        SELECT DISTINCT meter_id FROM readings_wide ORDER BY 1 ON CONFLICT DO NOTHING;
    INSERT INTO reading_series (quantity, tariff, subunit)
        SELECT DISTINCT quantity, tariff, subunit FROM readings_wide ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING;
    INSERT INTO reading_units (unit)
        SELECT DISTINCT unit FROM readings_wide ORDER BY 1 ON CONFLICT DO NOTHING;
    INSERT INTO frame_sources (gateway_id, source, source_id, channel, clock)
        SELECT DISTINCT gateway_id, source, source_id, channel, clock FROM readings_wide
        ON CONFLICT DO NOTHING;
    -- One frame per distinct provenance (a frame's readings share it).
    CREATE TEMP TABLE wm_mig ON COMMIT DROP AS
        SELECT w.*, dense_rank() OVER (ORDER BY w.gateway_id, w.source, w.source_id, w.channel,
                                       w.clock, w.received_at, w.frame_hash, w.spool_seq) AS frame_no
        FROM readings_wide w;
    block := nextval('wm_frame_block_seq');
    SELECT coalesce(max(frame_no), 0) INTO frames_n FROM wm_mig;
    PERFORM setval('wm_frame_block_seq', block + (frames_n >> 20) + 1);
    INSERT INTO frames (frame_id, received_at, spool_seq, source_key, frame_hash, frame_label)
    SELECT DISTINCT ON (m.frame_no) (block << 20) + m.frame_no, m.received_at, m.spool_seq,
           s.source_key,
           CASE WHEN m.frame_hash ~ '^[0-9a-f]{64}$' THEN decode(m.frame_hash, 'hex') END,
           CASE WHEN m.frame_hash !~ '^[0-9a-f]{64}$' THEN m.frame_hash END
    FROM wm_mig m JOIN frame_sources s
      ON s.gateway_id IS NOT DISTINCT FROM m.gateway_id AND s.source = m.source
     AND s.source_id = m.source_id AND s.channel IS NOT DISTINCT FROM m.channel
     AND s.clock = m.clock
    ORDER BY m.frame_no;
    INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
                              flags, value)
    SELECT m.ts, (block << 20) + m.frame_no, k.meter_key, s.series_id, u.unit_id,
           m.storage::smallint, wm_quality_code(m.quality), wm_flag_bits(m.flags), m.value
    FROM wm_mig m
    JOIN meter_keys k ON k.meter_id = m.meter_id
    JOIN reading_series s ON s.quantity = m.quantity AND s.tariff = m.tariff
                         AND s.subunit = m.subunit
    JOIN reading_units u ON u.unit = m.unit
    ORDER BY k.meter_key, s.series_id, m.ts;
    INSERT INTO reading_details (meter_key, series_id, ts, quality_detail)
    SELECT k.meter_key, s.series_id, m.ts, m.quality_detail
    FROM wm_mig m
    JOIN meter_keys k ON k.meter_id = m.meter_id
    JOIN reading_series s ON s.quantity = m.quantity AND s.tariff = m.tariff
                         AND s.subunit = m.subunit
    WHERE m.quality_detail IS NOT NULL;
    DROP TABLE wm_mig;
    DROP TABLE readings_wide CASCADE;
END
$$;

-- The readable form -----------------------------------------------------------------------------
-- LEFT JOINs on unique keys: the planner drops the ones a query does not use (a count or a
-- value query never touches frames or reading_details).
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
LEFT JOIN frame_sources fs ON fs.source_key = f.source_key;
ALTER VIEW readings ALTER COLUMN tariff SET DEFAULT 0;
ALTER VIEW readings ALTER COLUMN subunit SET DEFAULT 0;
ALTER VIEW readings ALTER COLUMN storage SET DEFAULT 0;
ALTER VIEW readings ALTER COLUMN flags SET DEFAULT '{}';
ALTER VIEW readings ALTER COLUMN source_id SET DEFAULT '';

-- A frame for one row written through the view (its own block: rare writers only).
CREATE OR REPLACE FUNCTION wm_view_frame(n readings) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    fid bigint := nextval('wm_frame_block_seq') << 20;
    skey integer;
BEGIN
    SELECT k.source_key INTO skey
    FROM wm_source_keys(ARRAY[n.gateway_id], ARRAY[n.source], ARRAY[coalesce(n.source_id, '')],
                        ARRAY[n.channel], ARRAY[n.clock]) k;
    INSERT INTO frames (frame_id, received_at, spool_seq, source_key, frame_hash, frame_label)
    VALUES (fid, n.received_at, n.spool_seq, skey,
            CASE WHEN n.frame_hash ~ '^[0-9a-f]{64}$' THEN decode(n.frame_hash, 'hex') END,
            CASE WHEN n.frame_hash !~ '^[0-9a-f]{64}$' THEN n.frame_hash END);
    RETURN fid;
END
$$;

-- INSTEAD OF INSERT / UPDATE / DELETE on the view, for rare writers. A duplicate key raises the
-- unique violation of reading_rows, as the table did (INSERT ... ON CONFLICT needs the table).
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
DROP TRIGGER IF EXISTS readings_view_write ON readings;
CREATE TRIGGER readings_view_write INSTEAD OF INSERT OR UPDATE OR DELETE ON readings
    FOR EACH ROW EXECUTE FUNCTION wm_readings_view_write();
