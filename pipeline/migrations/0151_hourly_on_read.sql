-- Hourly consumption derived from readings on read (issue 18, branch h18r; owner: pipeline
-- store, docs/storage.md "Rollups"). Idempotent like 0001.
--
-- `rollup_hourly` was folded from the ingest journal: with hourly or 15-minute reads one
-- text-keyed upsert per reading, a second copy of `readings` that cost PostgreSQL more CPU per
-- reading than storing the reading. Its only production reader is the API's hourly resolution
-- (one meter, a bounded range), which reads few enough reads to sum them when asked.
-- `rollup_daily` stays folded from the journal (dashboards, detectors and billing scan it for
-- whole fleets).

-- The consumption spans of one meter's billable volume reads with from_ts <= ts < to_ts: the
-- span logic of `wm_recompute_rollups` (0010) in one place, for the hourly view and the daily
-- recompute. The last billable read before from_ts gives the first span its base (a meter's
-- first read ever spans 0).
CREATE OR REPLACE FUNCTION wm_consumption_spans(
    p_meter text, from_ts timestamptz, to_ts timestamptz)
RETURNS TABLE (ts timestamptz, value numeric, delta numeric, estimated boolean)
LANGUAGE sql STABLE AS $$
    -- Not materialised: the meter and range predicates must reach the readings' index.
    WITH billable AS NOT MATERIALIZED (
        SELECT r.ts, r.value, r.flags, r.quality
        FROM readings r
        WHERE r.meter_id = p_meter AND r.quantity = 'volume' AND r.tariff = 0
          AND r.subunit = 0 AND r.storage = 0
          AND r.quality IN ('validated', 'estimated', 'edited')
          AND NOT ('superseded' = ANY (r.flags))
    ), span AS (
        (SELECT * FROM billable b WHERE b.ts < from_ts ORDER BY b.ts DESC LIMIT 1)
        UNION ALL
        SELECT * FROM billable b WHERE b.ts >= from_ts AND b.ts < to_ts
    ), d AS (
        SELECT s.ts, s.value, s.flags, s.quality, lag(s.value) OVER (ORDER BY s.ts) AS prev
        FROM span s
    )
    SELECT d.ts, d.value,
        CASE
            WHEN d.prev IS NULL THEN 0
            WHEN 'meter_replaced' = ANY (d.flags) THEN coalesce((
                SELECT (d.value - r.new_initial_value) + greatest(r.old_final_value - d.prev, 0)
                FROM meter_replacements r
                WHERE r.meter_id = p_meter AND r.replaced_at <= d.ts
                ORDER BY r.replaced_at DESC LIMIT 1), 0)
            WHEN 'rollover' = ANY (d.flags) THEN coalesce(
                (SELECT m.register_capacity FROM meters m WHERE m.meter_id = p_meter), 100000)
                - d.prev + d.value
            ELSE d.value - d.prev
        END,
        d.quality = 'estimated'
    FROM d
    WHERE d.ts >= from_ts
$$;

-- Hourly rollup rows of one meter whose bucket (UTC hour) lies in [from_ts, to_ts): what the
-- journal fold wrote into the table, computed from the reads (consumption of a read in the
-- bucket of its own timestamp, first/last register value of the hour, reads counted, any
-- estimate).
-- Without JIT: the plan spans every month partition of rows and packs twice, so its estimated
-- cost passes jit_above_cost as soon as the planner guesses more than a few meters, and
-- compiling it took 10 s (an unfiltered count of the view with one meter) for a query that
-- runs in milliseconds. The SET keeps the function from being inlined: it is planned once
-- per statement and run per meter.
CREATE OR REPLACE FUNCTION wm_rollup_hourly(p_meter text, from_ts timestamptz, to_ts timestamptz)
RETURNS TABLE (bucket timestamptz, consumption numeric(20, 6), first_value numeric(20, 6),
               last_value numeric(20, 6), read_count integer, estimated boolean)
LANGUAGE sql STABLE SET jit = off AS $$
    SELECT h.b, h.consumption, h.first_value, h.last_value, h.read_count, h.estimated
    FROM (
        SELECT date_trunc('hour', s.ts, 'UTC') AS b, sum(s.delta)::numeric(20, 6) AS consumption,
               (array_agg(s.value ORDER BY s.ts))[1]::numeric(20, 6) AS first_value,
               (array_agg(s.value ORDER BY s.ts DESC))[1]::numeric(20, 6) AS last_value,
               count(*)::integer AS read_count, bool_or(s.estimated) AS estimated
        FROM wm_consumption_spans(p_meter, date_trunc('hour', from_ts, 'UTC'),
                                  date_trunc('hour', to_ts, 'UTC') + interval '1 hour') s
        GROUP BY 1
    ) h
    WHERE h.b >= from_ts AND h.b < to_ts
    ORDER BY h.b
$$;

-- The old table's rows are all derivable from readings (the fold and the recompute wrote
-- nothing else), so it goes; the relation stays as a view for ad-hoc queries and tests. Ask
-- it for one meter (`WHERE meter_id = ...`: pushed into `meter_keys`, one call); the API
-- calls wm_rollup_hourly with its range instead, which reads only that range.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = current_schema() AND c.relname = 'rollup_hourly'
                 AND c.relkind = 'r') THEN
        DROP TABLE rollup_hourly;
    END IF;
END
$$;
CREATE OR REPLACE VIEW rollup_hourly AS
SELECT k.meter_id, h.bucket, h.consumption, h.first_value, h.last_value, h.read_count,
       h.estimated
FROM meter_keys k
CROSS JOIN LATERAL wm_rollup_hourly(k.meter_id, '-infinity', 'infinity') h;

-- 0010's recompute without the hourly table: rebuilds the daily rollups of one meter over
-- the local days covering [from_ts, to_ts] from its spans.
CREATE OR REPLACE FUNCTION wm_recompute_rollups(
    p_meter text, from_ts timestamptz, to_ts timestamptz, day_offset interval)
RETURNS void LANGUAGE plpgsql SET TimeZone = 'UTC' SET jit = off AS $$
DECLARE
    day_from date := ((from_ts + day_offset) AT TIME ZONE 'UTC')::date;
    day_to date := ((to_ts + day_offset) AT TIME ZONE 'UTC')::date;
BEGIN
    DELETE FROM rollup_daily WHERE meter_id = p_meter AND bucket >= day_from AND bucket <= day_to;
    INSERT INTO rollup_daily (meter_id, bucket, consumption, first_value, last_value, read_count, estimated)
    SELECT p_meter, ((s.ts + day_offset) AT TIME ZONE 'UTC')::date, sum(s.delta),
           (array_agg(s.value ORDER BY s.ts))[1], (array_agg(s.value ORDER BY s.ts DESC))[1],
           count(*), bool_or(s.estimated)
    FROM wm_consumption_spans(p_meter,
                              date_trunc('day', from_ts + day_offset) - day_offset,
                              date_trunc('day', to_ts + day_offset) - day_offset
                                  + interval '1 day') s
    GROUP BY 2;
END
$$;
