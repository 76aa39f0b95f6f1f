-- Read completeness ledger (pipeline::ledger): how often a meter is scheduled to read. Hourly
-- by default (NB-IoT and M-Bus meters of this utility log hourly reads, sent daily or polled).
ALTER TABLE meters ADD COLUMN IF NOT EXISTS read_interval_s integer NOT NULL DEFAULT 3600;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'meters_read_interval_check') THEN
        ALTER TABLE meters ADD CONSTRAINT meters_read_interval_check
            CHECK (read_interval_s BETWEEN 60 AND 2678400);
    END IF;
END
$$;
-- The ledger and the source ledger scan reads by arrival time.
CREATE INDEX IF NOT EXISTS readings_received_brin ON readings USING brin (received_at);
