//! Notifications against the real PostgreSQL and real local servers: alarm notices queued once
//! per alarm and recipient, delivered through a webhook, an SMS gateway and an SMTP relay (each a
//! local server speaking the protocol), a failed webhook retried after its backoff, every attempt
//! recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use pipeline::notify::{self, Adapter, AlarmRoute, SmsGateway, Smtp, Webhook};
use sha2::Sha256;
use testkit::TestDatabase;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A received HTTP request: headers (lower-case names) and body.
type Received = Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>>;

/// An HTTP/1.1 server answering each request with the next status of `statuses` (then 200).
async fn http_server(statuses: Vec<u16>) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received: Received = Arc::default();
    let log = Arc::clone(&received);
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            loop {
                let mut headers = HashMap::new();
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                loop {
                    line.clear();
                    reader.read_line(&mut line).await.unwrap();
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).await.unwrap();
                log.lock().unwrap().push((headers, body));
                let status = statuses.next().unwrap_or(200);
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        }
    });
    (url, received)
}

/// A minimal SMTP relay: accepts every mail and keeps its DATA.
async fn smtp_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&mails);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut s = BufReader::new(stream);
                s.get_mut()
                    .write_all(b"220 relay.test ESMTP\r\n")
                    .await
                    .unwrap();
                let mut line = String::new();
                loop {
                    line.clear();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-relay.test\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("DATA") {
                        s.get_mut().write_all(b"354 go ahead\r\n").await.unwrap();
                        let mut data = String::new();
                        loop {
                            line.clear();
                            s.read_line(&mut line).await.unwrap();
                            if line == ".\r\n" {
                                break;
                            }
                            data.push_str(&line);
                        }
                        log.lock().unwrap().push(data);
                        b"250 2.0.0 queued as 42\r\n"
                    } else if cmd.starts_with("QUIT") {
                        s.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    s.get_mut().write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test]
async fn alarm_notices_are_queued_once_delivered_on_every_channel_and_retried() {
    let db = TestDatabase::create().await;
    sqlx::query(
        "INSERT INTO alarms (meter_id, kind, severity, raised_at) VALUES
         ('cjt188:00000000000901', 'burst', 'critical', now()),
         ('cjt188:00000000000902', 'leak', 'medium', now()),
         ('cjt188:00000000000903', 'low_battery', 'low', now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let routes = vec![
        AlarmRoute {
            kinds: vec!["burst".into()],
            min_severity: None,
            channel: "webhook".into(),
            recipient: "ops".into(),
        },
        AlarmRoute {
            kinds: vec![],
            min_severity: Some("medium".into()),
            channel: "sms".into(),
            recipient: "+8613800000000".into(),
        },
        AlarmRoute {
            kinds: vec!["leak".into()],
            min_severity: None,
            channel: "smtp".into(),
            recipient: "meter-dept@example.cn".into(),
        },
    ];
    let since = OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert_eq!(
        notify::enqueue_alarm_notices(&db.pool, &routes, since)
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        notify::enqueue_alarm_notices(&db.pool, &routes, since)
            .await
            .unwrap(),
        0,
        "deduplicated"
    );

    let (hook_url, hooks) = http_server(vec![503]).await;
    let (sms_url, sms) = http_server(vec![]).await;
    let (smtp_port, mails) = smtp_server().await;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let secret = b"hook-secret".to_vec();
    let mut adapters: HashMap<String, Box<dyn Adapter>> = HashMap::new();
    adapters.insert(
        "webhook".into(),
        Box::new(Webhook {
            endpoints: HashMap::from([("ops".to_owned(), hook_url)]),
            secret: secret.clone(),
            client: client.clone(),
        }),
    );
    adapters.insert(
        "sms".into(),
        Box::new(SmsGateway {
            url: sms_url,
            api_key: "k-1".into(),
            client,
        }),
    );
    adapters.insert(
        "smtp".into(),
        Box::new(Smtp {
            transport: lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(
                "127.0.0.1",
            )
            .port(smtp_port)
            .build(),
            from: "wm-alarms@example.cn".parse().unwrap(),
        }),
    );

    let now = OffsetDateTime::now_utc();
    let first = notify::deliver_due(&db.pool, &adapters, now, 100)
        .await
        .unwrap();
    assert_eq!((first.delivered, first.retrying, first.failed), (3, 1, 0));
    // The webhook's retry is not due before its backoff.
    let early = notify::deliver_due(&db.pool, &adapters, now + time::Duration::seconds(10), 100)
        .await
        .unwrap();
    assert_eq!(early, notify::DeliveryReport::default());
    let later = notify::deliver_due(&db.pool, &adapters, now + time::Duration::seconds(31), 100)
        .await
        .unwrap();
    assert_eq!((later.delivered, later.retrying), (1, 0));

    let hooks = hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 2, "one refused, one accepted");
    let (headers, body) = &hooks[1];
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
    mac.update(body);
    assert_eq!(
        headers["x-wm-signature"],
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    let sent: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(sent["payload"]["kind"], "burst");
    assert_eq!(sent["payload"]["meter_id"], "cjt188:00000000000901");

    let sms = sms.lock().unwrap().clone();
    assert_eq!(
        sms.len(),
        2,
        "burst and leak are at least medium; low_battery is not"
    );
    assert!(sms.iter().all(|(h, _)| h["authorization"] == "Bearer k-1"));
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains("To: meter-dept@example.cn"),
        "{}",
        mails[0]
    );

    let attempts: Vec<(String, i32, bool)> = sqlx::query_as(
        "SELECT n.channel, a.attempt, a.ok FROM notification_attempts a JOIN notifications n USING (notification_id)
         WHERE n.channel = 'webhook' ORDER BY a.attempt",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts,
        [("webhook".into(), 1, false), ("webhook".into(), 2, true)]
    );
    // An advance notice of the arrears procedure: delivered, it is on record for the safeguard.
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol) VALUES ('cjt188:00000000000904', 'cjt188')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let notice = notify::Notice {
        dedup_key: "arrears:904:advance".into(),
        kind: "advance_notice".into(),
        channel: "sms".into(),
        recipient: "+8613900000000".into(),
        subject: "停水预告".into(),
        body: "Arrears of 88.50 yuan; the supply will be closed after 3 working days.".into(),
        meter_id: Some("cjt188:00000000000904".into()),
        payload: serde_json::json!({ "amount": "88.50" }),
    };
    assert!(notify::enqueue(&mut conn, &notice).await.unwrap().is_some());
    assert!(
        notify::enqueue(&mut conn, &notice).await.unwrap().is_none(),
        "same key"
    );
    drop(conn);
    let report = notify::deliver_due(&db.pool, &adapters, now + time::Duration::seconds(40), 100)
        .await
        .unwrap();
    assert_eq!(report.delivered, 1);
    let (kind, on_record): (String, bool) = sqlx::query_as(
        "SELECT a.kind, a.sent_at = n.delivered_at FROM arrears_notices a
         JOIN notifications n ON n.meter_id = a.meter_id AND n.kind = a.kind
         WHERE a.meter_id = 'cjt188:00000000000904'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((kind.as_str(), on_record), ("advance_notice", true));

    let undelivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE delivered_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(undelivered, 0);
    db.drop_database().await;
}
