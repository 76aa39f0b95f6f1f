//! M-Bus slaves on a socat pty answer a master on the other end (2400 baud 8E1).

use std::time::Duration;

use decoders::RecordValue;
use decoders::mbus::{self, LinkFrame};
use rust_decimal::Decimal;
use simulators::engine::Engine;
use simulators::fleet::{Fleet, FleetConfig, MbusConfig};
use simulators::frames::bcd_u32;
use simulators::mbus_serial::COLLISION;
use simulators::scenario::Scenario;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialStream;

fn open_master(path: &std::path::Path) -> SerialStream {
    SerialStream::open(
        &tokio_serial::new(path.to_string_lossy(), 2400)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::Even)
            .stop_bits(tokio_serial::StopBits::One),
    )
    .unwrap()
}

/// Sends `request` and returns the bytes of the complete answer (a link frame or, on a
/// collision, whatever arrives until the line is quiet for 300 ms). `None` when nothing
/// arrives within 2 s (generous: the machine running the tests may be loaded).
async fn ask(port: &mut SerialStream, request: &[u8]) -> Option<Vec<u8>> {
    port.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let wait = if buf.is_empty() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(300)
        };
        match tokio::time::timeout(wait, port.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                if let Ok((_, used)) = mbus::parse_link_prefix(&buf)
                    && used == buf.len()
                {
                    return Some(buf);
                }
            }
            _ => return if buf.is_empty() { None } else { Some(buf) },
        }
    }
}

fn volume(frame: &[u8]) -> Decimal {
    let decoded = mbus::decode(frame).unwrap();
    decoded
        .records
        .iter()
        .find_map(|r| match (&r.value, r.quantity.as_ref()) {
            (RecordValue::Number(n), "volume") => Some(*n),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn slaves_answer_snd_nke_req_ud2_and_secondary_selection() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scenario::plain(10, 1, 4, datetime!(2026-11-01 0:00 UTC));
    s.fleet.mbus_meters = 3;
    let mut config = FleetConfig::new(s.clone());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(2);
    config.mbus = Some(MbusConfig {
        meters: 3,
        dir: dir.path().to_owned(),
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    fleet.wait_finished().await;
    let mut port = open_master(fleet.mbus_master_path().unwrap());

    // Registers after two steps, from an independent run.
    let mut engine = Engine::new(s.clone());
    let mut litres = std::collections::HashMap::new();
    for _ in 0..2 {
        engine.step(|e| {
            litres.insert(
                e.meter,
                Decimal::from(e.register_ml / 1000) / Decimal::from(1000),
            );
        });
    }

    assert_eq!(
        ask(&mut port, &mbus::encode::snd_nke(1)).await,
        Some(vec![0xE5])
    );
    assert_eq!(
        ask(&mut port, &mbus::encode::snd_nke(9)).await,
        None,
        "no slave 9"
    );
    let first = ask(&mut port, &mbus::encode::req_ud2(1, true))
        .await
        .unwrap();
    assert_eq!(mbus::decode(&first).unwrap().meter.id, "10000007");
    assert_eq!(volume(&first), litres[&7]);
    // Same FCB: the master missed the answer, the slave repeats it byte for byte.
    let again = ask(&mut port, &mbus::encode::req_ud2(1, true))
        .await
        .unwrap();
    assert_eq!(again, first);
    // Toggled FCB: a new answer (new access number).
    let next = ask(&mut port, &mbus::encode::req_ud2(1, false))
        .await
        .unwrap();
    assert_ne!(next, first);
    assert_eq!(volume(&next), litres[&7]);

    // Secondary addressing: meter 10000009 by full id, then by wildcard (collision).
    let select = mbus::encode::select_secondary(bcd_u32(10_000_009), None, None, None);
    assert_eq!(ask(&mut port, &select).await, Some(vec![0xE5]));
    let by_fd = ask(&mut port, &mbus::encode::req_ud2(0xFD, true))
        .await
        .unwrap();
    assert!(matches!(
        mbus::parse_link(&by_fd).unwrap(),
        LinkFrame::Long { address: 3, .. }
    ));
    assert_eq!(volume(&by_fd), litres[&9]);
    let wildcard = mbus::encode::select_secondary(0x1000_000F, None, None, None);
    assert_eq!(ask(&mut port, &wildcard).await, Some(COLLISION.to_vec()));
    let none = mbus::encode::select_secondary(0x2000_0000, None, None, None);
    assert_eq!(ask(&mut port, &none).await, None);

    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.mbus_rsp_ud, 4);
    assert_eq!(counts.mbus_replies, 7);
}
