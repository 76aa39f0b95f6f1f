-- HTTP API (owner: api crate, issue 22): signed-client registry, shared nonce store, push
-- idempotency, the six-field call log, bill-run jobs, and the hash chain over audit_log.
-- Idempotent like every migration here.

-- External clients that sign their requests (IF-METER-004): HMAC secret and data scope.
CREATE TABLE IF NOT EXISTS api_clients (
    client_id     text PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    secret        text NOT NULL CHECK (length(secret) >= 16),
    org           text,                      -- data scope; NULL = every organisation
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Nonces of accepted signed requests, shared by every API node: a nonce is refused while its
-- request's timestamp is still inside the accepted window (timestamp + skew = expires_at).
CREATE TABLE IF NOT EXISTS api_nonces (
    client_id     text NOT NULL,
    nonce         text NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (client_id, nonce)
);
CREATE INDEX IF NOT EXISTS api_nonces_expiry_idx ON api_nonces (expires_at);

-- Idempotency-Key of pushes: a retried request gets the first answer.
CREATE TABLE IF NOT EXISTS api_idempotency (
    client_id     text NOT NULL,
    key           text NOT NULL,
    request_hash  text NOT NULL,
    status        smallint,                  -- NULL while the first request is in progress
    body          jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, key)
);

-- The seed's six fields of every API call (§11): time, caller, request digest, result, error
-- code, handler (+ peer address).
CREATE TABLE IF NOT EXISTS api_call_log (
    call_id         bigserial PRIMARY KEY,
    at              timestamptz NOT NULL,
    caller          text NOT NULL,
    request_digest  text NOT NULL,
    result          smallint NOT NULL,
    error_code      text,
    handler         text NOT NULL,
    peer            text
);
CREATE INDEX IF NOT EXISTS api_call_log_at_idx ON api_call_log (at);

-- Asynchronous jobs (bill runs, IF-REV-005): progress and result, readable from any node.
CREATE TABLE IF NOT EXISTS api_jobs (
    job_id        bigserial PRIMARY KEY,
    kind          text NOT NULL,
    params        jsonb NOT NULL,
    state         text NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    total         integer,
    done          integer NOT NULL DEFAULT 0,
    result        jsonb,
    error         text,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Hash chain over audit_log. Every insert (whoever writes it: edits, registry, billing,
-- arrears, the API) is chained by a trigger, so no writer had to change: chain_seq is the
-- position in the chain (contiguous from 1), row_hash = sha256(prev_hash ‖ the row's fields).
-- The head row holds the last position and hash, so deleting the newest rows is detected too.
-- Appends serialise on the head row until commit (audited transactions are short: one meter
-- or one bill each).
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS chain_seq bigint;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS prev_hash bytea;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS row_hash bytea;
CREATE UNIQUE INDEX IF NOT EXISTS audit_log_chain_seq_uq ON audit_log (chain_seq);

CREATE TABLE IF NOT EXISTS audit_chain_head (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_seq      bigint NOT NULL,
    last_hash     bytea NOT NULL
);

CREATE OR REPLACE FUNCTION wm_audit_digest(prev bytea, audit_id bigint, at timestamptz,
        actor text, action text, entity text, entity_id text, detail jsonb)
    RETURNS bytea LANGUAGE sql STABLE AS $$
    SELECT sha256(prev || convert_to(concat_ws(chr(31), audit_id::text,
        to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        actor, action, entity, entity_id, detail::text), 'UTF8'))
$$;

CREATE OR REPLACE FUNCTION wm_audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head record;
BEGIN
    SELECT last_seq, last_hash INTO head FROM audit_chain_head WHERE id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO audit_chain_head (id, last_seq, last_hash) VALUES (true, 0, '\x'::bytea)
            ON CONFLICT (id) DO NOTHING;
        SELECT last_seq, last_hash INTO head FROM audit_chain_head WHERE id FOR UPDATE;
    END IF;
    NEW.chain_seq := head.last_seq + 1;
    NEW.prev_hash := head.last_hash;
    NEW.row_hash := wm_audit_digest(NEW.prev_hash, NEW.audit_id, NEW.at, NEW.actor, NEW.action,
        NEW.entity, NEW.entity_id, NEW.detail);
    UPDATE audit_chain_head SET last_seq = NEW.chain_seq, last_hash = NEW.row_hash WHERE id;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION wm_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP;
END
$$;

-- Rows written before this migration join the chain in id order, once.
DO $$
DECLARE
    r record;
    prev bytea;
    seq bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM audit_chain_head) THEN
        RETURN;
    END IF;
    prev := '\x'::bytea;
    seq := 0;
    FOR r IN SELECT * FROM audit_log ORDER BY audit_id LOOP
        seq := seq + 1;
        UPDATE audit_log SET chain_seq = seq, prev_hash = prev,
            row_hash = wm_audit_digest(prev, r.audit_id, r.at, r.actor, r.action, r.entity,
                r.entity_id, r.detail)
            WHERE audit_id = r.audit_id
            RETURNING row_hash INTO prev;
    END LOOP;
    INSERT INTO audit_chain_head (id, last_seq, last_hash) VALUES (true, seq, prev);
END
$$;

DROP TRIGGER IF EXISTS audit_log_chain ON audit_log;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION wm_audit_chain();
DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION wm_audit_append_only();
DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION wm_audit_append_only();
