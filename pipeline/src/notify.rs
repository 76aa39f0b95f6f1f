//! Notifications (告警通知, EXT-301): a transactional outbox in PostgreSQL and delivery adapters.
//!
//! A notice is written into `notifications` by [`enqueue`] — on the caller's connection, so an
//! alarm or an arrears step and its notice commit together or not at all — keyed by a
//! deduplication key (the same alarm never notifies the same recipient twice). [`deliver_due`]
//! sends what is due through the adapter of its channel (webhook, SMTP, SMS gateway), records
//! every attempt in `notification_attempts`, retries failures with exponential backoff up to
//! [`MAX_ATTEMPTS`], and stamps `delivered_at` — the time the arrears-close safeguard reads.
//! Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several delivery loops never send one
//! notice twice.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

/// Notice kinds that are steps of the arrears procedure: delivered, they are recorded in
/// `arrears_notices` with their delivery time (DOMAIN.md §3 safeguards read it there).
pub const ARREARS_NOTICE_KINDS: &[&str] = &["payment_demand", "advance_notice"];

/// Attempts before a notice is left `failed`.
pub const MAX_ATTEMPTS: i32 = 8;
/// First retry delay; doubled per attempt, at most [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A notice names a channel no adapter is configured for.
    #[error("no adapter for channel {0:?} (configure webhook, smtp or sms)")]
    NoAdapter(String),
    /// The configuration file is wrong.
    #[error("notification config {path}: {message}")]
    Config {
        /// File.
        path: String,
        /// What is wrong, with the line where known.
        message: String,
    },
    /// The database refused a query.
    #[error("notification outbox query ({what}) failed: {source}")]
    Database {
        /// Which query.
        what: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> NotifyError {
    move |source| NotifyError::Database { what, source }
}

/// A notice to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Deduplication key: a second notice with the same key is not queued.
    pub dedup_key: String,
    /// What it is about (`alarm`, `payment_demand`, `advance_notice`, …).
    pub kind: String,
    /// `webhook`, `smtp` or `sms`.
    pub channel: String,
    /// Address on that channel (URL name, mail address, phone number).
    pub recipient: String,
    /// Subject line.
    pub subject: String,
    /// Text.
    pub body: String,
    /// The meter, when there is one.
    pub meter_id: Option<String>,
    /// Machine-readable content (the alarm, the arrears), sent to webhooks as is.
    pub payload: serde_json::Value,
}

/// Queues `notice` on the caller's connection (inside its transaction, if any); returns its id,
/// or `None` when a notice with the same key exists.
pub async fn enqueue(conn: &mut PgConnection, notice: &Notice) -> Result<Option<i64>, NotifyError> {
    sqlx::query_scalar(
        "INSERT INTO notifications (dedup_key, kind, channel, recipient, subject, body, meter_id, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (dedup_key) DO NOTHING
         RETURNING notification_id",
    )
    .bind(&notice.dedup_key)
    .bind(&notice.kind)
    .bind(&notice.channel)
    .bind(&notice.recipient)
    .bind(&notice.subject)
    .bind(&notice.body)
    .bind(&notice.meter_id)
    .bind(&notice.payload)
    .fetch_optional(conn)
    .await
    .map_err(db("queueing a notice"))
}

/// Sends one notice on one channel; `Ok` carries a receipt (status code, message id).
pub trait Adapter: Send + Sync {
    /// Delivers `notice`.
    fn send<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<String, String>>;
}

/// A 2xx answer is delivery (its status is the receipt); anything else a failure naming `what`.
fn receipt(status: reqwest::StatusCode, what: &str) -> Result<String, String> {
    if status.is_success() {
        Ok(format!("HTTP {}", status.as_u16()))
    } else {
        Err(format!("{what}: HTTP {}", status.as_u16()))
    }
}

/// POSTs the notice as JSON; `X-WM-Signature: sha256=<hex HMAC of the body>` lets the receiver
/// check it came from us. `recipient` names an endpoint of `endpoints`.
pub struct Webhook {
    /// Endpoint name → URL.
    pub endpoints: HashMap<String, String>,
    /// HMAC-SHA256 key of the signature header.
    pub secret: Vec<u8>,
    /// HTTP client (timeouts set).
    pub client: reqwest::Client,
}

impl Adapter for Webhook {
    fn send<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let url = self
                .endpoints
                .get(&notice.recipient)
                .ok_or_else(|| format!("no webhook endpoint named {:?}", notice.recipient))?;
            let body = serde_json::to_vec(notice).map_err(|e| e.to_string())?;
            let mut mac =
                Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|e| e.to_string())?;
            mac.update(&body);
            let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            let response = self
                .client
                .post(url)
                .header("content-type", "application/json")
                .header("x-wm-signature", signature)
                .header("idempotency-key", &notice.dedup_key)
                .body(body)
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            receipt(response.status(), &format!("POST {url}"))
        })
    }
}

/// An SMS gateway with an HTTP interface: POSTs `{"to", "text", "ref"}` JSON with a bearer
/// key; a 2xx answer is delivery to the gateway. Most Chinese SMS providers take this shape
/// behind their own signing; a provider-specific adapter implements [`Adapter`] the same way.
pub struct SmsGateway {
    /// The gateway's send URL.
    pub url: String,
    /// Bearer key.
    pub api_key: String,
    /// HTTP client (timeouts set).
    pub client: reqwest::Client,
}

impl Adapter for SmsGateway {
    fn send<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let response = self
                .client
                .post(&self.url)
                .bearer_auth(&self.api_key)
                .header("content-type", "application/json")
                .body(
                    serde_json::json!({
                        "to": notice.recipient,
                        "text": format!("{} {}", notice.subject, notice.body),
                        "ref": notice.dedup_key,
                    })
                    .to_string(),
                )
                .send()
                .await
                .map_err(|e| format!("SMS gateway: {e}"))?;
            receipt(response.status(), "SMS gateway")
        })
    }
}

/// Mail through an SMTP relay (`lettre`).
pub struct Smtp {
    /// Transport (relay host, port, TLS, credentials).
    pub transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    /// Sender address.
    pub from: lettre::message::Mailbox,
}

impl Adapter for Smtp {
    fn send<'a>(&'a self, notice: &'a Notice) -> BoxFuture<'a, Result<String, String>> {
        use lettre::AsyncTransport;
        Box::pin(async move {
            let to: lettre::message::Mailbox = notice.recipient.parse().map_err(|e| {
                format!(
                    "recipient {:?} is not a mail address: {e}",
                    notice.recipient
                )
            })?;
            let message = lettre::Message::builder()
                .from(self.from.clone())
                .to(to)
                .subject(&notice.subject)
                .header(lettre::message::header::ContentType::TEXT_PLAIN)
                .body(notice.body.clone())
                .map_err(|e| format!("building the mail: {e}"))?;
            let response = self
                .transport
                .send(message)
                .await
                .map_err(|e| format!("SMTP: {e}"))?;
            Ok(format!("SMTP {}", response.code()))
        })
    }
}

/// What one delivery pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryReport {
    /// Notices delivered.
    pub delivered: u64,
    /// Attempts that failed and will be retried.
    pub retrying: u64,
    /// Notices given up (`failed`).
    pub failed: u64,
}

/// The retry delay after `attempts` failed attempts.
pub fn backoff(attempts: i32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1u32 << attempts.clamp(1, 20).saturating_sub(1));
    doubled.min(MAX_BACKOFF)
}

type Claimed = (
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    serde_json::Value,
    i32,
);

/// Sends up to `limit` due notices through `adapters` (by channel name) and records the outcome.
pub async fn deliver_due(
    pool: &PgPool,
    adapters: &HashMap<String, Box<dyn Adapter>>,
    now: OffsetDateTime,
    limit: i64,
) -> Result<DeliveryReport, NotifyError> {
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    let due: Vec<Claimed> = sqlx::query_as(
        "SELECT notification_id, dedup_key, kind, channel, recipient, subject, body, meter_id,
                payload, attempts
         FROM notifications
         WHERE status = 'pending' AND next_attempt_at <= $1
         ORDER BY next_attempt_at, notification_id
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("claiming due notices"))?;
    let mut report = DeliveryReport::default();
    for (id, dedup_key, kind, channel, recipient, subject, body, meter_id, payload, attempts) in due
    {
        let notice = Notice {
            dedup_key,
            kind,
            channel,
            recipient,
            subject,
            body,
            meter_id,
            payload,
        };
        let outcome = match adapters.get(&notice.channel) {
            Some(adapter) => adapter.send(&notice).await,
            None => Err(NotifyError::NoAdapter(notice.channel.clone()).to_string()),
        };
        let attempt = attempts + 1;
        let (status, next, delivered_at, error) = match &outcome {
            Ok(_) => ("delivered", now, Some(OffsetDateTime::now_utc()), None),
            Err(e) if attempt >= MAX_ATTEMPTS => ("failed", now, None, Some(e.clone())),
            Err(e) => ("pending", now + backoff(attempt), None, Some(e.clone())),
        };
        match status {
            "delivered" => report.delivered += 1,
            "failed" => report.failed += 1,
            _ => report.retrying += 1,
        }
        sqlx::query(
            "UPDATE notifications SET status = $2, attempts = $3, next_attempt_at = $4,
                 delivered_at = $5, last_error = $6
             WHERE notification_id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(attempt)
        .bind(next)
        .bind(delivered_at)
        .bind(&error)
        .execute(&mut *tx)
        .await
        .map_err(db("recording a delivery"))?;
        sqlx::query(
            "INSERT INTO notification_attempts (notification_id, attempt, ok, detail)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(attempt)
        .bind(outcome.is_ok())
        .bind(match &outcome {
            Ok(receipt) => receipt.clone(),
            Err(e) => e.clone(),
        })
        .execute(&mut *tx)
        .await
        .map_err(db("auditing a delivery attempt"))?;
        if let (Some(at), Some(meter), true) = (
            delivered_at,
            &notice.meter_id,
            ARREARS_NOTICE_KINDS.contains(&notice.kind.as_str()),
        ) {
            // The arrears-close safeguard counts a demand or notice from its delivery time.
            sqlx::query(
                "INSERT INTO arrears_notices (meter_id, kind, sent_at, recorded_by)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(meter)
            .bind(&notice.kind)
            .bind(at)
            .bind(format!("notify:{}:{id}", notice.channel))
            .execute(&mut *tx)
            .await
            .map_err(db("recording a delivered arrears notice"))?;
        }
        if let Some(at) = delivered_at {
            tracing::info!(notification = id, kind = %notice.kind, channel = %notice.channel, %at, "notice delivered");
        }
    }
    tx.commit().await.map_err(db("committing deliveries"))?;
    Ok(report)
}

/// Which alarms notify whom.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmRoute {
    /// Alarm kinds (`burst`, `leak`, …); empty = every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Lowest severity sent (`low`, `medium`, `high`, `critical`).
    #[serde(default)]
    pub min_severity: Option<String>,
    /// Channel.
    pub channel: String,
    /// Recipient on it.
    pub recipient: String,
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 4,
        "high" => 3,
        "medium" => 2,
        "low" => 1,
        _ => 0,
    }
}

/// Queues a notice for every open alarm raised since `since` that a route matches (one per
/// alarm and recipient, whatever how often it runs); returns how many were queued.
pub async fn enqueue_alarm_notices(
    pool: &PgPool,
    routes: &[AlarmRoute],
    since: OffsetDateTime,
) -> Result<u64, NotifyError> {
    type AlarmRow = (
        i64,
        String,
        String,
        String,
        OffsetDateTime,
        serde_json::Value,
    );
    let alarms: Vec<AlarmRow> = sqlx::query_as(
        "SELECT alarm_id, meter_id, kind, severity, raised_at, detail FROM alarms
         WHERE cleared_at IS NULL AND raised_at >= $1 ORDER BY alarm_id",
    )
    .bind(since)
    .fetch_all(pool)
    .await
    .map_err(db("reading new alarms"))?;
    let mut conn = pool.acquire().await.map_err(db("a connection"))?;
    let mut queued = 0;
    for (id, meter, kind, severity, raised_at, detail) in alarms {
        for route in routes {
            let kind_ok = route.kinds.is_empty() || route.kinds.iter().any(|k| k == &kind);
            let severity_ok = route
                .min_severity
                .as_deref()
                .is_none_or(|min| severity_rank(&severity) >= severity_rank(min));
            if !(kind_ok && severity_ok) {
                continue;
            }
            let notice = Notice {
                dedup_key: format!("alarm:{id}:{}:{}", route.channel, route.recipient),
                kind: "alarm".into(),
                channel: route.channel.clone(),
                recipient: route.recipient.clone(),
                subject: format!("[{severity}] {kind} 告警 — meter {meter}"),
                body: format!("Alarm {kind} ({severity}) on meter {meter} since {raised_at}."),
                meter_id: Some(meter.clone()),
                payload: serde_json::json!({ "alarm_id": id, "meter_id": meter, "kind": kind,
                    "severity": severity, "raised_at": raised_at, "detail": detail }),
            };
            if enqueue(&mut conn, &notice).await?.is_some() {
                queued += 1;
            }
        }
    }
    Ok(queued)
}

/// The notification service's configuration (`pipeline notify run --config notify.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Webhook endpoints and their signing secret.
    pub webhook: Option<WebhookConfig>,
    /// The SMS gateway.
    pub sms: Option<SmsConfig>,
    /// The SMTP relay.
    pub smtp: Option<SmtpConfig>,
    /// Which alarms notify whom.
    #[serde(default)]
    pub alarm_route: Vec<AlarmRoute>,
}

/// `[webhook]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// HMAC-SHA256 key of `X-WM-Signature`.
    pub secret: String,
    /// Endpoint name → URL.
    pub endpoints: HashMap<String, String>,
}

/// `[sms]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// Send URL.
    pub url: String,
    /// Bearer key.
    pub api_key: String,
}

/// `[smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Relay host.
    pub host: String,
    /// Port (465 implicit TLS, 587 STARTTLS, 25 plain).
    pub port: u16,
    /// `tls`, `starttls` or `none` (a relay on localhost only).
    pub tls: String,
    /// Login, if the relay wants one.
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Sender address.
    pub from: String,
}

impl NotifyConfig {
    /// Parses the TOML text of `path`.
    pub fn from_toml(text: &str, path: &str) -> Result<NotifyConfig, NotifyError> {
        toml::from_str(text).map_err(|e| NotifyError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The adapters of the configured channels, by channel name.
    pub fn adapters(&self, path: &str) -> Result<HashMap<String, Box<dyn Adapter>>, NotifyError> {
        let bad = |message: String| NotifyError::Config {
            path: path.to_owned(),
            message,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        let mut out: HashMap<String, Box<dyn Adapter>> = HashMap::new();
        if let Some(w) = &self.webhook {
            out.insert(
                "webhook".into(),
                Box::new(Webhook {
                    endpoints: w.endpoints.clone(),
                    secret: w.secret.as_bytes().to_vec(),
                    client: client.clone(),
                }),
            );
        }
        if let Some(s) = &self.sms {
            out.insert(
                "sms".into(),
                Box::new(SmsGateway {
                    url: s.url.clone(),
                    api_key: s.api_key.clone(),
                    client,
                }),
            );
        }
        if let Some(m) = &self.smtp {
            type T = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;
            let builder = match m.tls.as_str() {
                "tls" => T::relay(&m.host).map_err(|e| bad(format!("[smtp] host: {e}")))?,
                "starttls" => {
                    T::starttls_relay(&m.host).map_err(|e| bad(format!("[smtp] host: {e}")))?
                }
                "none" => T::builder_dangerous(&m.host),
                other => {
                    return Err(bad(format!(
                        "[smtp] tls = {other:?}: expected tls, starttls or none"
                    )));
                }
            };
            let mut builder = builder.port(m.port);
            if let (Some(user), Some(password)) = (&m.user, &m.password) {
                builder =
                    builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                        user.clone(),
                        password.clone(),
                    ));
            }
            out.insert(
                "smtp".into(),
                Box::new(Smtp {
                    transport: builder.build(),
                    from: m
                        .from
                        .parse()
                        .map_err(|e| bad(format!("[smtp] from {:?}: {e}", m.from)))?,
                }),
            );
        }
        for r in &self.alarm_route {
            if !out.contains_key(&r.channel) {
                return Err(bad(format!(
                    "an alarm_route sends on channel {:?}, which is not configured",
                    r.channel
                )));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_a_route_to_an_unconfigured_channel() {
        let c = NotifyConfig::from_toml(
            "[sms]\nurl = \"http://127.0.0.1:9/send\"\napi_key = \"k\"\n\n[[alarm_route]]\nkinds = [\"burst\"]\nchannel = \"webhook\"\nrecipient = \"ops\"\n",
            "notify.toml",
        )
        .unwrap();
        let err = c.adapters("notify.toml").err().unwrap().to_string();
        assert_eq!(
            err,
            "notification config notify.toml: an alarm_route sends on channel \"webhook\", which is not configured"
        );
        let err = NotifyConfig::from_toml("[sms]\nurl = 1\n", "n.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("n.toml") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn backoff_doubles_from_thirty_seconds_up_to_an_hour() {
        let secs: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }
}
