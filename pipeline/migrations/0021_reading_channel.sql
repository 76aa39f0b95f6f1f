-- Where on its source a reading's frame came from (model::Provenance::channel; owner:
-- pipeline): the MQTT topic, the CoAP/UDP/HTTP peer `ip:port`, `<tty> primary <n>` for serial
-- M-Bus, `<host:port> unit <n>` for Modbus. NULL for estimates, manual reads and readings from
-- gateways that predate it. Idempotent like 0001; on the partitioned (or hypertable) readings
-- the column reaches every partition. reading_history keeps no provenance, so it has none.
ALTER TABLE readings ADD COLUMN IF NOT EXISTS channel text;
