//! `pipeline control …`: the command service and control rules for operators (the API calls
//! the same library functions, `pipeline::control`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use model::{CommandAction, MeterId};
use pipeline::control::rules::{self, ArrearsPolicy, NoticeKind};
use pipeline::control::{self, IssueRequest, calendar::Calendar, hydrant, service};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Arguments of `pipeline control`.
#[derive(Args)]
pub(crate) struct ControlArgs {
    #[command(subcommand)]
    command: ControlCommand,
}

#[derive(Subcommand)]
enum ControlCommand {
    /// Runs the control service (outbox publisher, ack consumer, rules) until Ctrl-C.
    Serve(ServeArgs),
    /// Issues a command (idempotent by --id).
    Issue(IssueArgs),
    /// Cancels a pending command.
    Cancel(ByIdArgs),
    /// Retries a failed or expired command as a new id linked to it.
    Retry(ByIdArgs),
    /// Shows a command and its history.
    Show {
        /// Command id.
        #[arg(long)]
        id: String,
    },
    /// Lists a device's commands, newest first.
    List {
        /// Device (meter id).
        #[arg(long)]
        device: String,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Records a payment demand or advance notice sent for a meter's arrears.
    Notice(NoticeArgs),
    /// Runs the arrears rule once now (closes, deferrals, refusals, reopens).
    ArrearsRun(PolicyArgs),
    /// Approves arrears closes held for bulk approval.
    Approve {
        /// The approving person.
        #[arg(long)]
        by: String,
        /// Only these meters (default: every held one).
        #[arg(long = "meter")]
        meters: Vec<String>,
    },
    /// Shows the rule decisions about a meter with their inputs.
    Decisions {
        /// Meter id.
        #[arg(long)]
        meter: String,
    },
    /// Hydrant permits (EXT-1001).
    #[command(subcommand)]
    Permit(PermitCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// MQTT broker URL.
    #[arg(long, env = "MQTT_URL", default_value = pipeline::config::DEFAULT_MQTT_URL)]
    mqtt_url: String,
    /// Topic root.
    #[arg(long, env = "WM_TOPIC_ROOT", default_value = "wm/v1")]
    topic_root: String,
    /// MQTT client id.
    #[arg(long, default_value = "wm-control")]
    client_id: String,
    /// Seconds between sweeps (expiry, telemetry confirmation, permits, illegal use).
    #[arg(long, default_value_t = 2)]
    sweep_s: u64,
    /// Run the arrears rule (closes and reopens).
    #[arg(long)]
    arrears: bool,
    /// Seconds between arrears runs.
    #[arg(long, default_value_t = 60)]
    arrears_interval_s: u64,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The arrears policy's settings.
#[derive(Args, Clone)]
pub(crate) struct PolicyArgs {
    /// Working-day calendar (TOML; default: the shipped `calendars/cn.toml`).
    #[arg(long)]
    calendar: Option<PathBuf>,
    /// Days between the advance notice and the earliest close.
    #[arg(long, default_value_t = 5)]
    notice_days: i64,
    /// More eligible closes than this in one run wait for approval.
    #[arg(long, default_value_t = 20)]
    bulk_threshold: usize,
}

impl PolicyArgs {
    /// The policy.
    pub(crate) fn policy(&self) -> anyhow::Result<ArrearsPolicy> {
        let calendar = match &self.calendar {
            Some(p) => Calendar::load(p)?,
            None => Calendar::builtin()?,
        };
        if self.notice_days < 0 {
            bail!("--notice-days must not be negative");
        }
        Ok(ArrearsPolicy {
            notice_period: time::Duration::days(self.notice_days),
            bulk_threshold: self.bulk_threshold,
            calendar,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ActionArg {
    ValveOpen,
    ValveClose,
    HydrantLock,
    SetTime,
    MbusReset,
    ModbusWrite,
    /// An on-demand poll of a Modbus or wired M-Bus meter.
    ReadNow,
}

#[derive(Args)]
struct IssueArgs {
    /// Idempotency key.
    #[arg(long)]
    id: String,
    /// Target device (registry meter id).
    #[arg(long)]
    device: String,
    /// What to do (hydrant unlocks go through `permit unlock`).
    #[arg(long, value_enum)]
    action: ActionArg,
    /// Register for modbus-write.
    #[arg(long)]
    register: Option<u16>,
    /// Value for modbus-write.
    #[arg(long)]
    value: Option<u16>,
    /// Issuer (`user:<name>`).
    #[arg(long)]
    by: String,
    /// Why.
    #[arg(long)]
    reason: String,
    /// Cause as a JSON object (alarm, bill, work order).
    #[arg(long, default_value = "{}")]
    cause: String,
    /// 0..=9, 9 most urgent.
    #[arg(long, default_value_t = control::PRIORITY_DEFAULT)]
    priority: u8,
    /// Approver, where approval is required.
    #[arg(long)]
    approver: Option<String>,
    /// Lifetime in hours.
    #[arg(long, default_value_t = 48)]
    ttl_h: i64,
}

#[derive(Args)]
struct ByIdArgs {
    /// Command id.
    #[arg(long)]
    id: String,
    /// Who.
    #[arg(long)]
    by: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum NoticeArg {
    PaymentDemand,
    AdvanceNotice,
}

#[derive(Args)]
struct NoticeArgs {
    /// Meter id.
    #[arg(long)]
    meter: String,
    /// Which notice.
    #[arg(long, value_enum)]
    kind: NoticeArg,
    /// When it was sent (RFC 3339).
    #[arg(long, value_parser = parse_ts)]
    sent_at: OffsetDateTime,
    /// Who records it.
    #[arg(long)]
    by: String,
}

#[derive(Subcommand)]
enum PermitCommand {
    /// Stores a permit.
    Create {
        /// Permit number.
        #[arg(long)]
        id: String,
        /// Hydrant (`hydrant:<id>`).
        #[arg(long)]
        hydrant: String,
        /// Holder.
        #[arg(long)]
        holder: String,
        /// Window start (RFC 3339).
        #[arg(long, value_parser = parse_ts)]
        from: OffsetDateTime,
        /// Window end (RFC 3339).
        #[arg(long, value_parser = parse_ts)]
        to: OffsetDateTime,
        /// Volume limit, m³.
        #[arg(long)]
        volume_limit: Option<Decimal>,
        /// Issuer.
        #[arg(long)]
        by: String,
    },
    /// Unlocks the permit's hydrant now (only inside the window).
    Unlock(ByIdArgs),
    /// Revokes a permit (the hydrant is locked by the service).
    Revoke(ByIdArgs),
}

fn parse_ts(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("{s:?} is not RFC 3339: {e}"))
}

fn print_issued(i: &control::Issued) {
    let what = if i.created { "issued" } else { "exists" };
    println!(
        "{what} {} ({} on {} via {}, state {})",
        i.command.id,
        control::action_name(&i.command.action),
        i.command.device,
        i.command.gateway,
        i.command.state.as_str()
    );
    for s in &i.superseded {
        println!("superseded {s}");
    }
}

fn print_decision(d: &rules::Decision) {
    println!(
        "{} {} {}: {}{}",
        d.rule,
        d.meter,
        d.outcome,
        d.reason,
        d.command
            .as_ref()
            .map(|c| format!(" [{c}]"))
            .unwrap_or_default()
    );
}

/// Runs `pipeline control …`.
pub(crate) async fn run(pool: sqlx::PgPool, args: ControlArgs) -> anyhow::Result<()> {
    match args.command {
        ControlCommand::Serve(a) => {
            let mut config = service::ServiceConfig::new(&a.mqtt_url, &a.topic_root, &a.client_id)?;
            config.sweep_interval = std::time::Duration::from_secs(a.sweep_s.max(1));
            config.arrears_interval = std::time::Duration::from_secs(a.arrears_interval_s.max(1));
            if a.arrears {
                config.arrears = Some(a.policy.policy()?);
            }
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                tokio::signal::ctrl_c().await.ok();
                stop.send(true).ok();
            });
            service::run(pool, config, shutdown).await?;
        }
        ControlCommand::Issue(a) => {
            let action = match a.action {
                ActionArg::ValveOpen => CommandAction::ValveOpen,
                ActionArg::ValveClose => CommandAction::ValveClose,
                ActionArg::HydrantLock => CommandAction::HydrantLock,
                ActionArg::SetTime => CommandAction::SetTime,
                ActionArg::MbusReset => CommandAction::MbusApplicationReset,
                ActionArg::ReadNow => CommandAction::ReadNow,
                ActionArg::ModbusWrite => match (a.register, a.value) {
                    (Some(register), Some(value)) => CommandAction::ModbusWrite { register, value },
                    _ => bail!("modbus-write needs --register and --value"),
                },
            };
            let device = MeterId::new(a.device.clone())
                .map_err(|e| anyhow::anyhow!("--device {:?}: {e}", a.device))?;
            let mut req = IssueRequest::new(a.id, device, action, a.by, a.reason);
            req.cause = serde_json::from_str(&a.cause).context("--cause is not JSON")?;
            req.priority = a.priority;
            req.approver = a.approver;
            req.ttl = time::Duration::hours(a.ttl_h);
            print_issued(&control::issue(&pool, &req).await?);
        }
        ControlCommand::Cancel(a) => match control::cancel(&pool, &a.id, &a.by).await? {
            control::Cancelled::Withdrawn => println!("cancelled {} (not yet published)", a.id),
            control::Cancelled::Requested(c) => {
                println!("cancel requested as {c}; the gateway reports the outcome")
            }
        },
        ControlCommand::Retry(a) => print_issued(&control::retry(&pool, &a.id, &a.by).await?),
        ControlCommand::Show { id } => {
            let c = control::get(&pool, &id).await?;
            println!(
                "{} {} on {} via {}: {} (priority {}, by {}, reason {:?}, cause {}, parent {:?}, superseded by {:?}, expires {})",
                c.id,
                control::action_name(&c.action),
                c.device,
                c.gateway,
                c.state.as_str(),
                c.priority,
                c.issued_by,
                c.reason,
                c.cause,
                c.parent,
                c.superseded_by,
                c.expires_at
            );
            for e in control::events(&pool, &id).await? {
                println!(
                    "  {} {} {}",
                    e.at,
                    e.state,
                    e.detail.map(|d| d.to_string()).unwrap_or_default()
                );
            }
        }
        ControlCommand::List { device, limit } => {
            for c in control::list(&pool, &device, limit).await? {
                println!(
                    "{} {} {} {}",
                    c.issued_at,
                    c.id,
                    control::action_name(&c.action),
                    c.state.as_str()
                );
            }
        }
        ControlCommand::Notice(a) => {
            let kind = match a.kind {
                NoticeArg::PaymentDemand => NoticeKind::PaymentDemand,
                NoticeArg::AdvanceNotice => NoticeKind::AdvanceNotice,
            };
            rules::record_notice(&pool, &a.meter, kind, a.sent_at, &a.by).await?;
            println!("recorded {} for {}", kind.as_str(), a.meter);
        }
        ControlCommand::ArrearsRun(p) => {
            let report = rules::arrears_run(&pool, &p.policy()?, OffsetDateTime::now_utc()).await?;
            for d in &report.decisions {
                print_decision(d);
            }
            println!(
                "{} closed, {} reopened (the control service publishes them)",
                report.closed.len(),
                report.reopened.len()
            );
        }
        ControlCommand::Approve { by, meters } => {
            let list = (!meters.is_empty()).then_some(meters.as_slice());
            let approved = rules::approve_arrears(&pool, &by, list).await?;
            println!(
                "approved {} held closes: {}",
                approved.len(),
                approved.join(", ")
            );
        }
        ControlCommand::Decisions { meter } => {
            for d in rules::decisions(&pool, &meter).await? {
                print_decision(&d);
                println!("  inputs {}", d.inputs);
            }
        }
        ControlCommand::Permit(p) => match p {
            PermitCommand::Create {
                id,
                hydrant: h,
                holder,
                from,
                to,
                volume_limit,
                by,
            } => {
                let created = hydrant::create_permit(
                    &pool,
                    &hydrant::Permit {
                        id: id.clone(),
                        hydrant: h,
                        holder,
                        valid_from: from,
                        valid_to: to,
                        volume_limit_m3: volume_limit,
                        issued_by: by,
                    },
                )
                .await?;
                println!("{} permit {id}", if created { "created" } else { "exists" });
            }
            PermitCommand::Unlock(a) => print_issued(
                &hydrant::unlock(&pool, &a.id, &a.by, OffsetDateTime::now_utc()).await?,
            ),
            PermitCommand::Revoke(a) => {
                hydrant::revoke(&pool, &a.id, &a.by, OffsetDateTime::now_utc()).await?;
                println!("revoked {}; the control service locks the hydrant", a.id);
            }
        },
    }
    Ok(())
}
