//! The gateway preamble the suites here repeated (issue 15): a gateway TOML file on the test
//! broker, parsed and started.

use std::path::Path;

use gateway::runtime::Gateway;

/// A gateway TOML file: `gateway_id = gw`, an `[uplink]` to the test broker (client id
/// `<root without slashes>-gw`, topic root `root`, then the lines of `uplink_extra`), the
/// spool in `spool`, metrics on an ephemeral port, then `sources`.
pub(crate) fn gateway_toml(
    gw: &str,
    root: &str,
    spool: &Path,
    uplink_extra: &str,
    sources: &str,
) -> String {
    format!(
        r#"gateway_id = "{gw}"
[uplink]
broker = "{broker}"
client_id = "{cid}-gw"
topic_root = "{root}"
{uplink_extra}[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
{sources}"#,
        broker = testkit::mqtt::broker(),
        cid = root.replace('/', "-"),
        spool = spool.display(),
    )
}

/// Parses `toml` (`name` in its errors) and starts the gateway.
///
/// # Panics
/// When the configuration is invalid or the gateway does not start: the test has failed.
pub(crate) async fn start_gateway(toml: &str, name: &str) -> Gateway {
    let config = edge_config::parse(toml, name.as_ref()).expect("gateway config");
    Gateway::start(config).await.expect("gateway starts")
}

/// A pipeline worker on its own task.
pub(crate) struct RunningWorker {
    /// The worker's task.
    pub(crate) task: tokio::task::JoinHandle<Result<(), pipeline::worker::WorkerError>>,
    /// Its ingest counters.
    pub(crate) metrics: std::sync::Arc<pipeline::ingest::IngestMetrics>,
    /// Send `true` to stop it.
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
}

/// Runs a pipeline worker with `config` on `pool`.
pub(crate) fn spawn_worker(
    config: pipeline::worker::WorkerConfig,
    pool: sqlx::PgPool,
) -> RunningWorker {
    let metrics = std::sync::Arc::new(pipeline::ingest::IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pipeline::worker::run(
        config,
        pool,
        std::sync::Arc::clone(&metrics),
        shutdown,
    ));
    RunningWorker {
        task,
        metrics,
        stop,
    }
}
