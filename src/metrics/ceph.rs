//! Series of the RBD gateways' shared state, per image ("POOL/IMAGE"): probes sent
//! because image I/O stalled behind another gateway's lock, gateways this one fenced
//! (blocklisted), PR watches lost and recovered. Process-wide statics: the RBD watcher
//! threads run outside any runtime and need no handle; every [`TargetMetrics`]
//! registers the same families, so a scrape sees them.
//!
//! [`TargetMetrics`]: super::target::TargetMetrics

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabel {
    image: String,
}

#[derive(Debug, Default)]
pub struct CephMetrics {
    stall_probes: Family<ImageLabel, Counter>,
    gateways_fenced: Family<ImageLabel, Counter>,
    watches_lost: Family<ImageLabel, Counter>,
    watches_recovered: Family<ImageLabel, Counter>,
}

static CEPH: LazyLock<CephMetrics> = LazyLock::new(CephMetrics::default);

/// The process's series.
pub fn get() -> &'static CephMetrics {
    &CEPH
}

fn inc(f: &Family<ImageLabel, Counter>, image: &str) {
    f.get_or_create(&ImageLabel {
        image: image.to_owned(),
    })
    .inc();
}

impl CephMetrics {
    pub fn stall_probe(&self, image: &str) {
        inc(&self.stall_probes, image);
    }

    pub fn gateway_fenced(&self, image: &str) {
        inc(&self.gateways_fenced, image);
    }

    pub fn watch_lost(&self, image: &str) {
        inc(&self.watches_lost, image);
    }

    pub fn watch_recovered(&self, image: &str) {
        inc(&self.watches_recovered, image);
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "holdfast_rbd_stall_probes",
            "Probes of the other gateways because image I/O stalled while another held the \
             image's exclusive lock",
            self.stall_probes.clone(),
        );
        r.register(
            "holdfast_rbd_gateways_fenced",
            "Gateways this one blocklisted for not acknowledging a notice on the PR object",
            self.gateways_fenced.clone(),
        );
        r.register(
            "holdfast_rbd_pr_watches_lost",
            "Times this gateway lost its watch on an image's PR object (NOT READY until \
             recovered)",
            self.watches_lost.clone(),
        );
        r.register(
            "holdfast_rbd_pr_watches_recovered",
            "Times this gateway re-established its PR watch and re-read the state",
            self.watches_recovered.clone(),
        );
    }
}
