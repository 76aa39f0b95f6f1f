//! `pipeline review …`: the review queue from the command line (docs/operations.md, "Review
//! queue"); a thin wrapper over `pipeline::review`, which the API calls too.

use anyhow::{Context, bail};
use clap::Subcommand;
use pipeline::review::{self, Decision, Filter, ItemKind};
use rust_decimal::Decimal;

#[derive(clap::Args)]
pub(crate) struct ReviewArgs {
    /// Who acts (audit log).
    #[arg(long, global = true, default_value = "pipeline review")]
    actor: String,
    #[command(subcommand)]
    command: ReviewCommand,
}

#[derive(Subcommand)]
enum ReviewCommand {
    /// Adds what arose since the last collect (idempotent).
    Collect,
    /// Lists items, oldest first.
    List {
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
        /// Only this kind (out_of_order_read, rejected_read, ingest_reject, bill_held, field_visit).
        #[arg(long)]
        kind: Option<String>,
        /// Only this owner.
        #[arg(long)]
        owner: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Gives an item an owner.
    Assign {
        /// Item id.
        id: i64,
        /// New owner.
        owner: String,
    },
    /// Sends an ingest reject's message again onto its topic (MQTT_URL), once its cause is fixed.
    Reprocess {
        /// Item id.
        id: i64,
        /// Why (required).
        #[arg(long)]
        note: String,
        /// MQTT broker URL.
        #[arg(long, env = "MQTT_URL", default_value = pipeline::config::DEFAULT_MQTT_URL)]
        mqtt_url: String,
    },
    /// Decides an item: accept, edit --value V, estimate, reject or dismiss, with a note saying why.
    Resolve {
        /// Item id.
        id: i64,
        /// accept | edit | estimate | reject | dismiss.
        decision: String,
        /// New value (edit only).
        #[arg(long)]
        value: Option<Decimal>,
        /// Why (required).
        #[arg(long)]
        note: String,
    },
}

pub(crate) async fn run(pool: sqlx::PgPool, args: ReviewArgs) -> anyhow::Result<()> {
    match args.command {
        ReviewCommand::Collect => {
            let c = review::collect(&pool).await?;
            println!("{}", serde_json::to_string(&c)?);
        }
        ReviewCommand::List {
            all,
            kind,
            owner,
            limit,
        } => {
            let kind = match kind {
                Some(k) => {
                    Some(ItemKind::parse(&k).with_context(|| format!("unknown item kind {k:?}"))?)
                }
                None => None,
            };
            let items = review::list(
                &pool,
                &Filter {
                    open_only: !all,
                    kind,
                    owner,
                    limit,
                },
            )
            .await?;
            for i in items {
                println!(
                    "{:>6} {:<18} {:<28} opened {} owner {} {}{} {}",
                    i.item_id,
                    i.kind,
                    i.meter_id.as_deref().unwrap_or("-"),
                    i.opened_at,
                    i.owner.as_deref().unwrap_or("-"),
                    i.status,
                    i.resolution.map(|r| format!(" ({r})")).unwrap_or_default(),
                    i.subject
                );
            }
        }
        ReviewCommand::Assign { id, owner } => {
            review::assign(&pool, id, &owner, &args.actor).await?;
            println!("item {id} assigned to {owner}");
        }
        ReviewCommand::Reprocess { id, note, mqtt_url } => {
            let broker = pipeline::config::broker_url(&mqtt_url)?;
            let republisher = review::MqttRepublisher { broker };
            review::reprocess(&pool, id, &republisher, &args.actor, &note).await?;
            println!("item {id} reprocessed: its message was published again");
        }
        ReviewCommand::Resolve {
            id,
            decision,
            value,
            note,
        } => {
            let decision = match (decision.as_str(), value) {
                ("accept", None) => Decision::Accept,
                ("edit", Some(v)) => Decision::Edit(v),
                ("edit", None) => bail!("edit needs --value"),
                ("reject", None) => Decision::Reject,
                ("estimate", None) => Decision::Estimate,
                ("dismiss", None) => Decision::Dismiss,
                (d, Some(_)) if ["accept", "reject", "estimate", "dismiss"].contains(&d) => {
                    bail!("--value applies to edit only")
                }
                (d, _) => {
                    bail!("unknown decision {d:?}: accept, edit, estimate, reject or dismiss")
                }
            };
            let item = review::resolve(&pool, id, decision, &args.actor, &note).await?;
            println!(
                "item {id} resolved: {}",
                item.resolution.unwrap_or_default()
            );
        }
    }
    Ok(())
}
