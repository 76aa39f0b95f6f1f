-- Billing runs, adjustments and arrears (owner: pipeline billing, computed by billing-core).
-- Extends the billing tables of 0001 additively; idempotent like 0001.

-- Township customers pay the township prices of their tariff class (e.g. sewage).
ALTER TABLE meters ADD COLUMN IF NOT EXISTS township boolean NOT NULL DEFAULT false;

-- One row per execution of a bill run; reruns of a cycle add rows, never replace them.
CREATE TABLE IF NOT EXISTS bill_runs (
    run_id       bigserial PRIMARY KEY,
    cycle_id     bigint NOT NULL REFERENCES billing_cycles (cycle_id),
    actor        text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    created      integer NOT NULL DEFAULT 0,   -- new original bills
    adjusted     integer NOT NULL DEFAULT 0,   -- adjustment bills
    unchanged    integer NOT NULL DEFAULT 0,   -- meters whose bill already stands
    skipped      integer NOT NULL DEFAULT 0,   -- meters not billed (reason in detail)
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS bill_runs_cycle_idx ON bill_runs (cycle_id);

-- kind: 'original' (revision 0) or 'adjustment' (revision > 0, total = the difference).
-- effective_total: what the customer owes for the cycle after this revision.
-- inputs_hash: SHA-256 of everything the bill stands on; an unchanged hash means a rerun
-- creates nothing.
ALTER TABLE bills ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'original';
ALTER TABLE bills ADD COLUMN IF NOT EXISTS effective_total numeric(14, 2);
ALTER TABLE bills ADD COLUMN IF NOT EXISTS inputs_hash text;
ALTER TABLE bills ADD COLUMN IF NOT EXISTS run_id bigint REFERENCES bill_runs (run_id);
CREATE INDEX IF NOT EXISTS bills_meter_idx ON bills (meter_id, cycle_id, revision);

-- kind: 'charge' or 'reversal' (an earlier charge negated by an adjustment). The segment of
-- the cycle and the tariff version of each line, for bills prorated across a tariff change.
ALTER TABLE bill_lines ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'charge';
ALTER TABLE bill_lines ADD COLUMN IF NOT EXISTS period_from date;
ALTER TABLE bill_lines ADD COLUMN IF NOT EXISTS period_to date;
ALTER TABLE bill_lines ADD COLUMN IF NOT EXISTS tariff_version text;

-- Arrears reported by the revenue system (营收): input of the valve-control policy. A row per
-- meter; a payment that clears the debt deletes the row (the audit log keeps the history).
CREATE TABLE IF NOT EXISTS arrears (
    meter_id        text PRIMARY KEY REFERENCES meters (meter_id),
    account_id      text NOT NULL,
    amount_overdue  numeric(14, 2) NOT NULL CHECK (amount_overdue > 0),
    overdue_since   date NOT NULL,
    reported_at     timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS arrears_account_idx ON arrears (account_id);
