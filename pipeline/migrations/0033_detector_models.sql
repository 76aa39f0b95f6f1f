-- Detectors (owner: pipeline detect, docs/detectors.md): a change to a meter model's status-bit
-- map reaches running workers. The map is per model, not per meter, so the notification is `*`
-- (reload every meter: workers reload profiles and maps); models change rarely. Idempotent.
CREATE OR REPLACE FUNCTION wm_model_bits_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wm_registry', '*');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS model_status_bits_registry ON meter_model_status_bits;
CREATE TRIGGER model_status_bits_registry
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meter_model_status_bits
    FOR EACH STATEMENT EXECUTE FUNCTION wm_model_bits_notify();
