//! Prometheus metrics of the target and the agent (`--metrics ADDR`, or the `metrics`
//! config key): the series each role keeps ([`target`], [`agent`]), a lock-free
//! duration histogram ([`histogram`]) and the HTTP endpoint that serves them
//! ([`http`]). Every series is named `holdfast_*`.

pub mod agent;
pub mod ceph;
pub mod histogram;
pub mod http;
pub mod target;

use prometheus_client::registry::Registry;

/// `registry` in the exposition `format` asked for.
pub fn encode(registry: &Registry, format: http::Format) -> String {
    let mut out = String::new();
    let r = match format {
        http::Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
        http::Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        }
    };
    // Writing into a String cannot fail; an encoder error would be a bug in a label.
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}
