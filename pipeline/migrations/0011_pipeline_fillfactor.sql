-- Leave room in the pages of the tables the ingest path updates in place, so PostgreSQL can do
-- HOT updates (no new index entries) for meter_state and rollup rows touched every batch.
ALTER TABLE meter_state SET (fillfactor = 70);
ALTER TABLE rollup_hourly SET (fillfactor = 80);
ALTER TABLE rollup_daily SET (fillfactor = 80);
