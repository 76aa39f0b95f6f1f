-- HTTP API (owner: api crate, issue 22): the second approver (four-eyes) for high-risk
-- actions, and the indexes the retention job (`api retention`, scheduler `api-retention`)
-- deletes by. Additive and idempotent like every migration here.

-- A high-risk request held until a different user with an approver role approves it. The
-- request is stored as it came (method, target, body) with the requester's identity and data
-- scope; approving executes it once, as the requester, and records the answer.
CREATE TABLE IF NOT EXISTS api_approvals (
    approval_id     bigserial PRIMARY KEY,
    action          text NOT NULL,             -- api::auth::Action spelling (valve_close ...)
    method          text NOT NULL,
    target          text NOT NULL,             -- path and query of the held request
    body            bytea NOT NULL,
    content_type    text,
    requested_by    text NOT NULL,             -- token subject
    requester_roles text[] NOT NULL,
    requester_org   text,                      -- NULL = every organisation
    requester_areas text[] NOT NULL DEFAULT '{}',
    reason          text,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'approved', 'rejected', 'expired', 'executed', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    decided_by      text,
    decided_at      timestamptz,
    decision_note   text,
    result_status   smallint,                  -- HTTP status of the executed request
    result_body     jsonb,
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX IF NOT EXISTS api_approvals_pending_idx ON api_approvals (state, created_at);

-- Retention deletes idempotency rows by age.
CREATE INDEX IF NOT EXISTS api_idempotency_created_idx ON api_idempotency (created_at);
