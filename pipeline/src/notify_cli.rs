//! `pipeline notify run`: queues alarm notices and delivers the outbox (docs/operations.md,
//! "Notifications"); a thin wrapper over `pipeline::notify`.

use std::path::PathBuf;

use anyhow::Context;
use pipeline::notify::{self, NotifyConfig};
use time::OffsetDateTime;

#[derive(clap::Args)]
pub(crate) struct NotifyArgs {
    /// Channels and alarm routes (TOML, docs/operations.md).
    #[arg(long)]
    config: PathBuf,
    /// Seconds between passes.
    #[arg(long, default_value_t = 10)]
    interval_s: u64,
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
}

pub(crate) async fn run(pool: sqlx::PgPool, args: NotifyArgs) -> anyhow::Result<()> {
    let path = args.config.display().to_string();
    let text =
        std::fs::read_to_string(&args.config).with_context(|| format!("cannot read {path}"))?;
    let config = NotifyConfig::from_toml(&text, &path)?;
    let adapters = config.adapters(&path)?;
    let mut stop = std::pin::pin!(crate::shutdown_signal());
    loop {
        let now = OffsetDateTime::now_utc();
        // Alarms of the last week: older ones were queued by an earlier pass (deduplicated).
        let queued = notify::enqueue_alarm_notices(
            &pool,
            &config.alarm_route,
            now - time::Duration::days(7),
        )
        .await?;
        let report = notify::deliver_due(&pool, &adapters, now, 200).await?;
        if queued > 0 || report != notify::DeliveryReport::default() {
            tracing::info!(
                queued,
                delivered = report.delivered,
                retrying = report.retrying,
                failed = report.failed,
                "notification pass"
            );
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(args.interval_s.max(1))) => {}
            () = &mut stop => return Ok(()),
        }
    }
}
