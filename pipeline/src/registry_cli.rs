//! `pipeline registry …`: the meter registry from the command line (docs/registry.md). Every
//! subcommand is a thin wrapper over `pipeline::registry`, which the API calls too.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use pipeline::registry::{self, Book, Cycle, MeterInput, MeterModel, Replacement, Role};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A `gateways` row: id, online, firmware, last seen, published, applied, last refusal,
/// spool depth, uplink lag, health time, uplink connected, readings acknowledged.
type GatewayRow = (
    String,
    Option<bool>,
    Option<String>,
    Option<OffsetDateTime>,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<f64>,
    Option<OffsetDateTime>,
    Option<bool>,
    Option<i64>,
);

#[derive(clap::Args)]
pub(crate) struct RegistryArgs {
    /// Who makes the change (audit log).
    #[arg(long, global = true, default_value = "pipeline registry")]
    actor: String,
    #[command(subcommand)]
    command: RegistryCommand,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2025-11-01T08:00:00+08:00: {e}"))
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Imports a registry CSV (columns in docs/registry.md): all rows or none.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Check everything and report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Writes the registry as CSV (the import's columns) to stdout or `--out`.
    Export {
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Registers a meter in stock.
    Register {
        /// The utility's meter number.
        #[arg(long)]
        meter_no: String,
        /// Protocol address (`cjt188:…`, `mbus:…`, `modbus:…`).
        #[arg(long)]
        meter_id: String,
        /// Meter model code.
        #[arg(long)]
        model: Option<String>,
        /// Meter book code.
        #[arg(long)]
        book: Option<String>,
        /// DMA.
        #[arg(long)]
        dma: Option<String>,
        /// customer | inlet | outlet | hydrant | pressure.
        #[arg(long, default_value = "customer")]
        role: String,
        /// Serving gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Source on that gateway.
        #[arg(long)]
        source: Option<String>,
        /// Key reference (name in the gateway's key file).
        #[arg(long)]
        key_ref: Option<String>,
    },
    /// in_stock → installed.
    Install {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Installation time (default now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
    },
    /// installed | faulty → active.
    Activate {
        /// Meter number.
        #[arg(long)]
        meter: String,
    },
    /// installed | active → faulty.
    MarkFaulty {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Records a replacement (IF-METER-002) and re-validates the reads held since.
    Replace {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Final reading of the old device, m³.
        #[arg(long)]
        old_final: Decimal,
        /// Initial reading of the new device, m³.
        #[arg(long)]
        new_initial: Decimal,
        /// Time of the swap (default now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
        /// Meter number of a new device registered under its own number (the old one then
        /// becomes `replaced`).
        #[arg(long)]
        successor: Option<String>,
    },
    /// Takes a meter out of service for good.
    Retire {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Time (default now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
    },
    /// Binds a customer account to a meter.
    Bind {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Customer account.
        #[arg(long)]
        account: String,
        /// Time (default now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
    },
    /// Ends the meter's customer binding.
    Unbind {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Time (default now).
        #[arg(long, value_parser = parse_time)]
        at: Option<OffsetDateTime>,
    },
    /// Moves a meter to another meter book.
    MoveBook {
        /// Meter number.
        #[arg(long)]
        meter: String,
        /// Book code.
        #[arg(long)]
        book: String,
    },
    /// Creates or renames a meter book (a book keeps its cycle).
    Book {
        /// Book code.
        #[arg(long)]
        code: String,
        /// Name.
        #[arg(long)]
        name: String,
        /// Meter reader.
        #[arg(long)]
        reader: Option<String>,
        /// monthly | bimonthly.
        #[arg(long, default_value = "monthly")]
        cycle: String,
    },
    /// Creates or replaces a meter model and its status-bit map.
    Model {
        /// Model code.
        #[arg(long)]
        code: String,
        /// Manufacturer.
        #[arg(long, default_value = "")]
        manufacturer: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// `bit=meaning`, repeated (e.g. `--bit 5=magnetic_tamper --bit 0=valve_closed`).
        #[arg(long = "bit")]
        bits: Vec<String>,
    },
    /// Publishes every changed gateway device set (retained, versioned).
    PublishDeviceSets {
        #[command(flatten)]
        mqtt: MqttArgs,
        /// Publish every set again, changed or not (new versions only for changed ones).
        #[arg(long)]
        force: bool,
    },
    /// Runs the registry ↔ gateway sync until Ctrl-C: gateway status and device-set reports
    /// into `gateways`, device sets republished on every registry change.
    Sync {
        #[command(flatten)]
        mqtt: MqttArgs,
        /// Seconds between device-set checks without a change notification.
        #[arg(long, default_value_t = 60)]
        republish_s: u64,
    },
    /// Lists gateways (online, firmware, device-set versions) and meters heard through an
    /// unexpected gateway.
    Gateways,
}

#[derive(clap::Args)]
struct MqttArgs {
    /// MQTT broker URL.
    #[arg(long, env = "MQTT_URL", default_value = pipeline::config::DEFAULT_MQTT_URL)]
    mqtt_url: String,
    /// Topic root.
    #[arg(long, env = "WM_TOPIC_ROOT", default_value = "wm/v1")]
    topic_root: String,
    /// MQTT client id base.
    #[arg(long, default_value = "wm-registry")]
    client_id: String,
}

pub(crate) async fn run(pool: sqlx::PgPool, args: RegistryArgs) -> anyhow::Result<()> {
    let actor = args.actor.as_str();
    let now = OffsetDateTime::now_utc();
    match args.command {
        RegistryCommand::Import { file, dry_run } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let r = registry::csv::import(&pool, &text, actor, dry_run)
                .await
                .with_context(|| format!("import of {} refused", file.display()))?;
            println!(
                "{}{} rows: {} created, {} updated, {} unchanged",
                if r.dry_run {
                    "dry run (nothing written): "
                } else {
                    ""
                },
                r.rows,
                r.created,
                r.updated,
                r.unchanged
            );
        }
        RegistryCommand::Export { out } => {
            let csv = registry::csv::export(&pool).await?;
            match out {
                Some(p) => std::fs::write(&p, csv)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{csv}"),
            }
        }
        RegistryCommand::Register {
            meter_no,
            meter_id,
            model,
            book,
            dma,
            role,
            gateway,
            source,
            key_ref,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role {role:?}: customer, inlet, outlet, hydrant or pressure");
            };
            let m = MeterInput {
                protocol: registry::protocol_of(&meter_id).to_owned(),
                meter_no,
                meter_id,
                model_code: model,
                meter_book: book,
                dma,
                role,
                gateway_id: gateway,
                gateway_source: source,
                key_ref,
                ..MeterInput::default()
            };
            registry::register(&pool, &m, actor).await?;
            println!("registered {} ({}), in_stock", m.meter_no, m.meter_id);
        }
        RegistryCommand::Install { meter, at } => {
            let s = registry::install(&pool, &meter, at.unwrap_or(now), actor).await?;
            println!("{meter}: {s}");
        }
        RegistryCommand::Activate { meter } => {
            let s = registry::activate(&pool, &meter, actor).await?;
            println!("{meter}: {s}");
        }
        RegistryCommand::MarkFaulty { meter, reason } => {
            let s = registry::mark_faulty(&pool, &meter, &reason, actor).await?;
            println!("{meter}: {s}");
        }
        RegistryCommand::Replace {
            meter,
            old_final,
            new_initial,
            at,
            successor,
        } => {
            let o = registry::replace(
                &pool,
                &meter,
                &Replacement {
                    at: at.unwrap_or(now),
                    old_final,
                    new_initial,
                    successor,
                },
                actor,
            )
            .await?;
            println!(
                "{meter}: replacement recorded; held reads re-validated {}, still rejected {}",
                o.revalidated, o.still_rejected
            );
        }
        RegistryCommand::Retire { meter, at } => {
            let s = registry::retire(&pool, &meter, at.unwrap_or(now), actor).await?;
            println!("{meter}: {s}");
        }
        RegistryCommand::Bind { meter, account, at } => {
            let changed =
                registry::bind_customer(&pool, &meter, &account, at.unwrap_or(now), actor).await?;
            println!(
                "{meter}: {}",
                if changed {
                    "bound to "
                } else {
                    "already bound to "
                }
                .to_owned()
                    + &account
            );
        }
        RegistryCommand::Unbind { meter, at } => {
            let changed =
                registry::unbind_customer(&pool, &meter, at.unwrap_or(now), actor).await?;
            println!(
                "{meter}: {}",
                if changed {
                    "unbound"
                } else {
                    "had no customer"
                }
            );
        }
        RegistryCommand::MoveBook { meter, book } => {
            registry::move_book(&pool, &meter, &book, actor).await?;
            println!("{meter}: moved to book {book}");
        }
        RegistryCommand::Book {
            code,
            name,
            reader,
            cycle,
        } => {
            let Some(cycle) = Cycle::parse(&cycle) else {
                bail!("--cycle {cycle:?}: monthly or bimonthly");
            };
            registry::save_book(
                &pool,
                &Book {
                    code: code.clone(),
                    name,
                    reader,
                    cycle,
                },
                actor,
            )
            .await?;
            println!("book {code} saved ({})", cycle.as_str());
        }
        RegistryCommand::Model {
            code,
            manufacturer,
            description,
            bits,
        } => {
            let status_bits = bits
                .iter()
                .map(|b| {
                    let (bit, meaning) = b
                        .split_once('=')
                        .with_context(|| format!("--bit {b:?}: give bit=meaning"))?;
                    let bit: u8 = bit
                        .trim()
                        .parse()
                        .with_context(|| format!("--bit {b:?}: the bit is 0..15"))?;
                    Ok((bit, meaning.trim().to_owned()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            registry::save_model(
                &pool,
                &MeterModel {
                    code: code.clone(),
                    manufacturer,
                    description,
                    status_bits,
                },
                actor,
            )
            .await?;
            println!("model {code} saved");
        }
        RegistryCommand::PublishDeviceSets { mqtt, force } => {
            let published = registry::sync::publish_device_sets(
                &pool,
                &mqtt.mqtt_url,
                &mqtt.client_id,
                &mqtt.topic_root,
                force,
            )
            .await?;
            if published.is_empty() {
                println!("no device set changed");
            }
            for p in published {
                println!(
                    "{}: version {} ({} devices) on {}",
                    p.gateway,
                    p.version,
                    p.devices,
                    registry::sync::device_set_topic(&mqtt.topic_root, &p.gateway)
                );
            }
        }
        RegistryCommand::Sync { mqtt, republish_s } => {
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                tokio::signal::ctrl_c().await.ok();
                stop.send(true).ok();
            });
            registry::sync::run(
                pool,
                registry::sync::SyncOptions {
                    broker_url: mqtt.mqtt_url,
                    root: mqtt.topic_root,
                    client_id: mqtt.client_id,
                    republish_every: std::time::Duration::from_secs(republish_s.max(1)),
                },
                shutdown,
            )
            .await?;
        }
        RegistryCommand::Gateways => {
            let rows: Vec<GatewayRow> = sqlx::query_as(
                "SELECT gateway_id, online, firmware, last_seen, device_set_version,
                            device_set_applied, device_set_error, spool_depth, uplink_lag_s,
                            health_at, (status->'health'->>'uplink_connected')::boolean,
                            (status->'health'->>'readings_acked')::bigint
                     FROM gateways ORDER BY gateway_id",
            )
            .fetch_all(&pool)
            .await
            .context("reading gateways (is the schema applied? `pipeline migrate`)")?;
            for (g, online, fw, seen, published, applied, error, depth, lag, at, up, acked) in rows
            {
                let health = match (depth, lag, at) {
                    (Some(d), Some(l), Some(at)) => format!(
                        " health at {}: spool depth {d} uplink lag {l:.0} s uplink {} acked {}",
                        at.format(&Rfc3339).unwrap_or_default(),
                        match up {
                            Some(true) => "connected",
                            Some(false) => "disconnected",
                            None => "?",
                        },
                        acked.map_or_else(|| "?".into(), |a| a.to_string()),
                    ),
                    _ => " health never reported".into(),
                };
                println!(
                    "{g}: {} firmware {} last seen {} device set published {published} applied {}{}{health}",
                    match online {
                        Some(true) => "online",
                        Some(false) => "offline",
                        None => "never seen",
                    },
                    fw.as_deref().unwrap_or("?"),
                    seen.and_then(|t| t.format(&Rfc3339).ok())
                        .unwrap_or_else(|| "never".into()),
                    applied.map_or_else(|| "?".into(), |a| a.to_string()),
                    error
                        .map(|e| format!(" (refused: {e})"))
                        .unwrap_or_default()
                );
            }
            let odd: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT f.meter_id, f.gateway_id, m.gateway_id FROM meter_last_frame f
                 LEFT JOIN meters m USING (meter_id) WHERE f.unexpected ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .context("reading last frames")?;
            for (m, g, expected) in odd {
                println!(
                    "unexpected: {m} heard through {g}, registered on {}",
                    expected.as_deref().unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}
