-- Pipeline ingest, VEE and rollup support (owner: pipeline). Idempotent like 0001.

-- Earlier versions of a reading: an estimate superseded by an actual read at the same key, or
-- a read replaced by an edit. Readings are never overwritten without their old row landing here.
CREATE TABLE IF NOT EXISTS reading_history (
    history_id     bigserial PRIMARY KEY,
    meter_id       text NOT NULL,
    ts             timestamptz NOT NULL,
    quantity       text NOT NULL,
    tariff         smallint NOT NULL,
    subunit        smallint NOT NULL,
    value          numeric(20, 6) NOT NULL,
    unit           text NOT NULL,
    quality        text NOT NULL,
    quality_detail jsonb,
    flags          text[] NOT NULL,
    replaced_at    timestamptz NOT NULL DEFAULT now(),
    replaced_by    text NOT NULL,                -- 'actual_read' | 'edit:<user>'
    reason         text
);
CREATE INDEX IF NOT EXISTS reading_history_key_idx ON reading_history (meter_id, ts);

-- Messages and reads the pipeline refused without storing them as readings: unknown wire
-- versions, malformed batches, duplicates that conflict with a stored value. Kept for review
-- and reprocessing; the MQTT message is acknowledged so it does not block its partition.
CREATE TABLE IF NOT EXISTS ingest_rejects (
    reject_id      bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    kind           text NOT NULL,                -- unknown_version | malformed | duplicate_conflict
    topic          text,
    meter_id       text,
    ts             timestamptz,
    detail         jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS ingest_rejects_at_idx ON ingest_rejects (at);

-- Rebuilds the hourly and daily rollups of one meter over [from_ts, to_ts) from its billable
-- volume reads (validated, estimated not superseded, edited). Used after an edit or an
-- out-of-order read, where the incremental path cannot know the neighbours. Consumption of a
-- read is attributed to the bucket of its own timestamp (the span since the previous read ends
-- there). Day buckets use the fixed offset `day_offset` (Asia/Shanghai: +08:00, no DST).
CREATE OR REPLACE FUNCTION wm_recompute_rollups(
    p_meter text, from_ts timestamptz, to_ts timestamptz, day_offset interval)
RETURNS void LANGUAGE plpgsql SET TimeZone = 'UTC' AS $$
DECLARE
    cap numeric := coalesce(
        (SELECT register_capacity FROM meters WHERE meter_id = p_meter), 100000);
    day_from date := ((from_ts + day_offset) AT TIME ZONE 'UTC')::date;
    day_to date := ((to_ts + day_offset) AT TIME ZONE 'UTC')::date;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS wm_rollup_deltas (
        ts timestamptz, value numeric, delta numeric, estimated boolean) ON COMMIT DROP;
    DELETE FROM wm_rollup_deltas;
    INSERT INTO wm_rollup_deltas
    SELECT ts, value,
        CASE
            WHEN prev IS NULL THEN 0
            WHEN 'meter_replaced' = ANY (flags) THEN coalesce((
                SELECT (value - r.new_initial_value) + greatest(r.old_final_value - prev, 0)
                FROM meter_replacements r
                WHERE r.meter_id = p_meter AND r.replaced_at <= ts
                ORDER BY r.replaced_at DESC LIMIT 1), 0)
            WHEN 'rollover' = ANY (flags) THEN cap - prev + value
            ELSE value - prev
        END,
        quality = 'estimated'
    FROM (
        SELECT ts, value, flags, quality,
               lag(value) OVER (ORDER BY ts) AS prev
        FROM readings
        WHERE meter_id = p_meter AND quantity = 'volume' AND tariff = 0 AND subunit = 0
          AND storage = 0
          AND quality IN ('validated', 'estimated', 'edited')
          AND NOT ('superseded' = ANY (flags))
          -- one read before the span gives the first delta its base
          AND ts >= coalesce((
              SELECT max(ts) FROM readings
              WHERE meter_id = p_meter AND quantity = 'volume' AND tariff = 0 AND subunit = 0
                AND storage = 0 AND quality IN ('validated', 'estimated', 'edited')
                AND ts < date_trunc('day', from_ts + day_offset) - day_offset), '-infinity')
          AND ts < date_trunc('day', to_ts + day_offset) - day_offset + interval '1 day'
    ) s;
    DELETE FROM rollup_hourly WHERE meter_id = p_meter
        AND bucket >= date_trunc('day', from_ts + day_offset) - day_offset
        AND bucket < date_trunc('day', to_ts + day_offset) - day_offset + interval '1 day';
    DELETE FROM rollup_daily WHERE meter_id = p_meter AND bucket >= day_from AND bucket <= day_to;
    INSERT INTO rollup_hourly (meter_id, bucket, consumption, first_value, last_value, read_count, estimated)
    SELECT p_meter, date_trunc('hour', ts), sum(delta),
           (array_agg(value ORDER BY ts))[1], (array_agg(value ORDER BY ts DESC))[1],
           count(*), bool_or(estimated)
    FROM wm_rollup_deltas
    WHERE ts >= date_trunc('day', from_ts + day_offset) - day_offset
    GROUP BY 2;
    INSERT INTO rollup_daily (meter_id, bucket, consumption, first_value, last_value, read_count, estimated)
    SELECT p_meter, ((ts + day_offset) AT TIME ZONE 'UTC')::date, sum(delta),
           (array_agg(value ORDER BY ts))[1], (array_agg(value ORDER BY ts DESC))[1],
           count(*), bool_or(estimated)
    FROM wm_rollup_deltas
    WHERE ts >= date_trunc('day', from_ts + day_offset) - day_offset
    GROUP BY 2;
END
$$;
