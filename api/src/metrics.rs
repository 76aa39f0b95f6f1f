//! Prometheus metrics: request rate, latency histogram and errors per route, and
//! authentication failures per client and address (text format, no registry crate: a handful
//! of counters do not justify one).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Most distinct (client, address) pairs counted; beyond it failures count under `other`,
/// so a flood of forged client ids cannot grow memory without bound.
const MAX_AUTH_SERIES: usize = 1000;

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: HashMap<(String, &'static str, u16), u64>,
    latency: HashMap<String, Histogram>,
    errors: HashMap<(String, &'static str), u64>,
    auth_failures: HashMap<(String, String, &'static str), u64>,
    counters: HashMap<&'static str, u64>,
    approvals: HashMap<(String, &'static str), u64>,
}

/// The API's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Counts one request of `route` (the matched path template).
    pub fn request(
        &self,
        route: &str,
        method: &'static str,
        status: u16,
        error: Option<&'static str>,
        took: Duration,
    ) {
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        *m.requests
            .entry((route.to_owned(), method, status))
            .or_default() += 1;
        let h = m.latency.entry(route.to_owned()).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b
                && let Some(c) = h.buckets.get_mut(i)
            {
                *c += 1;
            }
        }
        h.count += 1;
        h.sum += s;
        if let Some(code) = error {
            *m.errors.entry((route.to_owned(), code)).or_default() += 1;
        }
    }

    /// Counts an authentication failure of `client` from `address`.
    pub fn auth_failure(&self, client: &str, address: &str, reason: &'static str) {
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        let key = (client.to_owned(), address.to_owned(), reason);
        let key = if m.auth_failures.contains_key(&key) || m.auth_failures.len() < MAX_AUTH_SERIES {
            key
        } else {
            ("other".to_owned(), "other".to_owned(), reason)
        };
        *m.auth_failures.entry(key).or_default() += 1;
    }

    /// Counts a second-approver event of `action` (`requested`, `approved`, `rejected`,
    /// `executed`, `failed`).
    pub fn approval(&self, action: &str, outcome: &'static str) {
        if let Ok(mut m) = self.inner.lock() {
            *m.approvals.entry((action.to_owned(), outcome)).or_default() += 1;
        }
    }

    /// Adds `n` to a plain counter.
    pub fn add(&self, name: &'static str, n: u64) {
        if let Ok(mut m) = self.inner.lock() {
            *m.counters.entry(name).or_default() += n;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let Ok(m) = self.inner.lock() else {
            return String::new();
        };
        let mut out = String::new();
        out.push_str("# TYPE api_requests_total counter\n");
        let mut reqs: Vec<_> = m.requests.iter().collect();
        reqs.sort();
        for ((route, method, status), n) in reqs {
            writeln!(
                out,
                "api_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                esc(route)
            )
            .unwrap_or_default();
        }
        out.push_str("# TYPE api_request_errors_total counter\n");
        let mut errs: Vec<_> = m.errors.iter().collect();
        errs.sort();
        for ((route, code), n) in errs {
            writeln!(
                out,
                "api_request_errors_total{{route=\"{}\",code=\"{code}\"}} {n}",
                esc(route)
            )
            .unwrap_or_default();
        }
        out.push_str("# TYPE api_request_duration_seconds histogram\n");
        let mut lat: Vec<_> = m.latency.iter().collect();
        lat.sort_by(|a, b| a.0.cmp(b.0));
        for (route, h) in lat {
            let r = esc(route);
            for (b, c) in BUCKETS.iter().zip(h.buckets.iter()) {
                writeln!(
                    out,
                    "api_request_duration_seconds_bucket{{route=\"{r}\",le=\"{b}\"}} {c}"
                )
                .unwrap_or_default();
            }
            writeln!(
                out,
                "api_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            )
            .unwrap_or_default();
            writeln!(
                out,
                "api_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                h.sum
            )
            .unwrap_or_default();
            writeln!(
                out,
                "api_request_duration_seconds_count{{route=\"{r}\"}} {}",
                h.count
            )
            .unwrap_or_default();
        }
        out.push_str("# TYPE api_auth_failures_total counter\n");
        let mut af: Vec<_> = m.auth_failures.iter().collect();
        af.sort();
        for ((client, addr, reason), n) in af {
            writeln!(
                out,
                "api_auth_failures_total{{client=\"{}\",address=\"{}\",reason=\"{reason}\"}} {n}",
                esc(client),
                esc(addr)
            )
            .unwrap_or_default();
        }
        out.push_str("# TYPE api_approvals_total counter\n");
        let mut ap: Vec<_> = m.approvals.iter().collect();
        ap.sort();
        for ((action, outcome), n) in ap {
            writeln!(
                out,
                "api_approvals_total{{action=\"{}\",outcome=\"{outcome}\"}} {n}",
                esc(action)
            )
            .unwrap_or_default();
        }
        let mut cs: Vec<_> = m.counters.iter().collect();
        cs.sort();
        for (name, n) in cs {
            writeln!(out, "# TYPE {name} counter\n{name} {n}").unwrap_or_default();
        }
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
