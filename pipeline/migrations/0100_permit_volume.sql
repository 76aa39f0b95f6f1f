-- Hydrant permit volume limits, enforced (owner: pipeline control, docs/control.md). Idempotent.
-- The hydrant reports a cumulative outlet volume register (`volume` readings, m³); the volume
-- drawn under a permit is the register now minus the register at its unlock. When it reaches
-- the limit the service locks the hydrant (rule `permit_volume_exhausted`).
ALTER TABLE hydrant_permits ADD COLUMN IF NOT EXISTS volume_start_m3 numeric(14, 3);
ALTER TABLE hydrant_permits ADD COLUMN IF NOT EXISTS volume_drawn_m3 numeric(14, 3);
ALTER TABLE hydrant_permits ADD COLUMN IF NOT EXISTS exhausted_at timestamptz;
