//! `simulate`: runs the simulated device fleet against a gateway, back-fills readings on a
//! simulated clock, or prints a scenario's ground truth.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use simulators::engine::{Delivery, Engine, unix};
use simulators::scenario::Scenario;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Simulated water-meter fleet.
#[derive(Debug, Parser)]
#[command(name = "simulate", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, `simulate --meters N` runs a back-fill.
    #[command(flatten)]
    backfill: BackfillArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generates readings for many meters on a simulated clock (faster than real time).
    Backfill(BackfillArgs),
    /// Prints the ground truth (injected events, DMA balances) of a scenario as JSON.
    GroundTruth {
        /// Scenario TOML file.
        scenario: PathBuf,
    },
    /// Runs a fleet against a gateway over real sockets (CoAP, HTTP, MQTT, UDP, pty, TCP).
    Demo(Box<DemoArgs>),
    /// Scores detector output against a scenario's ground truth (precision and recall per kind).
    Score {
        /// Ground truth JSON (from `simulate ground-truth`).
        #[arg(long)]
        truth: PathBuf,
        /// Detections: a JSON array of alarms (`model::Alarm`) or of `{"meter","kind","at"}`.
        #[arg(long)]
        detections: PathBuf,
        /// Kinds to score (snake_case, comma-separated); default: every kind in the truth.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Matching tolerance around each truth span, hours.
        #[arg(long, default_value_t = 24)]
        tolerance_hours: i64,
    },
    /// Prints the gateway's NB-IoT key file (`"cjt188:…" = "hex"`) for the CJ/T 188 meters of a
    /// fleet whose CoAP meters run with `--coap-key-seed SEED`.
    NbiotKeys {
        /// Scenario file (default: the plain fleet of `demo --meters`).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Meters of the plain fleet (without --scenario).
        #[arg(long, default_value_t = 200)]
        meters: u32,
        /// The seed given to `demo --coap-key-seed`.
        #[arg(long, env = "WM_NBIOT_KEY_SEED")]
        key_seed: String,
    },
    /// Prints the registry CSV of a scenario's fleet as `demo` runs it (for `pipeline registry
    /// import`): meter numbers, DMAs with inlet meters and pressure points, books, customers,
    /// NB-IoT valve meters with policies, and the gateway source of each meter.
    RegistryCsv {
        /// Scenario TOML file.
        scenario: PathBuf,
        /// Gateway id serving the fleet.
        #[arg(long, default_value = "gw-demo")]
        gateway: String,
        /// As `demo --coap-meters`.
        #[arg(long, default_value_t = 0)]
        coap_meters: u32,
        /// As `demo --http-meters`.
        #[arg(long, default_value_t = 0)]
        http_meters: u32,
        /// As `demo --concentrator-meters`.
        #[arg(long, default_value_t = 0)]
        concentrator_meters: u32,
        /// As `demo --wmbus-meters`.
        #[arg(long, default_value_t = 0)]
        wmbus_meters: u32,
        /// Every n-th valve meter may be closed automatically on a burst.
        #[arg(long, default_value_t = 20)]
        auto_close_every: u32,
        /// Every n-th valve meter is a protected customer.
        #[arg(long, default_value_t = 25)]
        protected_every: u32,
        /// As `demo --hydrants`: rows for the hydrant controllers `hydrant:hyd-NNNN`.
        #[arg(long, default_value_t = 0)]
        hydrants: u32,
        /// As `demo --wmbus-dma-inlets`: each DMA's inlet meter is its wM-Bus bulk meter.
        #[arg(long)]
        wmbus_dma_inlets: bool,
    },
    /// Prints the wM-Bus AES keys of a scenario's M-Bus-addressed meters as JSON
    /// (`{"mbus:SIM10000042": "hex key", ...}`) for the gateway's key configuration.
    WmbusKeys {
        /// Scenario TOML file.
        scenario: PathBuf,
        /// Print `"mbus:…" = "hex"` lines for the gateway's `keys` table instead of JSON.
        #[arg(long)]
        toml: bool,
    },
}

/// `--nbiot-uplink` values ([`simulators::fleet::NbiotUplink`]).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UplinkArg {
    /// The current reading.
    Hourly,
    /// A day of hourly readings.
    Daily,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Scenario file (default: a plain fleet of --meters households and shops).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Meters of the plain fleet (without --scenario); the last fifth are M-Bus addressed.
    #[arg(long, default_value_t = 200)]
    meters: u32,
    /// Real milliseconds per simulated step (one step = the scenario interval, 1 h by default).
    #[arg(long, default_value_t = 1000)]
    step_ms: u64,
    /// Stop after this many steps (default: the whole scenario, or Ctrl-C).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Never run ahead of the wall clock: replay the scenario's past at --step-ms, then go on
    /// in real time (one reading per meter per interval).
    #[arg(long)]
    not_ahead_of_clock: bool,
    /// Gateway CoAP address for NB-IoT meters (HOST:PORT).
    #[arg(long)]
    gateway_coap: Option<String>,
    /// NB-IoT meters (CoAP, HTTP push) report every N steps (24 with hourly steps: daily),
    /// with their current reading (`--nbiot-uplink hourly`).
    #[arg(long, default_value_t = 1)]
    nbiot_report_every: u32,
    /// What NB-IoT uplinks carry: `hourly` (the current reading, every --nbiot-report-every
    /// steps) or `daily` (once a day, the 24 hourly readings since the last uplink).
    #[arg(long, value_enum, default_value_t = UplinkArg::Hourly)]
    nbiot_uplink: UplinkArg,
    /// Meter indices of CoAP meters without a valve (comma-separated); they refuse valve
    /// commands with the CJ/T 188 abnormal reply.
    #[arg(long, value_delimiter = ',')]
    nbiot_no_valve: Vec<u32>,
    /// NB-IoT CoAP meters.
    #[arg(long, default_value_t = 50)]
    coap_meters: u32,
    /// Seed of the CoAP meters' keys: they then seal uplinks for the gateway's
    /// `auth = "frame_mac"` (key file: `simulate nbiot-keys`).
    #[arg(long, env = "WM_NBIOT_KEY_SEED")]
    coap_key_seed: Option<String>,
    /// Gateway HTTP push address (HOST:PORT).
    #[arg(long)]
    gateway_http: Option<String>,
    /// HTTP push path.
    #[arg(long, default_value = "/v1/push")]
    http_path: String,
    /// HTTP push HMAC secret.
    #[arg(long, env = "WM_PUSH_SECRET", default_value = "")]
    http_secret: String,
    /// Meters reporting through the IoT platform push.
    #[arg(long, default_value_t = 20)]
    http_meters: u32,
    /// MQTT broker for concentrators and hydrants (mqtt://host:port).
    #[arg(long, env = "MQTT_URL")]
    mqtt: Option<String>,
    /// Prefix before `concentrator/...` and `hydrant/...` topics.
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// Concentrators.
    #[arg(long, default_value_t = 2)]
    concentrators: u32,
    /// Meters read through concentrators.
    #[arg(long, default_value_t = 80)]
    concentrator_meters: u32,
    /// Concentrators forward raw CJ/T 188 frames on `concentrator/{cid}/frame` instead of JSON.
    #[arg(long)]
    concentrator_frames: bool,
    /// Concentrators upload after every step instead of at local midnight.
    #[arg(long)]
    upload_every_step: bool,
    /// Hydrant controllers.
    #[arg(long, default_value_t = 5)]
    hydrants: u32,
    /// Scripted hydrant illegal use, `INDEX@STEP` (comma-separated or repeated): hydrant
    /// `hyd-INDEX` is opened without authorisation at that step if it is locked and closed.
    #[arg(long, value_delimiter = ',', value_parser = parse_illegal_use)]
    hydrant_illegal_use: Vec<(u32, u64)>,
    /// Gateway wM-Bus UDP receiver address (HOST:PORT).
    #[arg(long)]
    gateway_wmbus: Option<String>,
    /// wM-Bus meters.
    #[arg(long, default_value_t = 20)]
    wmbus_meters: u32,
    /// Send wM-Bus telegrams unencrypted.
    #[arg(long)]
    wmbus_clear: bool,
    /// Each DMA's inlet is also a wM-Bus bulk meter (`mbus:SIM990000NN`, needs
    /// --gateway-wmbus) sending the DMA's inflow totaliser with its own clock after every step.
    #[arg(long)]
    wmbus_dma_inlets: bool,
    /// Wired M-Bus slaves on a socat pty pair created in --mbus-dir.
    #[arg(long, default_value_t = 0)]
    mbus_meters: u32,
    /// Directory for the pty links `slave` and `master`.
    #[arg(long, default_value = "/tmp/wm-sim-mbus")]
    mbus_dir: PathBuf,
    /// Serve Modbus TCP instruments on this address (e.g. 127.0.0.1:5020).
    #[arg(long)]
    modbus_bind: Option<String>,
}

#[derive(Debug, Args)]
struct BackfillArgs {
    /// Number of meters (ignored with --scenario).
    #[arg(long, default_value_t = 1000)]
    meters: u32,
    /// Simulated days (ignored with --scenario).
    #[arg(long, default_value_t = 1)]
    days: u32,
    /// Seed (ignored with --scenario).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start of simulated time, RFC 3339 (ignored with --scenario).
    #[arg(long, default_value = "2026-01-01T00:00:00Z")]
    start: String,
    /// Reading interval in minutes (ignored with --scenario).
    #[arg(long, default_value_t = 60)]
    interval_minutes: u32,
    /// Run this scenario file instead of a plain fleet.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Write every delivered reading as JSON lines to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// `INDEX@STEP` of `--hydrant-illegal-use`.
fn parse_illegal_use(s: &str) -> Result<(u32, u64), String> {
    let (h, step) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: expected INDEX@STEP, e.g. 1@40"))?;
    Ok((
        h.trim()
            .parse()
            .map_err(|e| format!("{s:?}: hydrant index: {e}"))?,
        step.trim()
            .parse()
            .map_err(|e| format!("{s:?}: step: {e}"))?,
    ))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => backfill(&cli.backfill),
        Some(Command::Backfill(args)) => backfill(&args),
        Some(Command::Demo(args)) => demo(*args),
        Some(Command::Score {
            truth,
            detections,
            kinds,
            tolerance_hours,
        }) => score(&truth, &detections, &kinds, tolerance_hours),
        Some(Command::WmbusKeys { scenario, toml }) => {
            let s = Scenario::load(&scenario)?;
            let pop = simulators::engine::Population::new(&s);
            let keys: serde_json::Map<String, serde_json::Value> = pop
                .meters
                .iter()
                .enumerate()
                .filter(|(_, m)| matches!(m.address, model::MeterAddress::Mbus { .. }))
                .map(|(i, m)| {
                    let key = simulators::frames::wmbus_key(s.seed, i as u32);
                    (m.id.to_string(), hex::encode(key).into())
                })
                // The DMA inlet bulk meters of `demo --wmbus-dma-inlets`.
                .chain((0..pop.dmas).map(|d| {
                    let index = simulators::engine::dma_inlet_key_index(d);
                    let key = simulators::frames::wmbus_key(s.seed, index);
                    (
                        simulators::engine::dma_inlet_meter(d).id.to_string(),
                        hex::encode(key).into(),
                    )
                }))
                .collect();
            if toml {
                for (id, key) in &keys {
                    println!("\"{id}\" = {key}");
                }
            } else {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            }
            Ok(())
        }
        Some(Command::NbiotKeys {
            scenario,
            meters,
            key_seed,
        }) => {
            let s = match &scenario {
                Some(p) => Scenario::load(p)?,
                None => demo_scenario(meters),
            };
            let pop = simulators::engine::Population::new(&s);
            let keys = edge_config::nbiot_keys::NbiotKeys::from_pairs(
                pop.meters
                    .iter()
                    .filter(|m| matches!(m.address, model::MeterAddress::Cjt188 { .. }))
                    .map(|m| {
                        let key = simulators::nbiot::meter_key(&key_seed, m.id.as_str());
                        (m.id.clone(), key)
                    }),
            );
            print!("{}", keys.to_toml());
            Ok(())
        }
        Some(Command::RegistryCsv {
            scenario,
            gateway,
            coap_meters,
            http_meters,
            concentrator_meters,
            wmbus_meters,
            auto_close_every,
            protected_every,
            hydrants,
            wmbus_dma_inlets,
        }) => {
            let s = Scenario::load(&scenario)?;
            let layout = simulators::registry::Layout {
                gateway,
                coap_meters,
                http_meters,
                concentrator_meters,
                wmbus_meters,
                auto_close_every,
                protected_every,
                hydrants,
                wmbus_dma_inlets,
            };
            print!("{}", simulators::registry::registry_csv(&s, &layout));
            Ok(())
        }
        Some(Command::GroundTruth { scenario }) => {
            let s = Scenario::load(&scenario)?;
            let truth = simulators::engine::ground_truth(&s);
            println!("{}", serde_json::to_string_pretty(&truth)?);
            Ok(())
        }
    }
}

fn score(
    truth: &std::path::Path,
    detections: &std::path::Path,
    kinds: &[String],
    tolerance_hours: i64,
) -> anyhow::Result<()> {
    use simulators::truth::{Detection, GroundTruth, TruthKind};
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let truth: GroundTruth = serde_json::from_str(&read(truth)?).context("truth JSON")?;
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&read(detections)?).context("detections: expected a JSON array")?;
    let mut dets = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        if let Ok(d) = serde_json::from_value::<Detection>(v.clone()) {
            dets.push(d);
            continue;
        }
        let alarm: model::Alarm = serde_json::from_value(v)
            .with_context(|| format!("detections[{i}] is neither a detection nor an alarm"))?;
        dets.extend(Detection::from_alarm(&alarm));
    }
    let kinds: Vec<TruthKind> = if kinds.is_empty() {
        let mut k: Vec<TruthKind> = truth.events.iter().map(|e| e.kind).collect();
        k.sort();
        k.dedup();
        k
    } else {
        kinds
            .iter()
            .map(|k| {
                serde_json::from_value(serde_json::Value::String(k.clone()))
                    .with_context(|| format!("--kinds: unknown kind {k:?}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let s = simulators::truth::score(
        &truth,
        &dets,
        &kinds,
        time::Duration::hours(tolerance_hours),
    );
    println!(
        "{:<22} {:>6} {:>9} {:>10} {:>9} {:>7}",
        "kind", "truth", "detected", "detections", "precision", "recall"
    );
    for (k, v) in &s.by_kind {
        println!(
            "{:<22} {:>6} {:>9} {:>10} {:>9.3} {:>7.3}",
            serde_json::to_value(k)?.as_str().unwrap_or("?"),
            v.truth,
            v.detected,
            v.detections,
            v.precision(),
            v.recall()
        );
    }
    let o = s.overall;
    println!(
        "{:<22} {:>6} {:>9} {:>10} {:>9.3} {:>7.3}",
        "overall",
        o.truth,
        o.detected,
        o.detections,
        o.precision(),
        o.recall()
    );
    Ok(())
}

fn resolve(what: &str, addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs()
        .with_context(|| format!("{what} {addr:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{what} {addr:?} resolves to no address"))
}

/// The plain fleet of `demo --meters N` (also what `nbiot-keys` writes keys for).
fn demo_scenario(meters: u32) -> Scenario {
    let start = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let mut s = Scenario::plain(meters, 365, 1, start);
    s.fleet.mbus_meters = meters / 5;
    s
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    use simulators::fleet::{
        CoapConfig, ConcentratorConfig, ConcentratorFormat, Fleet, FleetConfig, HttpPushConfig,
        MbusConfig, ModbusConfig, Upload, WmbusConfig,
    };
    let scenario = match &args.scenario {
        Some(p) => Scenario::load(p)?,
        None => demo_scenario(args.meters),
    };
    let mut config = FleetConfig::new(scenario);
    config.step_every = std::time::Duration::from_millis(args.step_ms);
    config.max_steps = args.max_steps;
    config.not_ahead_of_wall_clock = args.not_ahead_of_clock;
    config.nbiot_report_every = args.nbiot_report_every;
    config.nbiot_uplink = match args.nbiot_uplink {
        UplinkArg::Hourly => simulators::fleet::NbiotUplink::Hourly,
        UplinkArg::Daily => simulators::fleet::NbiotUplink::Daily,
    };
    config.nbiot_without_valve = args.nbiot_no_valve.iter().copied().collect();
    if let Some(a) = &args.gateway_coap {
        config.coap = Some(CoapConfig {
            gateway: resolve("--gateway-coap", a)?,
            meters: args.coap_meters,
        });
        config.nbiot_key_seed = args.coap_key_seed.clone();
    }
    if let Some(a) = &args.gateway_http {
        config.http_push = Some(HttpPushConfig {
            gateway: resolve("--gateway-http", a)?,
            path: args.http_path.clone(),
            secret: args.http_secret.clone(),
            platform: decoders::envelope::Platform::Generic,
            meters: args.http_meters,
        });
    }
    if let Some(url) = &args.mqtt {
        let id = format!("wm-simulate-{}", std::process::id());
        config.mqtt = Some(
            simulators::mqtt::MqttConfig::from_url(url, &args.topic_prefix, &id)
                .map_err(anyhow::Error::msg)?,
        );
        if args.concentrators > 0 && args.concentrator_meters > 0 {
            config.concentrators = Some(ConcentratorConfig {
                format: if args.concentrator_frames {
                    ConcentratorFormat::Frames
                } else {
                    ConcentratorFormat::Json
                },
                count: args.concentrators,
                meters: args.concentrator_meters,
                upload: if args.upload_every_step {
                    Upload::EveryStep
                } else {
                    Upload::Midnight
                },
            });
        }
        config.hydrants = args.hydrants;
        config.hydrant_illegal_use = args.hydrant_illegal_use.clone();
    }
    if let Some(a) = &args.gateway_wmbus {
        config.wmbus = Some(WmbusConfig {
            gateway: resolve("--gateway-wmbus", a)?,
            meters: args.wmbus_meters,
            encrypted: !args.wmbus_clear,
        });
    }
    if args.wmbus_dma_inlets {
        anyhow::ensure!(
            config.wmbus.is_some(),
            "--wmbus-dma-inlets needs --gateway-wmbus (the inlets send wM-Bus telegrams)"
        );
        config.wmbus_dma_inlets = true;
    }
    if args.mbus_meters > 0 {
        std::fs::create_dir_all(&args.mbus_dir)
            .with_context(|| format!("cannot create {}", args.mbus_dir.display()))?;
        config.mbus = Some(MbusConfig {
            meters: args.mbus_meters,
            dir: args.mbus_dir.clone(),
        });
    }
    if let Some(a) = &args.modbus_bind {
        config.modbus = Some(ModbusConfig {
            bind: resolve("--modbus-bind", a)?,
        });
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut fleet = Fleet::start(config).await?;
        if let Some(p) = fleet.mbus_master_path() {
            println!("m-bus master pty  {}", p.display());
        }
        if let Some(a) = fleet.modbus_addr() {
            println!("modbus tcp        {a}");
            for d in fleet.modbus_devices() {
                println!("  unit {:3}  {:<18} map {}", d.unit, d.name, d.model);
            }
        }
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(10));
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = fleet.wait_finished() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = ticker.tick() => println!("{:?}", fleet.counts()),
            }
        }
        let truth = fleet.ground_truth();
        let counts = fleet.stop().await?;
        println!("{counts:#?}");
        println!("truth events so far: {}", truth.events.len());
        anyhow::Ok(())
    })
}

fn backfill(args: &BackfillArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path)?,
        None => {
            let start = OffsetDateTime::parse(&args.start, &Rfc3339)
                .with_context(|| format!("--start {:?} is not RFC 3339", args.start))?;
            let mut s = Scenario::plain(args.meters, args.days, args.seed, start);
            s.interval_minutes = args.interval_minutes;
            s.validate()?;
            s
        }
    };
    let meters = scenario.fleet.meters();
    let steps_per_day = 1440 / u64::from(scenario.interval_minutes);
    let total_steps = steps_per_day * u64::from(scenario.days);
    let mut engine = Engine::new(scenario);
    let ids: Vec<String> = engine
        .population()
        .meters
        .iter()
        .map(|m| m.id.as_str().to_owned())
        .collect();
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut out = match &args.out {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path:?}"))?,
        )),
        None => None,
    };
    let started = Instant::now();
    let mut delivered = 0u64;
    let mut write_error: Option<std::io::Error> = None;
    let mut sink = |e: &simulators::engine::Emission| {
        let copies = match e.delivery {
            Delivery::Lost => 0,
            Delivery::Duplicate => 2,
            Delivery::Normal | Delivery::Corrupt => 1,
        };
        delivered += copies;
        if let Some(w) = out.as_mut()
            && write_error.is_none()
        {
            for _ in 0..copies {
                let line = serde_json::json!({
                    "meter": ids.get(e.meter as usize),
                    "ts": unix(e.meter_ts).format(&Rfc3339).unwrap_or_default(),
                    "volume_m3": e.register_m3().to_string(),
                    "battery_pct": e.battery_pct,
                    "corrupt": e.delivery == Delivery::Corrupt,
                });
                if let Err(err) = writeln!(w, "{line}") {
                    write_error = Some(err);
                }
            }
        }
    };
    while !engine.finished() {
        engine.step(&mut sink);
        bar.inc(1);
        if engine.stats().steps.is_multiple_of(steps_per_day) {
            bar.set_message(format!("day {}", engine.stats().steps / steps_per_day));
        }
    }
    bar.finish_and_clear();
    if let Some(err) = write_error {
        return Err(err).context("writing readings");
    }
    if let Some(mut w) = out {
        w.flush().context("writing readings")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    let truth = engine.ground_truth();
    let meter_days = f64::from(meters) * f64::from(engine.scenario().days);
    let inflow: i64 = truth.dmas.iter().map(|d| d.inflow_l).sum();
    let registered: i64 = truth.dmas.iter().map(|d| d.registered_l).sum();
    let nrw = if inflow > 0 {
        100.0 * (inflow - registered) as f64 / inflow as f64
    } else {
        0.0
    };
    println!("scenario          {}", truth.scenario);
    println!("meters            {meters}");
    println!(
        "simulated         {} days, {} .. {}",
        engine.scenario().days,
        truth.start.format(&Rfc3339)?,
        truth.end.format(&Rfc3339)?
    );
    println!(
        "readings          {} produced, {delivered} delivered",
        stats.readings
    );
    println!(
        "link faults       {} lost, {} duplicated, {} corrupted, {} reordered",
        stats.lost, stats.duplicated, stats.corrupted, stats.reordered
    );
    println!("truth events      {}", truth.events.len());
    println!(
        "water balance     inflow {:.1} m3, registered {:.1} m3, non-revenue {nrw:.1} %",
        inflow as f64 / 1000.0,
        registered as f64 / 1000.0
    );
    println!(
        "elapsed           {elapsed:.2} s, {:.0} meter-days/s, {:.0} readings/s",
        meter_days / elapsed,
        stats.readings as f64 / elapsed
    );
    Ok(())
}
