-- Rollups and meter state written behind the ingest transaction (owner: pipeline; see
-- pipeline/src/journal.rs). Idempotent like 0001.

-- One compact binary record per partition per ingest transaction: the batch's consumption
-- spans and new meter states, committed with its readings. The owning worker folds the spans
-- into rollup_hourly and rollup_daily every few seconds (setting `folded`), and at a
-- checkpoint writes the states to meter_state and deletes the records, each in one
-- transaction; a worker starting on a partition takes over what a stopped or crashed one left.
CREATE TABLE IF NOT EXISTS ingest_journal (
    journal_id  bigserial PRIMARY KEY,
    partition   integer NOT NULL,
    folded      boolean NOT NULL DEFAULT false,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- lz4 TOAST compression where the server has it: records repeat meter-id prefixes and
-- similar values, and every byte saved is a byte less of WAL and heap to write. Servers built
-- without lz4 store them uncompressed (pglz would cost more CPU than the I/O it saves).
DO $$
BEGIN
    ALTER TABLE ingest_journal ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    ALTER TABLE ingest_journal ALTER COLUMN payload SET STORAGE EXTERNAL;
END
$$;
CREATE INDEX IF NOT EXISTS ingest_journal_partition_idx ON ingest_journal (partition);

-- A rollup recomputed from readings (edit, out-of-order read) already counts every read
-- committed so far, including those whose spans still wait in the journal: a flush skips the
-- spans of this meter and these local days in records up to journal_upto.
CREATE TABLE IF NOT EXISTS rollup_resets (
    reset_id      bigserial PRIMARY KEY,
    meter_id      text NOT NULL,
    from_ts       timestamptz NOT NULL,
    to_ts         timestamptz NOT NULL,
    journal_upto  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
