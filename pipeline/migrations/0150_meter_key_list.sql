-- Meter keys of an ingest batch as one array in the order asked (issue 18, branch h18; owner:
-- pipeline store, docs/storage.md "Write path").
--
-- `wm_meter_keys` (0080) probes `meter_keys` twice per id (NOT EXISTS before its insert, then
-- `= ANY`) and sends every (meter_id text, meter_key) pair back, which the worker decoded
-- into one string per reading's meter. Here the usual batch, every meter already known, costs
-- one probe per id and comes back as a single int4[] aligned with the ids; only a batch with new
-- meters inserts them (sorted, so keys follow id order as before; ON CONFLICT waits for a
-- concurrent inserter of the same id, so the second look finds its committed key) and looks
-- again.
CREATE OR REPLACE FUNCTION wm_meter_key_list(ids text[])
RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    keys integer[];
BEGIN
    SELECT array_agg(m.meter_key ORDER BY u.n) INTO keys
    FROM unnest(ids) WITH ORDINALITY AS u(id, n)
    LEFT JOIN meter_keys m ON m.meter_id = u.id;
    IF array_position(keys, NULL) IS NOT NULL THEN
        INSERT INTO meter_keys (meter_id)
        SELECT DISTINCT u.id FROM unnest(ids) AS u(id)
        WHERE NOT EXISTS (SELECT 1 FROM meter_keys m WHERE m.meter_id = u.id)
        ORDER BY 1
        ON CONFLICT DO NOTHING;
        SELECT array_agg(m.meter_key ORDER BY u.n) INTO keys
        FROM unnest(ids) WITH ORDINALITY AS u(id, n)
        LEFT JOIN meter_keys m ON m.meter_id = u.id;
    END IF;
    RETURN keys;
END
$$;
