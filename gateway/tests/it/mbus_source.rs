//! Serial M-Bus master against simulated slaves on the other end of a socat pty pair.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use decoders::RecordValue;
use edge_config::mbus::{MbusMeterConfig, MbusSerialSourceConfig};
use gateway::sources::mbus::{Address, Master, MbusSource};
use gateway::sources::{Source, SourceEnv};
use gateway::{CommandOutcome, CommandRequest, IngestSink, SourceContext};
use model::{CommandAction, CommandId, DeviceCommand, GatewayId, MeterId, Quantity};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A simulated slave.
#[derive(Debug, Clone, Default)]
struct Slave {
    primary: u8,
    id: String,
    /// Litres per telegram; all but the last end with DIF 1F.
    telegrams: Vec<u32>,
    next: usize,
    last_fcb: Option<bool>,
    last_reply: Vec<u8>,
    selected: bool,
    /// Swallow this many REQ_UD2 (to force retries).
    drop_requests: u32,
    /// Answer REQ_UD2 with a bad checksum.
    corrupt: bool,
    /// FCBs of every REQ_UD2 seen.
    fcbs: Vec<bool>,
    /// (CI, data) of every SND_UD command seen.
    commands: Vec<(u8, Vec<u8>)>,
}

type Slaves = Arc<Mutex<Vec<Slave>>>;

fn long(c: u8, a: u8, ci: u8, data: &[u8]) -> Vec<u8> {
    let l = (data.len() + 3) as u8;
    let mut f = vec![0x68, l, l, 0x68, c, a, ci];
    f.extend_from_slice(data);
    let cs = f[4..].iter().fold(0u8, |s, b| s.wrapping_add(*b));
    f.extend([cs, 0x16]);
    f
}

fn bcd4(v: u32) -> [u8; 4] {
    let s = format!("{v:08}");
    let b = s.as_bytes();
    let pair = |i: usize| ((b[i] - b'0') << 4) | (b[i + 1] - b'0');
    [pair(6), pair(4), pair(2), pair(0)]
}

fn rsp_ud(slave: &Slave, index: usize) -> Vec<u8> {
    let id: u32 = slave.id.parse().unwrap();
    let id = bcd4(id);
    // KAM = 0x2C2D, version 1, medium 07 (water), access number, status, signature.
    let mut data = vec![
        id[0],
        id[1],
        id[2],
        id[3],
        0x2D,
        0x2C,
        0x01,
        0x07,
        index as u8,
        0,
        0,
        0,
    ];
    // Telegram i carries storage number i: DIF 0C (storage 0) or 4C (storage 1), VIF 13 (L).
    data.push(if index == 0 { 0x0C } else { 0x4C });
    data.push(0x13);
    data.extend(bcd4(slave.telegrams[index]));
    if index + 1 < slave.telegrams.len() {
        data.push(0x1F);
    }
    long(0x08, slave.primary, 0x72, &data)
}

fn mask_matches(mask: &[u8; 4], id: &str) -> bool {
    let digits: Vec<u8> = id.bytes().map(|b| b - b'0').collect();
    // mask bytes are LE BCD: byte 3 holds digits 0,1.
    (0..8).all(|i| {
        let byte = mask[3 - i / 2];
        let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
        nibble == 0x0F || nibble == digits[i]
    })
}

/// Answers frames on `port` until the test ends.
async fn run_slaves(port: PathBuf, slaves: Slaves) {
    let mut s =
        tokio_serial::SerialStream::open(&tokio_serial::new(port.to_string_lossy(), 2400)).unwrap();
    loop {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_err() {
            return;
        }
        let (c, a, ci, data) = match b[0] {
            0x10 => {
                let mut r = [0u8; 4];
                s.read_exact(&mut r).await.unwrap();
                (r[0], r[1], None, vec![])
            }
            0x68 => {
                let mut h = [0u8; 3];
                s.read_exact(&mut h).await.unwrap();
                let mut body = vec![0u8; h[0] as usize + 2];
                s.read_exact(&mut body).await.unwrap();
                (
                    body[0],
                    body[1],
                    Some(body[2]),
                    body[3..body.len() - 2].to_vec(),
                )
            }
            _ => continue,
        };
        let reply: Vec<u8> = {
            let mut all = slaves.lock().unwrap();
            let targets: Vec<usize> = (0..all.len())
                .filter(|&i| {
                    if a == 0xFD {
                        all[i].selected
                    } else {
                        all[i].primary == a
                    }
                })
                .collect();
            match (c, ci) {
                (0x40, None) => {
                    for &i in &targets {
                        all[i].next = 0;
                        all[i].last_fcb = None;
                    }
                    if a == 0xFD {
                        all.iter_mut().for_each(|s| s.selected = false);
                    }
                    if targets.len() == 1 {
                        vec![0xE5]
                    } else {
                        vec![]
                    }
                }
                (0x5B | 0x7B, None) if targets.len() == 1 => {
                    let sl = &mut all[targets[0]];
                    let fcb = c & 0x20 != 0;
                    sl.fcbs.push(fcb);
                    if sl.drop_requests > 0 {
                        sl.drop_requests -= 1;
                        vec![]
                    } else if sl.last_fcb == Some(fcb) {
                        sl.last_reply.clone()
                    } else {
                        if sl.last_fcb.is_some() {
                            sl.next = (sl.next + 1) % sl.telegrams.len();
                        }
                        sl.last_fcb = Some(fcb);
                        sl.last_reply = rsp_ud(sl, sl.next);
                        if sl.corrupt {
                            let cs = sl.last_reply.len() - 2;
                            sl.last_reply[cs] ^= 0x01;
                        }
                        sl.last_reply.clone()
                    }
                }
                (0x53 | 0x73, Some(0x52)) if a == 0xFD => {
                    let mask = [data[0], data[1], data[2], data[3]];
                    let mut n = 0;
                    for sl in all.iter_mut() {
                        sl.selected = mask_matches(&mask, &sl.id);
                        n += usize::from(sl.selected);
                    }
                    match n {
                        0 => vec![],
                        1 => vec![0xE5],
                        // Several E5 at once on a real bus arrive as a garbled character.
                        _ => vec![0xE5 & 0x7F, 0xE5],
                    }
                }
                (0x53 | 0x73, Some(ci)) if targets.len() == 1 => {
                    all[targets[0]].commands.push((ci, data));
                    vec![0xE5]
                }
                _ => vec![],
            }
        };
        if !reply.is_empty() {
            s.write_all(&reply).await.unwrap();
        }
    }
}

/// The socat pair with the simulated slaves answering on end `b`; the master opens `a`.
async fn pty_pair(slaves: Slaves) -> testkit::pty::PtyPair {
    let pty = testkit::pty::pty_pair().await;
    tokio::spawn(run_slaves(pty.b.clone(), slaves));
    pty
}

fn slave(primary: u8, id: &str, telegrams: &[u32]) -> Slave {
    Slave {
        primary,
        id: id.into(),
        telegrams: telegrams.to_vec(),
        ..Slave::default()
    }
}

#[tokio::test]
async fn multi_telegram_read_toggles_fcb_and_retry_repeats_it() {
    let mut s2 = slave(2, "00000042", &[7_000]);
    s2.drop_requests = 1;
    let slaves: Slaves = Arc::new(Mutex::new(vec![
        slave(1, "12345678", &[123_456, 100_000, 90_000]),
        s2,
    ]));
    let pty = pty_pair(Arc::clone(&slaves)).await;
    let mut master =
        Master::open(pty.a.to_str().unwrap(), 2400, Duration::from_millis(300), 2).unwrap();
    let telegrams = master.read(&Address::Primary(1), 8).await.unwrap();
    assert_eq!(telegrams.len(), 3);
    let frame = decoders::mbus::decode(&telegrams[1]).unwrap();
    assert_eq!(
        frame.records[0].value,
        RecordValue::Number(Decimal::new(100_000, 3))
    );
    assert_eq!(slaves.lock().unwrap()[0].fcbs, [true, false, true]);
    // The lost first answer is retried with the same FCB.
    let telegrams = master.read(&Address::Primary(2), 8).await.unwrap();
    assert_eq!(telegrams.len(), 1);
    assert_eq!(slaves.lock().unwrap()[1].fcbs, [true, true]);
    // A missing meter is reported after the retries.
    assert_eq!(
        master
            .read(&Address::Primary(9), 8)
            .await
            .unwrap_err()
            .to_string(),
        "no answer from primary 9 after retries"
    );
}

#[tokio::test]
async fn wildcard_search_resolves_collisions() {
    let slaves: Slaves = Arc::new(Mutex::new(vec![
        slave(0, "12345678", &[1]),
        slave(0, "12345679", &[2]),
        slave(0, "12995678", &[3]),
        slave(0, "87654321", &[4]),
    ]));
    let pty = pty_pair(Arc::clone(&slaves)).await;
    let mut master =
        Master::open(pty.a.to_str().unwrap(), 2400, Duration::from_millis(150), 1).unwrap();
    let found = master.search().await.unwrap();
    assert_eq!(found, ["12345678", "12345679", "12995678", "87654321"]);
    // Read one of them by its secondary address.
    let telegrams = master
        .read(&Address::Secondary("12345679".into()), 8)
        .await
        .unwrap();
    let frame = decoders::mbus::decode(&telegrams[0]).unwrap();
    assert_eq!(frame.meter.id, "12345679");
    assert_eq!(
        frame.records[0].value,
        RecordValue::Number(Decimal::new(2, 3))
    );
    // The next read of that meter continues the FCB alternation (the search read it with 1),
    // so the slave treats it as a new request, not a repeat of an old answer.
    master
        .read(&Address::Secondary("12345679".into()), 8)
        .await
        .unwrap();
    assert_eq!(slaves.lock().unwrap()[1].fcbs, [true, false, true]);
}

fn command(id: &str, device: &str, action: CommandAction) -> DeviceCommand {
    let now = OffsetDateTime::now_utc();
    DeviceCommand {
        v: 1,
        id: CommandId(id.into()),
        gateway: GatewayId::new("gw-1").unwrap(),
        device: MeterId::new(device).unwrap(),
        action,
        issued_by: "test".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(60),
    }
}

#[tokio::test]
async fn source_submits_readings_and_executes_commands() {
    let slaves: Slaves = Arc::new(Mutex::new(vec![
        slave(5, "12345678", &[123_456, 100_000]),
        slave(0, "87654321", &[4_321]),
    ]));
    let pty = pty_pair(Arc::clone(&slaves)).await;
    let mut config = MbusSerialSourceConfig::new(pty.a.to_string_lossy());
    config.timeout = Duration::from_millis(200);
    config.poll_interval = Duration::from_secs(30);
    config.meters = vec![
        MbusMeterConfig {
            primary: Some(5),
            secondary: None,
        },
        MbusMeterConfig {
            primary: None,
            secondary: Some("87654321".into()),
        },
    ];
    let (sink, mut rx) = IngestSink::new(8);
    let (cmd_tx, commands) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-1").unwrap(),
        "mbus1",
        model::SourceKind::MbusSerial,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    let env = SourceEnv::new("mbus1");
    let source = MbusSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &env,
    )
    .await
    .unwrap();
    let health = env.health();
    let task = tokio::spawn(source.run(ctx));
    let mut got = Vec::new();
    for _ in 0..2 {
        let req = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        for r in &req.readings {
            assert_eq!(r.quantity, Quantity::Volume);
            assert_eq!(r.provenance.source, model::SourceKind::MbusSerial);
            got.push((r.meter.to_string(), r.storage, r.value.to_string()));
        }
        req.done.send(Ok(())).unwrap();
    }
    assert_eq!(
        got,
        [
            ("mbus:KAM12345678".to_string(), 0, "123.456".to_string()),
            ("mbus:KAM12345678".to_string(), 1, "100".to_string()),
            ("mbus:KAM87654321".to_string(), 0, "4.321".to_string()),
        ]
    );
    assert_eq!(sink.counters().frames("mbus1"), 3);
    let h = health.get("secondary 87654321").unwrap();
    assert_eq!((h.polls_ok, h.consecutive_failures), (1, 0));

    let send = |c: DeviceCommand| {
        let (reply, rx) = oneshot::channel();
        let tx = cmd_tx.clone();
        async move {
            tx.send(CommandRequest { command: c, reply }).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(
        send(command(
            "r1",
            "mbus:KAM12345678",
            CommandAction::MbusApplicationReset
        ))
        .await,
        CommandOutcome::Sent
    );
    assert_eq!(
        send(command("t1", "mbus:KAM87654321", CommandAction::SetTime)).await,
        CommandOutcome::Sent
    );
    assert_eq!(
        send(command("x", "mbus:KAM00000001", CommandAction::SetTime)).await,
        CommandOutcome::Failed("meter mbus:KAM00000001 has not been read on this bus yet".into())
    );
    {
        let all = slaves.lock().unwrap();
        assert_eq!(all[0].commands, [(0x50, vec![])]);
        let (ci, data) = &all[1].commands[0];
        assert_eq!((*ci, &data[..2]), (0x51, &[0x04, 0x6D][..]));
        let now = OffsetDateTime::now_utc();
        // Type F: minute in byte 0, hour in byte 1 (UTC).
        assert_eq!(data[3] & 0x1F, now.hour());
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn search_at_start_polls_found_meters_and_counts_garbled_answers() {
    let mut broken = slave(7, "99999999", &[1]);
    broken.corrupt = true;
    let slaves: Slaves = Arc::new(Mutex::new(vec![
        slave(0, "11111111", &[11_000]),
        slave(0, "11111112", &[12_000]),
        broken,
    ]));
    let pty = pty_pair(Arc::clone(&slaves)).await;
    let mut config = MbusSerialSourceConfig::new(pty.a.to_string_lossy());
    config.timeout = Duration::from_millis(120);
    config.retries = 1;
    config.search_secondary = true;
    config.meters = vec![MbusMeterConfig {
        primary: Some(7),
        secondary: None,
    }];
    let (sink, mut rx) = IngestSink::new(8);
    let (_cmd_tx, commands) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-1").unwrap(),
        "mbus2",
        model::SourceKind::MbusSerial,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    let env = SourceEnv::new("mbus2");
    let source = MbusSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &env,
    )
    .await
    .unwrap();
    let health = env.health();
    let task = tokio::spawn(source.run(ctx));
    let mut got = Vec::new();
    for _ in 0..2 {
        let req = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.extend(
            req.readings
                .iter()
                .map(|r| (r.meter.to_string(), r.value.to_string())),
        );
        req.done.send(Ok(())).unwrap();
    }
    assert_eq!(
        got,
        [
            ("mbus:KAM11111111".to_string(), "11".to_string()),
            ("mbus:KAM11111112".to_string(), "12".to_string()),
        ]
    );
    let h = health.get("primary 7").unwrap();
    assert_eq!(h.consecutive_failures, 1);
    assert!(
        h.last_error
            .as_deref()
            .unwrap()
            .starts_with("garbled answer from primary 7: bad checksum"),
        "{h:?}"
    );
    assert_eq!(sink.counters().decode_errors("mbus2", "garbled"), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
