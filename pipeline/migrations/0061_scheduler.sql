-- Scheduler (pipeline::scheduler): jobs as nodes first saw them, and the task execution log:
-- one row per (job, due time), claimed under an advisory lock so one node runs it.
CREATE TABLE IF NOT EXISTS scheduled_jobs (
    job         text PRIMARY KEY,
    schedule    text NOT NULL,
    first_seen  timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS job_runs (
    job          text NOT NULL REFERENCES scheduled_jobs (job),
    due_at       timestamptz NOT NULL,
    node         text NOT NULL,
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (job, due_at)
);
CREATE INDEX IF NOT EXISTS job_runs_unfinished_idx ON job_runs (job) WHERE status <> 'succeeded';
