//! CPU accounting of one bench phase, read from `/proc` (Linux).
//!
//! Wall-clock rates on this shared 2-core machine swing 3–10× with the other work on it; the
//! CPU seconds each process spends per reading swing far less. On an idle machine with `n`
//! cores a CPU-bound phase runs at about `n / (CPU seconds per reading)`, so the CPU figures
//! predict the idle rate from a loaded run.
//!
//! Counted per phase: this process (utime + stime of `/proc/self/stat`; the sampler thread's
//! own time taken out), the PostgreSQL processes serving the phase's database (backends and
//! autovacuum workers whose title names it; sampled every half second so a backend that ends
//! during the phase still counts), PostgreSQL's shared background processes (checkpointer,
//! background writer, WAL writer, launchers: they also serve every other database on the
//! server, so they are reported apart and left out of the totals) and the broker process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Units of utime and stime in `/proc/*/stat`: USER_HZ, 100 on every Linux architecture the
/// kernel reports to user space with (`sysconf(_SC_CLK_TCK)`, `getconf CLK_TCK`).
const TICKS_PER_S: f64 = 100.0;

/// How often the PostgreSQL processes are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Titles of PostgreSQL's shared background processes (`postgres: 15/main: checkpointer`).
const BACKGROUND: [&str; 7] = [
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "archiver",
    "stats collector",
];

/// The fields of a `/proc/.../stat` file after the command name: field 3 (state) is index 0.
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = s.get(s.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a `/proc/.../stat` file, seconds.
pub(crate) fn stat_cpu_s(path: &Path) -> Option<f64> {
    let fields = stat_fields(path)?;
    // utime (14) and stime (15) are indexes 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_S)
}

/// The parent pid (field 4) of a `/proc/.../stat` file.
fn stat_ppid(path: &Path) -> Option<u32> {
    stat_fields(path)?.get(1)?.parse().ok()
}

/// CPU seconds of this whole process so far (every thread, ended ones included).
pub(crate) fn process_cpu_s() -> f64 {
    stat_cpu_s(Path::new("/proc/self/stat")).unwrap_or(0.0)
}

/// CPU seconds of the calling thread so far, from `schedstat` (nanoseconds) when the kernel
/// keeps it, else from its `stat` (10 ms ticks).
pub(crate) fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or_else(
            || stat_cpu_s(Path::new("/proc/thread-self/stat")).unwrap_or(0.0),
            |ns| ns as f64 / 1e9,
        )
}

/// CPU seconds of process `pid` so far.
pub(crate) fn pid_cpu_s(pid: u32) -> Option<f64> {
    stat_cpu_s(Path::new(&format!("/proc/{pid}/stat")))
}

/// The 1-minute load average.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join("/"))
        .unwrap_or_else(|| "?".into())
}

/// Which PostgreSQL processes count for a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgClass {
    /// Serves the phase's database.
    Ours,
    /// Shared by every database.
    Background,
}

/// The PostgreSQL processes of interest now: pid → (class, CPU seconds). With `cluster` (a
/// postmaster's pid) only that cluster's processes, its children: the shared server's
/// background processes run beside a private cluster with the same titles.
pub(crate) fn scan_postgres(db: &str, cluster: Option<u32>) -> HashMap<u32, (PgClass, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let base = entry.path();
        if !std::fs::read_to_string(base.join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            continue;
        }
        if let Some(postmaster) = cluster
            && stat_ppid(&base.join("stat")) != Some(postmaster)
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(base.join("cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Backends and autovacuum workers: `postgres: 15/main: <user> <db> <host> <state>`,
        // `postgres: 15/main: autovacuum worker <db>` (the private cluster's are named
        // `wm-bench:`).
        let class = if title.split_whitespace().any(|w| w == db) {
            PgClass::Ours
        } else if title.starts_with("postgres:") && BACKGROUND.iter().any(|b| title.contains(b)) {
            PgClass::Background
        } else {
            continue;
        };
        if let Some(cpu) = stat_cpu_s(&base.join("stat")) {
            out.insert(pid, (class, cpu));
        }
    }
    out
}

/// What one phase cost, in CPU seconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhaseCpu {
    /// Wall-clock seconds between start and stop.
    pub(crate) wall_s: f64,
    /// This process, without the sampler thread.
    pub(crate) bench_s: f64,
    /// The PostgreSQL backends (and autovacuum workers) of the phase's database.
    pub(crate) postgres_s: f64,
    /// PostgreSQL's shared background processes (not in [`PhaseCpu::total_s`]).
    pub(crate) postgres_background_s: f64,
    /// The broker, when its process is known.
    pub(crate) broker_s: Option<f64>,
    /// Load average at the start and at the end.
    pub(crate) load: (String, String),
}

impl PhaseCpu {
    /// This process + the phase's PostgreSQL backends + the broker.
    pub(crate) fn total_s(&self) -> f64 {
        self.bench_s + self.postgres_s + self.broker_s.unwrap_or(0.0)
    }
}

/// PostgreSQL processes seen during a phase: pid → (class, CPU at first sight, at last sight).
type Seen = HashMap<u32, (PgClass, f64, f64)>;

/// Measures one phase from [`CpuMeter::start`] to [`CpuMeter::stop`].
pub(crate) struct CpuMeter {
    started: Instant,
    process_at_start: f64,
    broker: Option<(u32, f64)>,
    load_at_start: String,
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<(Seen, f64)>,
}

impl CpuMeter {
    /// Starts measuring: `db` names the phase's database, `broker` the broker's pid if known,
    /// `cluster` the postmaster of a private PostgreSQL cluster (then only its processes count).
    pub(crate) fn start(
        db: &str,
        broker: Option<u32>,
        cluster: Option<u32>,
    ) -> anyhow::Result<Self> {
        let db = db.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sampler = std::thread::Builder::new()
            .name("bench-cpu-sampler".into())
            .spawn(move || {
                let own_start = thread_cpu_s();
                // pid → (class, CPU at first sight, CPU at last sight)
                let mut seen: Seen = scan_postgres(&db, cluster)
                    .into_iter()
                    .map(|(pid, (class, cpu))| (pid, (class, cpu, cpu)))
                    .collect();
                ready_tx.send(()).ok();
                let mut last = Instant::now();
                loop {
                    let stopping = stopping.load(Ordering::Relaxed);
                    if stopping || last.elapsed() >= SAMPLE_EVERY {
                        for (pid, (class, cpu)) in scan_postgres(&db, cluster) {
                            seen.entry(pid)
                                // Born during the phase: all of its time is the phase's.
                                .or_insert((class, 0.0, 0.0))
                                .2 = cpu;
                        }
                        last = Instant::now();
                    }
                    if stopping {
                        return (seen, thread_cpu_s() - own_start);
                    }
                    // Parks for the rest of the interval; `stop` unparks it at once.
                    std::thread::park_timeout(SAMPLE_EVERY.saturating_sub(last.elapsed()));
                }
            })?;
        ready_rx.recv().ok();
        Ok(Self {
            started: Instant::now(),
            process_at_start: process_cpu_s(),
            broker: broker.and_then(|pid| Some((pid, pid_cpu_s(pid)?))),
            load_at_start: load_average(),
            stop,
            sampler,
        })
    }

    /// Stops measuring and returns the phase's CPU.
    pub(crate) fn stop(self) -> PhaseCpu {
        let wall_s = self.started.elapsed().as_secs_f64();
        let broker_s = self
            .broker
            .and_then(|(pid, at_start)| Some(pid_cpu_s(pid)? - at_start));
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.thread().unpark();
        let (seen, sampler_s) = self.sampler.join().unwrap_or_default();
        let process_s = process_cpu_s() - self.process_at_start;
        let mut out = PhaseCpu {
            wall_s,
            bench_s: (process_s - sampler_s).max(0.0),
            broker_s,
            load: (self.load_at_start, load_average()),
            ..PhaseCpu::default()
        };
        for (class, first, last) in seen.into_values() {
            let used = (last - first).max(0.0);
            match class {
                PgClass::Ours => out.postgres_s += used,
                PgClass::Background => out.postgres_background_s += used,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let dir = std::env::temp_dir().join(format!("wm-bench-cpu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stat");
        // A command name with spaces and a parenthesis; utime 250, stime 50 ticks.
        std::fs::write(
            &path,
            "42 (post gres) x) S 1 42 42 0 -1 4194304 10 0 0 0 250 50 7 9 20 0 1 0 4276 0 0",
        )
        .unwrap();
        assert_eq!(stat_cpu_s(&path), Some(3.0));
        assert_eq!(stat_ppid(&path), Some(1));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn this_thread_and_process_use_cpu() {
        let t0 = thread_cpu_s();
        let p0 = process_cpu_s();
        let mut x = 0u64;
        let started = Instant::now();
        // Until this thread has run 50 ms (a loaded machine gives it less than the wall time).
        while thread_cpu_s() - t0 < 0.05 && started.elapsed() < Duration::from_secs(20) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        assert!(x != 7);
        let used = thread_cpu_s() - t0;
        assert!(used >= 0.05, "thread cpu {used}");
        // The process counts it too (in 10 ms ticks).
        assert!(process_cpu_s() - p0 >= 0.04);
    }
}
