//! The bench's own PostgreSQL 15 cluster (`--own-postgres`): a fresh cluster in a temporary
//! directory, on a free port of 127.0.0.1, with the ingest configuration docs/operations.md
//! recommends, stopped (`pg_ctl stop -m fast`) and removed when dropped.
//!
//! The shared server runs Debian's defaults (128 MB of shared buffers, 1 GB of WAL between
//! checkpoints, a checkpoint every 5 min), which say little about a production ingest node;
//! this cluster runs what one would run there, so the two can be compared. Durability is
//! not traded for speed: `fsync`, `synchronous_commit` and `full_page_writes` stay on. It
//! uses the same binaries, disk and locale (`C.UTF-8`) as the shared server, so only the
//! configuration differs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

/// Where Debian installs PostgreSQL 15's server programs (not on `PATH`).
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Most shared buffers: beyond a few GB the kernel's page cache serves an ingest node as well,
/// and a larger pool only lengthens checkpoints.
const SHARED_BUFFERS_CAP: u64 = 4 << 30;

/// A running private PostgreSQL cluster.
pub(crate) struct OwnPostgres {
    dir: PathBuf,
    port: u16,
    /// As whom `initdb` and `pg_ctl` run: they refuse root, so `postgres` then.
    run_as: Option<String>,
    postmaster: u32,
}

/// Physical memory in bytes (`MemTotal` of `/proc/meminfo`).
fn memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The ingest configuration for a machine with `memory` bytes of RAM (docs/operations.md,
/// "PostgreSQL settings for ingest", says why each).
pub(crate) fn ingest_settings(memory: u64) -> Vec<(&'static str, String)> {
    let mb = |b: u64| format!("{}MB", b >> 20);
    let shared = (memory / 4).min(SHARED_BUFFERS_CAP);
    vec![
        ("shared_buffers", mb(shared)),
        ("effective_cache_size", mb(memory / 2)),
        ("wal_buffers", "64MB".into()),
        ("max_wal_size", "16GB".into()),
        ("min_wal_size", "2GB".into()),
        ("checkpoint_timeout", "15min".into()),
        ("checkpoint_completion_target", "0.9".into()),
        ("wal_compression", "lz4".into()),
        ("maintenance_work_mem", "512MB".into()),
        ("fsync", "on".into()),
        ("synchronous_commit", "on".into()),
        ("full_page_writes", "on".into()),
    ]
}

/// The effective user id (`Uid:` of `/proc/self/status`), without `libc`.
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `id -u NAME` / `id -g NAME`.
fn id_of(flag: &str, user: &str) -> anyhow::Result<u32> {
    let out = Command::new("id").args([flag, user]).output()?;
    anyhow::ensure!(out.status.success(), "no user `{user}`");
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

impl OwnPostgres {
    /// Creates the cluster (`initdb`, trust authentication on 127.0.0.1 only) and starts it
    /// (`pg_ctl start -w`).
    ///
    /// # Errors
    /// When PostgreSQL 15 is not installed or does not start; its log is in the message.
    pub(crate) fn start() -> anyhow::Result<Self> {
        let run_as = (euid() == Some(0)).then(|| "postgres".to_owned());
        let dir = std::env::temp_dir().join(format!("wm-bench-postgres-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(&dir, Some(id_of("-u", user)?), Some(id_of("-g", user)?))
                .with_context(|| format!("handing {} to {user}", dir.display()))?;
        }
        let mut pg = Self {
            dir,
            port: crate::broker::free_port()?,
            run_as,
            postmaster: 0,
        };
        let settings = ingest_settings(memory_bytes().context("reading /proc/meminfo")?);
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
        )?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        let mut lines = format!(
            "\n# pipeline-bench --own-postgres\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\ncluster_name = 'wm-bench'\n",
            pg.port,
            path_str(&pg.dir)?,
        );
        for (name, value) in &settings {
            lines.push_str(&format!("{name} = '{value}'\n"));
        }
        std::io::Write::write_all(&mut conf, lines.as_bytes())?;
        drop(conf);
        let log = pg.dir.join("postgres.log");
        if let Err(e) = pg.run(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
            ],
        ) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            anyhow::bail!("{e:#}\n{}", log.trim());
        }
        pg.postmaster = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .context("reading postmaster.pid")?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs PostgreSQL's program `program` (as the cluster's owner), failing with its output.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let path = Path::new(BIN).join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} (is PostgreSQL 15 installed?)", path.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The cluster's URL (its `postgres` database).
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's pid: the cluster's processes are its children.
    pub(crate) fn postmaster(&self) -> u32 {
        self.postmaster
    }
}

/// The settings [`ingest_settings`] names, as the server at `admin` runs them (also when it is
/// not the bench's own), `name=value` separated by spaces.
pub(crate) async fn server_settings(
    admin: &sqlx::postgres::PgConnectOptions,
) -> anyhow::Result<String> {
    use sqlx::{ConnectOptions, Connection};
    let names: Vec<&str> = ingest_settings(0).into_iter().map(|(n, _)| n).collect();
    let mut conn = admin.connect().await.context("connecting to PostgreSQL")?;
    let line: String = sqlx::query_scalar(
        "SELECT string_agg(n || '=' || current_setting(n), ' ' ORDER BY i)
         FROM unnest($1::text[]) WITH ORDINALITY AS s(n, i)",
    )
    .bind(&names)
    .fetch_one(&mut conn)
    .await?;
    conn.close().await.ok();
    Ok(line)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // A fast shutdown (open sessions ended, a last checkpoint); only if it fails does
        // `immediate` skip the checkpoint, which is harmless for a cluster about to be removed.
        // Whenever a postmaster may run (its pid file exists), also when `start` failed late.
        let data = self.data();
        // Unknown (permissions): tried anyway, a stop of a stopped cluster only fails.
        if data.join("postmaster.pid").try_exists().unwrap_or(true)
            && let Some(data) = data.to_str()
        {
            let stopped = self.run("pg_ctl", &["stop", "-w", "-m", "fast", "-D", data]);
            if stopped.is_err() {
                self.run("pg_ctl", &["stop", "-w", "-m", "immediate", "-D", data])
                    .ok();
            }
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_buffers_are_a_quarter_of_memory_capped() {
        let get = |memory: u64, name: &str| {
            ingest_settings(memory)
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .unwrap()
        };
        assert_eq!(get(8 << 30, "shared_buffers"), "2048MB");
        assert_eq!(get(64 << 30, "shared_buffers"), "4096MB");
        assert_eq!(get(64 << 30, "effective_cache_size"), "32768MB");
        for durable in ["fsync", "synchronous_commit", "full_page_writes"] {
            assert_eq!(get(8 << 30, durable), "on", "{durable}");
        }
    }

    /// Against the real PostgreSQL 15 installation: the cluster runs the ingest settings, the
    /// CPU accounting finds its processes and only them, and dropping it leaves nothing.
    #[tokio::test]
    async fn a_private_cluster_runs_the_ingest_settings_and_is_gone_when_dropped() {
        use crate::cpu::{PgClass, scan_postgres};
        use sqlx::{ConnectOptions, Connection};
        let pg = OwnPostgres::start().unwrap();
        let admin: sqlx::postgres::PgConnectOptions = pg.url().parse().unwrap();
        let line = server_settings(&admin).await.unwrap();
        for want in [
            "checkpoint_timeout=15min",
            "wal_compression=lz4",
            "wal_buffers=64MB",
            "fsync=on",
            "synchronous_commit=on",
        ] {
            assert!(line.split(' ').any(|s| s == want), "{want} not in {line}");
        }
        let conn = admin.connect().await.unwrap();
        let procs = scan_postgres("postgres", Some(pg.postmaster()));
        let count = |class| procs.values().filter(|(c, _)| *c == class).count();
        // This connection's backend (the settings query's may still be ending).
        assert!(count(PgClass::Ours) >= 1, "{procs:?}");
        // Checkpointer, background writer, WAL writer and the two launchers: the shared
        // server's own five are not counted.
        assert_eq!(count(PgClass::Background), 5, "{procs:?}");
        conn.close().await.ok();
        let (dir, port) = (pg.dir.clone(), pg.port);
        drop(pg);
        assert!(!dir.try_exists().unwrap(), "{} left behind", dir.display());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
