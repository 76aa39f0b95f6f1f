//! The gateway's field-bus sources against the simulators' devices: M-Bus slaves on a socat
//! pty, Modbus TCP instruments, hydrant controllers on Mosquitto.

use std::collections::BTreeMap;
use std::time::Duration;

use edge_config::hydrant::HydrantSourceConfig;
use edge_config::mbus::MbusSerialSourceConfig;
use edge_config::modbus::{ModbusDeviceConfig, ModbusTcpSourceConfig};
use gateway::sources::{hydrant, mbus, modbus};
use gateway::{CommandOutcome, CommandRequest, IngestSink, SourceContext, SubmitRequest};
use model::{CommandAction, CommandId, DeviceCommand, GatewayId, MeterId, Quantity};
use rust_decimal::Decimal;
use simulators::engine::Engine;
use simulators::fleet::{Fleet, FleetConfig, MbusConfig, ModbusConfig};
use simulators::mqtt::MqttConfig;
use simulators::scenario::Scenario;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Source {
    rx: mpsc::Receiver<SubmitRequest>,
    cmd: mpsc::Sender<CommandRequest>,
    shutdown: CancellationToken,
}

fn context(id: &str, kind: model::SourceKind) -> (SourceContext, Source) {
    let (sink, rx) = IngestSink::new(64);
    let (cmd, commands) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-e2e").unwrap(),
        id,
        kind,
        sink,
        commands,
        shutdown.clone(),
    );
    (ctx, Source { rx, cmd, shutdown })
}

type Task = tokio::task::JoinHandle<Result<(), gateway::sources::SourceError>>;

/// Builds source `S` and runs it on a test context; returns once it is ready.
async fn start<S: gateway::sources::Source>(id: &str, config: &S::Config) -> (Task, Source) {
    let (ctx, src) = context(id, S::KIND);
    let readiness = ctx.readiness.clone();
    let source = S::build(config, &gateway::sources::SourceEnv::new(id))
        .await
        .unwrap();
    let task = tokio::spawn(source.run(ctx));
    tokio::time::timeout(Duration::from_secs(60), readiness.wait_ready())
        .await
        .expect("source ready within 60 s");
    (task, src)
}

/// Collects submitted readings until `done` says enough, or 60 s pass.
async fn collect(
    rx: &mut mpsc::Receiver<SubmitRequest>,
    done: impl Fn(&[model::Reading]) -> bool,
) -> Vec<model::Reading> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&all) {
        let req = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("readings in time")
            .expect("source running");
        all.extend(req.readings.iter().cloned());
        req.done.send(Ok(())).unwrap();
    }
    all
}

#[tokio::test]
async fn mbus_master_finds_and_reads_the_simulated_slaves() {
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

    // The slaves' registers after two steps, from an independent engine run.
    let mut engine = Engine::new(s);
    let mut truth = BTreeMap::new();
    for _ in 0..2 {
        engine.step(|e| {
            truth.insert(
                format!("{:08}", 10_000_000 + e.meter),
                Decimal::from(e.register_ml / 1000) / Decimal::from(1000),
            );
        });
    }

    let mut mc = MbusSerialSourceConfig::new(fleet.mbus_master_path().unwrap().to_string_lossy());
    mc.timeout = Duration::from_millis(150);
    mc.retries = 1;
    mc.search_secondary = true;
    mc.poll_interval = Duration::from_secs(600);
    let (task, mut src) =
        start::<mbus::MbusSource>("mbus-e2e", &edge_config::Valid::new(mc).unwrap()).await;
    let readings = collect(&mut src.rx, |r| {
        let meters: std::collections::BTreeSet<_> = r.iter().map(|r| r.meter.clone()).collect();
        meters.len() >= 3
    })
    .await;
    // The first volume record of each telegram is the forward register (the simulator also
    // sends a second, reverse-flow volume record).
    let mut got: BTreeMap<String, Decimal> = BTreeMap::new();
    for r in readings
        .iter()
        .filter(|r| r.quantity == Quantity::Volume && r.storage == 0)
    {
        let id = r.meter.as_str();
        got.entry(id[id.len() - 8..].to_owned())
            .or_insert(r.value.normalize());
    }
    let expected: BTreeMap<String, Decimal> = got
        .keys()
        .map(|k| (k.clone(), truth[k].normalize()))
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got, expected);
    src.shutdown.cancel();
    task.await.unwrap().unwrap();
    fleet.stop().await.unwrap();
}

#[tokio::test]
async fn modbus_poller_reads_every_simulated_instrument() {
    let s = Scenario::plain(10, 1, 5, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(s);
    config.step_every = Duration::ZERO;
    config.max_steps = Some(2);
    config.modbus = Some(ModbusConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    fleet.wait_finished().await;
    let addr = fleet.modbus_addr().unwrap().to_string();
    let devices: Vec<ModbusDeviceConfig> = fleet
        .modbus_devices()
        .iter()
        .map(|d| ModbusDeviceConfig {
            name: d.name.clone(),
            address: Some(addr.clone()),
            unit_id: d.unit,
            map: d.model.clone(),
            poll_interval: Duration::from_secs(600),
            valve: None,
        })
        .collect();
    assert!(!devices.is_empty());
    let names: Vec<String> = devices
        .iter()
        .map(|d| format!("modbus:{}", d.name))
        .collect();
    let mc = ModbusTcpSourceConfig {
        id: "modbus-e2e".into(),
        timing: Default::default(),
        devices,
    };
    let (task, mut src) =
        start::<modbus::ModbusTcpSource>("modbus-e2e", &edge_config::Valid::new(mc).unwrap()).await;
    let readings = collect(&mut src.rx, |r| {
        names
            .iter()
            .all(|n| r.iter().any(|x| x.meter.as_str() == n))
    })
    .await;
    for n in &names {
        let of: Vec<_> = readings.iter().filter(|r| r.meter.as_str() == n).collect();
        assert!(!of.is_empty(), "{n}");
        assert!(
            of.iter()
                .all(|r| r.provenance.source == model::SourceKind::ModbusTcp)
        );
    }
    // The inlet flow meters report a volume register.
    assert!(readings.iter().any(|r| r.quantity == Quantity::Volume));
    src.shutdown.cancel();
    task.await.unwrap().unwrap();
    fleet.stop().await.unwrap();
}

#[tokio::test]
async fn hydrant_bridge_talks_to_simulated_hydrants() {
    let prefix = wm_tests::unique_prefix("hydrant-e2e");
    let mut hc = HydrantSourceConfig::new(
        "127.0.0.1",
        1883,
        format!("gw-{}", prefix.replace('/', "-")),
    );
    hc.topic_prefix = format!("{prefix}/hydrant");
    hc.ack_timeout = Duration::from_secs(5);
    // Subscribed before the hydrants report.
    let (task, mut src) =
        start::<hydrant::HydrantSource>("hydrant-e2e", &edge_config::Valid::new(hc).unwrap()).await;

    let s = Scenario::plain(10, 1, 6, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(s);
    config.step_every = Duration::from_millis(200);
    config.max_steps = Some(3);
    config.hydrants = 2;
    config.mqtt = Some(MqttConfig {
        host: "127.0.0.1".into(),
        port: 1883,
        topic_prefix: format!("{prefix}/"),
        client_id: format!("fleet-{}", prefix.replace('/', "-")),
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let readings = collect(&mut src.rx, |r| {
        ["hydrant:hyd-0000", "hydrant:hyd-0001"].iter().all(|h| {
            r.iter()
                .any(|x| x.meter.as_str() == *h && x.quantity == Quantity::Pressure)
        })
    })
    .await;
    assert!(
        readings
            .iter()
            .all(|r| r.meter.as_str().starts_with("hydrant:hyd-"))
    );
    fleet.wait_finished().await;

    let now = OffsetDateTime::now_utc();
    let (reply, outcome) = oneshot::channel();
    src.cmd
        .send(CommandRequest {
            command: DeviceCommand {
                v: 1,
                id: CommandId("e2e-unlock-1".into()),
                gateway: GatewayId::new("gw-e2e").unwrap(),
                device: MeterId::new("hydrant:hyd-0001").unwrap(),
                action: CommandAction::HydrantUnlock { duration_s: 600 },
                issued_by: "test".into(),
                issued_at: now,
                expires_at: now + Duration::from_secs(60),
            },
            reply,
        })
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), outcome)
            .await
            .unwrap()
            .unwrap(),
        CommandOutcome::Acknowledged
    );
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.hydrant_commands_executed, 1);
    src.shutdown.cancel();
    task.await.unwrap().unwrap();
}
