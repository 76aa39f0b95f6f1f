//! The call log of seed §11: for every `/api/v1` call its time, caller, request digest,
//! response result, error code and handler (plus the peer address), written to
//! `api_call_log` by a background task in batches so logging never holds a request up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, Uri};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// What a request's handler tells the call log (filled in by the authentication extractors
/// and by handlers that read a body).
#[derive(Debug, Clone)]
pub struct CallCtx(Arc<Mutex<CallFields>>);

#[derive(Debug)]
struct CallFields {
    at: OffsetDateTime,
    caller: String,
    digest: String,
}

impl CallCtx {
    /// A context for a request; the digest covers method and target until a body is known.
    pub fn new(method: &Method, uri: &Uri) -> Self {
        Self(Arc::new(Mutex::new(CallFields {
            at: OffsetDateTime::now_utc(),
            caller: "anonymous".to_owned(),
            digest: digest(method, uri, None),
        })))
    }

    /// Records who called.
    pub fn set_caller(&self, caller: &str) {
        if let Ok(mut f) = self.0.lock() {
            caller.clone_into(&mut f.caller);
        }
    }

    /// Records the request digest over method, target and body.
    pub fn set_body(&self, method: &Method, uri: &Uri, body: &[u8]) {
        if let Ok(mut f) = self.0.lock() {
            f.digest = digest(method, uri, Some(body));
        }
    }
}

/// `hex(sha256(METHOD ‖ " " ‖ target ‖ "\n" ‖ body))`.
fn digest(method: &Method, uri: &Uri, body: Option<&[u8]>) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(uri.to_string().as_bytes());
    h.update(b"\n");
    if let Some(b) = body {
        h.update(b);
    }
    hex::encode(h.finalize())
}

struct Entry {
    at: OffsetDateTime,
    caller: String,
    digest: String,
    result: i16,
    error_code: Option<String>,
    handler: String,
    peer: Option<String>,
}

/// Sender side of the call log.
#[derive(Clone, Debug)]
pub struct CallLog {
    tx: mpsc::Sender<EntryBox>,
}

struct EntryBox(Entry);

impl std::fmt::Debug for EntryBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("call")
    }
}

impl CallLog {
    /// Starts the writer task on `pool`.
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(20_000);
        tokio::spawn(write_loop(pool, rx));
        Self { tx }
    }

    /// Queues one call. When the queue is full (database down) the entry is dropped and
    /// logged as a warning rather than slowing requests down.
    pub fn record(
        &self,
        ctx: &CallCtx,
        status: u16,
        code: Option<&'static str>,
        handler: &str,
        peer: Option<String>,
    ) {
        let Ok(f) = ctx.0.lock() else { return };
        let entry = Entry {
            at: f.at,
            caller: f.caller.clone(),
            digest: f.digest.clone(),
            result: i16::try_from(status).unwrap_or(i16::MAX),
            error_code: code.map(str::to_owned),
            handler: handler.to_owned(),
            peer,
        };
        drop(f);
        if self.tx.try_send(EntryBox(entry)).is_err() {
            tracing::warn!(handler, "call log queue full; entry dropped");
        }
    }
}

async fn write_loop(pool: PgPool, mut rx: mpsc::Receiver<EntryBox>) {
    let mut buf: Vec<Entry> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { return };
        buf.push(first.0);
        while buf.len() < 1000 {
            match rx.try_recv() {
                Ok(e) => buf.push(e.0),
                Err(_) => break,
            }
        }
        if let Err(e) = flush(&pool, &buf).await {
            tracing::warn!(error = %e, rows = buf.len(), "writing the call log failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        buf.clear();
    }
}

async fn flush(pool: &PgPool, rows: &[Entry]) -> Result<(), sqlx::Error> {
    let at: Vec<OffsetDateTime> = rows.iter().map(|r| r.at).collect();
    let caller: Vec<&str> = rows.iter().map(|r| r.caller.as_str()).collect();
    let digest: Vec<&str> = rows.iter().map(|r| r.digest.as_str()).collect();
    let result: Vec<i16> = rows.iter().map(|r| r.result).collect();
    let code: Vec<Option<&str>> = rows.iter().map(|r| r.error_code.as_deref()).collect();
    let handler: Vec<&str> = rows.iter().map(|r| r.handler.as_str()).collect();
    let peer: Vec<Option<&str>> = rows.iter().map(|r| r.peer.as_deref()).collect();
    sqlx::query(
        "INSERT INTO api_call_log (at, caller, request_digest, result, error_code, handler, peer)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int2[], $5::text[],
                              $6::text[], $7::text[])",
    )
    .bind(at)
    .bind(caller)
    .bind(digest)
    .bind(result)
    .bind(code)
    .bind(handler)
    .bind(peer)
    .execute(pool)
    .await?;
    Ok(())
}
