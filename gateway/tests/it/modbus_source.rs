//! Modbus TCP/RTU poller against tokio-modbus slaves over real TCP sockets and a socat pty pair.

use std::collections::BTreeMap;
use std::future::Ready;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use decoders::modbus::{DataType, RegisterFunction, RegisterMap, RegisterSpec};
use edge_config::modbus::{
    ModbusDeviceConfig, ModbusRtuSourceConfig, ModbusTcpSourceConfig, ModbusTiming, ModbusValve,
    Parity,
};
use gateway::sources::modbus::{Health, ModbusRtuSource, ModbusTcpSource};
use gateway::sources::{Source, SourceEnv, SourceError};
use gateway::{CommandOutcome, CommandRequest, IngestSink, SourceContext, SubmitRequest};
use model::{CommandAction, CommandId, DeviceCommand, GatewayId, MeterId, Quantity, Unit};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

/// Test map: holding 0..2 = volume in litres (u32, high word first), holding 2 = valve word.
fn test_map() -> RegisterMap {
    let mut volume = RegisterSpec::new(
        "volume",
        "volume",
        RegisterFunction::Holding,
        0,
        DataType::U32,
    );
    volume.scale = Decimal::new(1, 3);
    volume.unit = Some(Unit::CubicMetre);
    let valve = RegisterSpec::new(
        "valve",
        "valve_state",
        RegisterFunction::Holding,
        2,
        DataType::U16,
    );
    RegisterMap::new("test", vec![volume, valve])
}

fn resolver(map: &str) -> Result<RegisterMap, String> {
    match map {
        "test" => Ok(test_map()),
        other => Err(format!("unknown map {other}")),
    }
}

/// A slave: registers, optional silence, a request counter.
#[derive(Clone, Default)]
struct Slave {
    unit: u8,
    regs: Arc<Mutex<BTreeMap<u16, u16>>>,
    silent: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

impl tokio_modbus::server::Service for Slave {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        if req.slave != self.unit || self.silent.load(Ordering::SeqCst) {
            return std::future::ready(Ok(None));
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut regs = self.regs.lock().unwrap();
        let result = match req.request {
            Request::ReadHoldingRegisters(start, count) => (start..start + count)
                .map(|a| {
                    regs.get(&a)
                        .copied()
                        .ok_or(ExceptionCode::IllegalDataAddress)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|w| Some(Response::ReadHoldingRegisters(w))),
            Request::WriteSingleRegister(a, v) if a < 100 => {
                regs.insert(a, v);
                Ok(Some(Response::WriteSingleRegister(a, v)))
            }
            Request::WriteSingleRegister(..) => Err(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        std::future::ready(result)
    }
}

fn slave(unit: u8, litres: u32) -> Slave {
    let s = Slave {
        unit,
        ..Slave::default()
    };
    {
        let mut r = s.regs.lock().unwrap();
        r.insert(0, (litres >> 16) as u16);
        r.insert(1, (litres & 0xffff) as u16);
        r.insert(2, 1);
    }
    s
}

async fn serve_tcp(listener: tokio::net::TcpListener, slave: Slave, connections: Arc<AtomicUsize>) {
    let server = Server::new(listener);
    let on_connected = move |stream, addr| {
        connections.fetch_add(1, Ordering::SeqCst);
        let s = slave.clone();
        async move { accept_tcp_connection(stream, addr, move |_| Ok(Some(s.clone()))) }
    };
    server.serve(&on_connected, |_e| {}).await.ok();
}

fn timing(timeout_ms: u64) -> ModbusTiming {
    ModbusTiming {
        timeout: Duration::from_millis(timeout_ms),
        retries: 1,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..ModbusTiming::default()
    }
}

fn device(name: &str, address: Option<String>, unit_id: u8, every_ms: u64) -> ModbusDeviceConfig {
    ModbusDeviceConfig {
        name: name.into(),
        address,
        unit_id,
        map: "test".into(),
        poll_interval: Duration::from_millis(every_ms),
        valve: None,
    }
}

struct Running {
    sink: IngestSink,
    rx: mpsc::Receiver<SubmitRequest>,
    cmd: mpsc::Sender<CommandRequest>,
    health: Health,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

fn context(
    source: &str,
    kind: model::SourceKind,
) -> (
    SourceContext,
    IngestSink,
    mpsc::Receiver<SubmitRequest>,
    mpsc::Sender<CommandRequest>,
    CancellationToken,
) {
    let (sink, rx) = IngestSink::new(16);
    let (cmd, commands) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-1").unwrap(),
        source,
        kind,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    (ctx, sink, rx, cmd, shutdown)
}

/// The environment of a test source: its maps come from [`resolver`].
fn env(source: &str) -> SourceEnv {
    SourceEnv::new(source).with_map_resolver(Arc::new(resolver))
}

async fn start_tcp(config: ModbusTcpSourceConfig) -> Running {
    let (ctx, sink, rx, cmd, shutdown) = context("mb", model::SourceKind::ModbusTcp);
    let env = env("mb");
    let source = ModbusTcpSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &env,
    )
    .await
    .unwrap();
    let health = env.health();
    let task = tokio::spawn(source.run(ctx));
    Running {
        sink,
        rx,
        cmd,
        health,
        shutdown,
        task,
    }
}

async fn next_submit(rx: &mut mpsc::Receiver<SubmitRequest>) -> SubmitRequest {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a poll within 10 s")
        .expect("sink open")
}

fn values(req: &SubmitRequest) -> Vec<(String, Quantity, String)> {
    req.readings
        .iter()
        .map(|r| (r.meter.to_string(), r.quantity, r.value.to_string()))
        .collect()
}

fn write(device: &str, register: u16, value: u16) -> DeviceCommand {
    let now = OffsetDateTime::now_utc();
    DeviceCommand {
        v: 1,
        id: CommandId(format!("w-{register}")),
        gateway: GatewayId::new("gw-1").unwrap(),
        device: MeterId::new(device).unwrap(),
        action: CommandAction::ModbusWrite { register, value },
        issued_by: "test".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(60),
    }
}

async fn command(cmd: &mpsc::Sender<CommandRequest>, c: DeviceCommand) -> CommandOutcome {
    let (reply, rx) = oneshot::channel();
    cmd.send(CommandRequest { command: c, reply })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn tcp_polls_two_units_and_writes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Two units behind one TCP endpoint (a Modbus TCP gateway): one slave answering unit 1.
    let s1 = slave(1, 123_456);
    tokio::spawn(serve_tcp(listener, s1.clone(), Arc::default()));
    let mut dev = device("flow-1", Some(addr.clone()), 1, 300);
    dev.valve = Some(ModbusValve {
        register: 2,
        open: 1,
        close: 2,
    });
    let mut run = start_tcp(ModbusTcpSourceConfig {
        id: "mb".into(),
        timing: timing(500),
        devices: vec![dev],
    })
    .await;
    let req = next_submit(&mut run.rx).await;
    assert_eq!(
        values(&req),
        [
            ("modbus:flow-1".into(), Quantity::Volume, "123.456".into()),
            ("modbus:flow-1".into(), Quantity::ValveState, "1".into()),
        ]
    );
    assert_eq!(
        req.readings[0].provenance.source,
        model::SourceKind::ModbusTcp
    );
    assert_eq!(
        req.readings[0].provenance.channel,
        Some(format!("{addr} unit 1"))
    );
    req.done.send(Ok(())).unwrap();
    let health = run.health.get("flow-1").unwrap();
    assert_eq!(health.consecutive_failures, 0);
    assert!(health.last_ok.is_some());
    assert!(run.sink.counters().frames("mb") >= 1);

    // A write lands in the register and the next poll shows it.
    assert_eq!(
        command(&run.cmd, write("modbus:flow-1", 2, 0)).await,
        CommandOutcome::Acknowledged
    );
    assert_eq!(s1.regs.lock().unwrap().get(&2), Some(&0));
    let req = next_submit(&mut run.rx).await;
    assert_eq!(values(&req)[1].2, "0");
    req.done.send(Ok(())).unwrap();
    // Valve commands write the configured register.
    let mut close = write("modbus:flow-1", 0, 0);
    close.action = CommandAction::ValveClose;
    assert_eq!(command(&run.cmd, close).await, CommandOutcome::Acknowledged);
    assert_eq!(s1.regs.lock().unwrap().get(&2), Some(&2));
    // The slave refuses an address: the exception is reported, not retried.
    assert_eq!(
        command(&run.cmd, write("modbus:flow-1", 500, 1)).await,
        CommandOutcome::Failed(
            "device refused the write to register 500: IllegalDataAddress".into()
        )
    );
    assert_eq!(
        command(&run.cmd, write("modbus:other", 1, 1)).await,
        CommandOutcome::Failed("device modbus:other is not on this modbus source".into())
    );
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn silent_device_times_out_and_recovers_after_reconnect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let s = slave(1, 42);
    s.silent.store(true, Ordering::SeqCst);
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(serve_tcp(listener, s.clone(), Arc::clone(&connections)));
    let mut run = start_tcp(ModbusTcpSourceConfig {
        id: "mb".into(),
        timing: timing(200),
        devices: vec![device("flow-2", Some(addr), 1, 300)],
    })
    .await;
    // Wait for two failed polls.
    let mut health = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(h) = run
            .health
            .get("flow-2")
            .filter(|h| h.consecutive_failures >= 2)
        {
            health = Some(h);
            break;
        }
    }
    let health = health.expect("failures recorded");
    assert_eq!(
        health.last_error.as_deref(),
        Some("unit 1: no answer within 200ms")
    );
    assert!(health.last_ok.is_none());
    // Every timed-out attempt dropped its connection: 2 attempts per poll, bounded.
    let seen = connections.load(Ordering::SeqCst);
    assert!((2..=8).contains(&seen), "{seen} connections");
    s.silent.store(false, Ordering::SeqCst);
    let req = next_submit(&mut run.rx).await;
    assert_eq!(values(&req)[0].2, "0.042");
    req.done.send(Ok(())).unwrap();
    assert_eq!(run.health.get("flow-2").unwrap().consecutive_failures, 0);
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn unreachable_endpoint_backs_off_without_a_storm() {
    // A port with nothing listening: bind, note, drop.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut run = start_tcp(ModbusTcpSourceConfig {
        id: "mb".into(),
        timing: timing(200),
        // Polled every 100 ms: without backoff that is ≥ 20 connects in 1 s.
        devices: vec![device("flow-3", Some(addr.to_string()), 1, 100)],
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let h = run.health.get("flow-3").expect("polled");
    assert!(h.consecutive_failures >= 1);
    assert!(
        h.last_error.as_deref().unwrap().contains("connect"),
        "{h:?}"
    );
    // Backoff 50, 100, 200, 400, 400 ms (jittered ≥ half): at most ~12 attempts in 1.2 s.
    assert!(h.polls_failed <= 12, "{h:?}");
    // Now a slave appears on that port and the device recovers.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(serve_tcp(listener, slave(1, 7), Arc::default()));
    let req = next_submit(&mut run.rx).await;
    assert_eq!(values(&req)[0].2, "0.007");
    req.done.send(Ok(())).unwrap();
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn rtu_polls_over_a_socat_pty_pair() {
    let pty = testkit::pty::pty_pair().await;
    let (a, b) = (pty.a.clone(), pty.b.clone());
    // Two slaves on one line would both read every request; one server answering two units
    // stands for the line here.
    let s3 = slave(3, 1_000);
    let serial =
        tokio_serial::SerialStream::open(&tokio_serial::new(b.to_string_lossy(), 9600)).unwrap();
    let server = tokio_modbus::server::rtu::Server::new(serial);
    let slave3 = s3.clone();
    tokio::spawn(async move { server.serve_forever(slave3).await.ok() });

    let config = ModbusRtuSourceConfig {
        id: "rtu".into(),
        port: a.to_string_lossy().into_owned(),
        baud_rate: 9600,
        parity: Parity::None,
        data_bits: 8,
        stop_bits: 1,
        timing: timing(500),
        devices: vec![device("rtu-3", None, 3, 200), device("rtu-9", None, 9, 200)],
    };
    let (ctx, _sink, mut rx, cmd, shutdown) = context("rtu", model::SourceKind::ModbusRtu);
    let env = env("rtu");
    let source = ModbusRtuSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &env,
    )
    .await
    .unwrap();
    let health = env.health();
    let task = tokio::spawn(source.run(ctx));
    let req = next_submit(&mut rx).await;
    assert_eq!(
        values(&req)[0],
        ("modbus:rtu-3".into(), Quantity::Volume, "1.000".into())
    );
    assert_eq!(
        req.readings[0].provenance.source,
        model::SourceKind::ModbusRtu
    );
    req.done.send(Ok(())).unwrap();
    assert_eq!(
        command(&cmd, write("modbus:rtu-3", 2, 5)).await,
        CommandOutcome::Acknowledged
    );
    assert_eq!(s3.regs.lock().unwrap().get(&2), Some(&5));
    // Unit 9 does not exist: its polls time out, unit 3 keeps working on the same line.
    for _ in 0..100 {
        if health
            .get("rtu-9")
            .is_some_and(|h| h.consecutive_failures >= 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(health.get("rtu-9").unwrap().consecutive_failures >= 1);
    let req = next_submit(&mut rx).await;
    assert_eq!(values(&req)[1].2, "5");
    req.done.send(Ok(())).unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    drop(pty);
}

#[tokio::test]
async fn builtin_map_through_the_public_run() {
    use std::collections::HashMap;
    let map = edge_config::register_map::builtin("generic-emf").unwrap();
    let values: HashMap<String, Decimal> = [
        ("forward_total", Decimal::new(1_234_567, 3)),
        ("reverse_total", Decimal::new(5, 3)),
        ("alarm", Decimal::from(8)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let words = decoders::modbus::encode(&map, &values).unwrap();
    let (start, _) = map.register_span().unwrap();
    let s = Slave {
        unit: 1,
        ..Slave::default()
    };
    {
        let mut regs = s.regs.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            regs.insert(start + i as u16, *w);
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve_tcp(listener, s, Arc::default()));
    let mut dev = device("emf-1", Some(addr), 1, 500);
    dev.map = "generic-emf".into();
    let (ctx, _sink, mut rx, _cmd, shutdown) = context("emf", model::SourceKind::ModbusTcp);
    let config = ModbusTcpSourceConfig {
        id: "emf".into(),
        timing: timing(500),
        devices: vec![dev],
    };
    // The shipped maps: the default resolver.
    let source = ModbusTcpSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &SourceEnv::new("emf"),
    )
    .await
    .unwrap();
    let task = tokio::spawn(source.run(ctx));
    let req = next_submit(&mut rx).await;
    let got = values_of(&req);
    req.done.send(Ok(())).unwrap();
    assert!(
        got.contains(&(Quantity::Volume, "1234.567".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&(Quantity::VolumeReverse, "0.005".into())),
        "{got:?}"
    );
    assert!(got.contains(&(Quantity::StatusWord, "8".into())), "{got:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // An unknown map name is a start-up error naming the device.
    let config = ModbusTcpSourceConfig {
        id: "bad".into(),
        timing: timing(500),
        devices: vec![ModbusDeviceConfig {
            map: "no-such-map.toml".into(),
            ..device("d1", Some("127.0.0.1:1".into()), 1, 500)
        }],
    };
    let err = ModbusTcpSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &SourceEnv::new("bad"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("device \"d1\": register map \"no-such-map.toml\""),
        "{err}"
    );
}

fn values_of(req: &SubmitRequest) -> Vec<(Quantity, String)> {
    req.readings
        .iter()
        .map(|r| (r.quantity, r.value.normalize().to_string()))
        .collect()
}
