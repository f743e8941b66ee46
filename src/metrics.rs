//! Prometheus metrics: the registry, every metric family Outpost
//! exports, and the text exposition served at `/metrics`.
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

/// Every metric Outpost exports. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
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
            "1 while the upstream's circuit breaker is closed, 0 while open or probing",
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
        Metrics {
            registry,
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

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
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
        let text = m.encode();
        assert!(text.contains("outpost_http_requests_total{route=\"get_blob\",status=\"200\"} 1"));
        assert!(text.contains(
            "outpost_cache_requests_total{upstream=\"docker.io\",kind=\"manifest\",result=\"stale\"} 1"
        ));
        assert!(text.ends_with("# EOF\n"));
    }
}
