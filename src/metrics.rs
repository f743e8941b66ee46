//! Prometheus metrics: the registry, every metric family Outpost exports, the process
//! metrics read from `/proc` at scrape time, and the exposition served at `/metrics`:
//! the Prometheus text format 0.0.4 by default, OpenMetrics when the client asks for it.
//! Every family is listed (HELP and TYPE) from start-up, with or without series.
//!
//! Labels are closed sets (route names, result kinds, configured upstream names), never
//! anything a client controls, so cardinality stays bounded and no secret or repository
//! name can reach a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub upstream: String,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `hit`, `miss`, `revalidated`, `stale`, `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub upstream: String,
    /// `cache` (served from disk) or `upstream` (streamed while downloading).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `accepted`, `rejected`, `throttled`, `denied`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorRunLabels {
    pub job: String,
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// A registered family, for listing it while it has no series.
struct Described {
    /// The family name as OpenMetrics writes it (prefixed; a counter without `_total`).
    name: String,
    help: &'static str,
    kind: &'static str,
}

/// Every metric Outpost exports. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    described: Vec<Described>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram>,
    pub cache: Family<CacheLabels, Counter>,
    pub bytes_served: Family<BytesLabels, Counter>,
    pub coalesced: Family<UpstreamLabels, Counter>,
    pub upstream_up: Family<UpstreamLabels, Gauge>,
    pub ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    pub evicted_blobs: Counter,
    pub evicted_bytes: Counter,
    pub stored_bytes: Gauge,
    pub auth: Family<AuthLabels, Counter>,
    pub mirror_runs: Family<MirrorRunLabels, Counter>,
    pub mirror_running: Family<MirrorLabels, Gauge>,
    pub mirror_last_success: Family<MirrorLabels, Gauge>,
    pub mirror_last_duration: Family<MirrorLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub mirror_bytes: Family<MirrorLabels, Counter>,
    pub mirror_tags_changed: Family<MirrorLabels, Counter>,
    pub mirror_tags_failed: Family<MirrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outpost");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ])
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head, by route",
            request_seconds.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Pull-through requests by upstream, kind and result (hit, miss, revalidated, stale, error)",
            cache.clone(),
        );
        let bytes_served = Family::<BytesLabels, Counter>::default();
        registry.register(
            "cache_served_bytes",
            "Blob bytes announced to clients, from disk or streamed from the upstream",
            bytes_served.clone(),
        );
        let coalesced = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "cache_coalesced_requests",
            "Requests that joined an upstream fetch already in flight",
            coalesced.clone(),
        );
        let upstream_up = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_up",
            "1 while the upstream answers (the last request or probe got a response, it is not hung) and its circuit breaker is closed; 0 otherwise",
            upstream_up.clone(),
        );
        let ratelimit_remaining = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_remaining",
            "Last ratelimit-remaining the upstream announced (Docker Hub)",
            ratelimit_remaining.clone(),
        );
        let evicted_blobs = Counter::default();
        registry.register(
            "evicted_blobs",
            "Upstream blobs evicted to keep storage.max_size",
            evicted_blobs.clone(),
        );
        let evicted_bytes = Counter::default();
        registry.register(
            "evicted_bytes",
            "Bytes of upstream blobs evicted",
            evicted_bytes.clone(),
        );
        let stored_bytes = Gauge::default();
        registry.register(
            "stored_bytes",
            "Bytes of blobs stored, as of the last size check",
            stored_bytes.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_decisions",
            "Authentication and authorization outcomes",
            auth.clone(),
        );
        let mirror_runs = Family::<MirrorRunLabels, Counter>::default();
        registry.register(
            "mirror_runs",
            "Mirror job runs by job and result",
            mirror_runs.clone(),
        );
        let mirror_running = Family::<MirrorLabels, Gauge>::default();
        registry.register(
            "mirror_running",
            "Mirror jobs running now (1) or not (0)",
            mirror_running.clone(),
        );
        let mirror_last_success = Family::<MirrorLabels, Gauge>::default();
        registry.register(
            "mirror_last_success_timestamp_seconds",
            "When the job's last successful run ended (Unix seconds)",
            mirror_last_success.clone(),
        );
        let mirror_last_duration =
            Family::<MirrorLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "mirror_last_run_duration_seconds",
            "How long the job's last run took",
            mirror_last_duration.clone(),
        );
        let mirror_bytes = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_fetched_bytes",
            "Blob bytes mirror jobs fetched from their upstream",
            mirror_bytes.clone(),
        );
        let mirror_tags_changed = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_tags_changed",
            "Tags a mirror job added or moved",
            mirror_tags_changed.clone(),
        );
        let mirror_tags_failed = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_tags_failed",
            "Selected tags a mirror run could not mirror",
            mirror_tags_failed.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "The running Outpost's version (always 1)",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let described = DESCRIBED
            .iter()
            .map(|(name, help, kind)| Described {
                name: format!("outpost_{name}"),
                help,
                kind,
            })
            .collect();
        Metrics {
            registry,
            described,
            requests,
            request_seconds,
            cache,
            bytes_served,
            coalesced,
            upstream_up,
            ratelimit_remaining,
            evicted_blobs,
            evicted_bytes,
            stored_bytes,
            auth,
            mirror_runs,
            mirror_running,
            mirror_last_success,
            mirror_last_duration,
            mirror_bytes,
            mirror_tags_changed,
            mirror_tags_failed,
        }
    }

    /// Counts one pull-through answer.
    pub fn cache_result(&self, upstream: &str, kind: &'static str, result: &'static str) {
        self.cache
            .get_or_create(&CacheLabels {
                upstream: upstream.to_owned(),
                kind,
                result,
            })
            .inc();
    }

    /// Counts a request that joined an upstream fetch in flight.
    pub fn coalesced(&self, upstream: &str) {
        self.coalesced
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }

    /// Counts blob bytes announced to a client.
    pub fn served_bytes(&self, upstream: &str, source: &'static str, bytes: u64) {
        self.bytes_served
            .get_or_create(&BytesLabels {
                upstream: upstream.to_owned(),
                source,
            })
            .inc_by(bytes);
    }

    /// Counts one authentication or authorization outcome.
    pub fn auth_result(&self, result: &'static str) {
        self.auth.get_or_create(&AuthLabels { result }).inc();
    }

    /// The exposition: OpenMetrics 1.0 when `openmetrics`, else the Prometheus text
    /// format 0.0.4 (what `promtool check metrics` and most scrapers expect).
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut encoded = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut encoded, &self.registry);
        let mut out = encoded
            .strip_suffix("# EOF\n")
            .unwrap_or(&encoded)
            .to_owned();
        let present: std::collections::HashSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_owned)
            .collect();
        for d in &self.described {
            if !present.contains(&d.name) {
                out.push_str(&format!(
                    "# HELP {} {}.\n# TYPE {} {}\n",
                    d.name, d.help, d.name, d.kind
                ));
            }
        }
        out.push_str(&process_metrics());
        if openmetrics {
            out.push_str("# EOF\n");
            out
        } else {
            to_text_format(&out)
        }
    }
}

/// Every family registered above with labels (so possibly without series yet), as
/// (name without prefix, help, OpenMetrics type). A test checks it matches the registry.
const DESCRIBED: &[(&str, &str, &str)] = &[
    (
        "http_requests",
        "HTTP requests by route and status",
        "counter",
    ),
    (
        "http_request_duration_seconds",
        "Time to the response head, by route",
        "histogram",
    ),
    (
        "cache_requests",
        "Pull-through requests by upstream, kind and result (hit, miss, revalidated, stale, error)",
        "counter",
    ),
    (
        "cache_served_bytes",
        "Blob bytes announced to clients, from disk or streamed from the upstream",
        "counter",
    ),
    (
        "cache_coalesced_requests",
        "Requests that joined an upstream fetch already in flight",
        "counter",
    ),
    (
        "upstream_up",
        "1 while the upstream answers (the last request or probe got a response, it is not hung) and its circuit breaker is closed; 0 otherwise",
        "gauge",
    ),
    (
        "upstream_ratelimit_remaining",
        "Last ratelimit-remaining the upstream announced (Docker Hub)",
        "gauge",
    ),
    (
        "auth_decisions",
        "Authentication and authorization outcomes",
        "counter",
    ),
    (
        "mirror_runs",
        "Mirror job runs by job and result",
        "counter",
    ),
    (
        "mirror_running",
        "Mirror jobs running now (1) or not (0)",
        "gauge",
    ),
    (
        "mirror_last_success_timestamp_seconds",
        "When the job's last successful run ended (Unix seconds)",
        "gauge",
    ),
    (
        "mirror_last_run_duration_seconds",
        "How long the job's last run took",
        "gauge",
    ),
    (
        "mirror_fetched_bytes",
        "Blob bytes mirror jobs fetched from their upstream",
        "counter",
    ),
    (
        "mirror_tags_changed",
        "Tags a mirror job added or moved",
        "counter",
    ),
    (
        "mirror_tags_failed",
        "Selected tags a mirror run could not mirror",
        "counter",
    ),
];

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family is named with
/// its `_total` suffix, `_created` samples, `# UNIT` and `# EOF` lines go.
fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str(&format!("{kind}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                if name.ends_with("_created") {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

/// The process metrics Prometheus client libraries export, read from `/proc/self` at
/// scrape time (Linux), as OpenMetrics lines. What cannot be read is left out.
fn process_metrics() -> String {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, sample: &str, value: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}.\n# TYPE {name} {kind}\n{sample} {value}\n"
        ));
    };
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let cpu = (utime + stime) / ticks;
        put(
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds",
            "process_cpu_seconds_total",
            cpu,
        );
    }
    if let Some(vsize) = field(23) {
        put(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes",
            "process_virtual_memory_bytes",
            vsize,
        );
    }
    if let Some(rss) = field(24) {
        let page = rustix::param::page_size() as f64;
        put(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes",
            "process_resident_memory_bytes",
            rss * page,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    });
    if let (Some(start), Some(boot)) = (field(22), boot) {
        put(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds",
            "process_start_time_seconds",
            boot + start / ticks,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors",
            "process_open_fds",
            dir.count() as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(max) = max_fds {
        put(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors",
            "process_max_fds",
            max,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_with_labels() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "get_blob",
                status: 200,
            })
            .inc();
        m.cache_result("docker.io", "manifest", "stale");
        let text = m.encode(true);
        assert!(text.contains("outpost_http_requests_total{route=\"get_blob\",status=\"200\"} 1"));
        assert!(text.contains(
            "outpost_cache_requests_total{upstream=\"docker.io\",kind=\"manifest\",result=\"stale\"} 1"
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    /// Regression: families with labels appeared only once they had a series, counters
    /// were typed without their `_total` sample name in the text format, and there were
    /// no build or process metrics. Every family is listed from start-up, in both formats.
    #[test]
    fn every_family_is_listed_from_start_up_in_the_prometheus_text_format() {
        let m = Metrics::new();
        let text = m.encode(false);
        for (name, _, kind) in DESCRIBED {
            let name = match *kind {
                "counter" => format!("outpost_{name}_total"),
                _ => format!("outpost_{name}"),
            };
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}:\n{text}"
            );
        }
        assert!(text.contains("outpost_build_info{version=\""), "{text}");
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name}:\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("_created"),
            "{text}"
        );
        // Every TYPE line's family has a HELP line.
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = line.split(' ').next().unwrap_or_default();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        // The listed families are exactly the registered ones.
        let om = m.encode(true);
        let registered = om
            .lines()
            .filter(|l| l.starts_with("# TYPE outpost_"))
            .count();
        assert_eq!(registered, DESCRIBED.len() + 4, "{om}");
    }
}
