-- Notifications (pipeline::notify, EXT-301): a transactional outbox and its delivery log.
CREATE TABLE IF NOT EXISTS notifications (
    notification_id  bigserial PRIMARY KEY,
    dedup_key        text NOT NULL UNIQUE,
    kind             text NOT NULL,
    channel          text NOT NULL,
    recipient        text NOT NULL,
    subject          text NOT NULL,
    body             text NOT NULL,
    meter_id         text,
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_error       text
);
CREATE INDEX IF NOT EXISTS notifications_due_idx ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS notifications_meter_idx ON notifications (meter_id, kind, delivered_at);
CREATE TABLE IF NOT EXISTS notification_attempts (
    notification_id  bigint NOT NULL REFERENCES notifications (notification_id),
    attempt          integer NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    ok               boolean NOT NULL,
    detail           text NOT NULL,
    PRIMARY KEY (notification_id, attempt)
);
