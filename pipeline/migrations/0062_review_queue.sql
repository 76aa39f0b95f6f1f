-- Review queue (pipeline::review, REV-002): what needs a person, keyed by its source so that
-- collecting twice adds nothing; owner, age and the audited resolution.
CREATE TABLE IF NOT EXISTS review_items (
    item_id      bigserial PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('out_of_order_read', 'rejected_read',
                     'ingest_reject', 'bill_held', 'field_visit')),
    source_key   text NOT NULL,
    meter_id     text,
    subject      jsonb NOT NULL DEFAULT '{}'::jsonb,
    opened_at    timestamptz NOT NULL DEFAULT now(),
    owner        text,
    assigned_at  timestamptz,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution   text CHECK (resolution IN ('accept', 'edit', 'estimate', 'reject', 'dismiss', 'reprocess')),
    resolved_by  text,
    resolved_at  timestamptz,
    note         text,
    new_value    text,
    UNIQUE (kind, source_key)
);
CREATE INDEX IF NOT EXISTS review_items_open_idx ON review_items (opened_at) WHERE status = 'open';
