//! The storage of a cluster on Ceph: a throwaway Ceph cluster of its own (ceph_fixture's
//! OwnCluster, so a test may kill an OSD) and N `holdfast target` gateways serving the
//! cluster kit's LUNs from RBD images, gateway i on 127.0.0.i, TPGT i, ALUA port group i.
//!
//! Every image is created with `--image-feature layering`, without the exclusive lock:
//! each gateway then reports active/optimized and a dead gateway costs the others no
//! lock break-up (docs/CEPH.md), which is what keeps a VM on another path within the
//! agent's io_timeout. The quorum LUN keeps 512-byte blocks, so the agent's one-block
//! COMPARE AND WRITE is one compare-and-write in one object.

use super::ceph_fixture::{OwnCluster, POOL};
use holdfast::cli::cluster_kit::{GroupSpec, Launch, Layout};
use holdfast::server::config::{AluaConfig, AluaPeer, CephConfig, Config};
use std::net::SocketAddr;
use std::process::Child;

pub struct Gateways {
    pub ceph: OwnCluster,
    /// Gateway i's portal is `portals[i - 1]`.
    pub portals: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
}

/// Gateway `i`'s portal: 127.0.0.i on the layout's port.
fn portal(kit: &Layout, i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i as u8], kit.addr.port()))
}

impl Gateways {
    /// Start the Ceph cluster, create the images and start `n` gateways (1–9); the
    /// first gateway's portal is `kit.addr`.
    pub fn start(kit: &Layout, groups: &[GroupSpec], n: u16) -> Gateways {
        assert!((1..10).contains(&n), "1 to 9 gateways");
        assert_eq!(kit.addr, portal(kit, 1), "gateway 1 listens on kit.addr");
        let ceph = OwnCluster::start(&format!("gw{}", kit.addr.port()));
        let mut g = Gateways {
            ceph,
            portals: (1..=n).map(|i| portal(kit, i)).collect(),
            children: vec![],
        };
        let cfg = kit.target_config(groups);
        for lun in &cfg.targets[0].luns {
            let mib = (lun.size.0 >> 20).max(1).to_string();
            g.ceph.rbd(&[
                "create",
                "--size",
                &format!("{mib}M"),
                "--image-feature",
                "layering",
                &image_spec(lun.id),
            ]);
        }
        for i in 1..=n {
            let child = g.spawn(kit, groups, i);
            g.children.push(Some(child));
        }
        g
    }

    fn spawn(&self, kit: &Layout, groups: &[GroupSpec], i: u16) -> Child {
        let dir = kit.path(&format!("gw{i}"));
        std::fs::create_dir_all(&dir).expect("gateway dir");
        let path = dir.join("target.toml");
        holdfast::cli::cluster_kit::write_toml(&path, "", &self.config(kit, groups, i))
            .expect("gateway config");
        let launch = Launch {
            log_filter: "info",
            leash: false,
        };
        kit.spawn(
            &["target".as_ref(), "--config".as_ref(), path.as_os_str()],
            &format!("gw{i}.log"),
            &launch,
        )
        .expect("spawn a gateway")
    }

    /// The kit's target with its LUNs on RBD, served on gateway `i`'s portal.
    fn config(&self, kit: &Layout, groups: &[GroupSpec], i: u16) -> Config {
        let mut cfg = kit.target_config(groups);
        cfg.data_dir = kit.path(&format!("gw{i}/data"));
        let ceph = format!(
            "conf = \"{}\"\nclient = \"client.holdfast\"\n",
            self.ceph.conf().display()
        );
        cfg.ceph = Some(toml::from_str::<CephConfig>(&ceph).expect("[ceph]"));
        cfg.alua = AluaConfig {
            group: i,
            peers: (1..=self.portals.len() as u16)
                .filter(|&p| p != i)
                .map(|group| AluaPeer {
                    group,
                    ports: vec![],
                })
                .collect(),
        };
        let t = &mut cfg.targets[0];
        t.portals[0].listen = self.portals[usize::from(i) - 1].to_string();
        t.portals[0].tpgt = i;
        for lun in &mut t.luns {
            lun.path = Default::default();
            lun.rbd = Some(image_spec(lun.id));
        }
        cfg
    }

    /// Node `id`'s portals: every gateway, starting from gateway ((id - 1) mod N) + 1,
    /// so the nodes spread over the gateways.
    pub fn portals_for(&self, id: u16) -> Vec<String> {
        let n = self.portals.len();
        (0..n)
            .map(|k| self.portals[(usize::from(id) - 1 + k) % n].to_string())
            .collect()
    }

    /// kill -9 of gateway `i`.
    pub fn kill(&mut self, i: u16) {
        if let Some(mut c) = self.children[usize::from(i) - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The gateways' pids (running ones).
    pub fn pids(&self) -> Vec<i32> {
        self.children
            .iter()
            .flatten()
            .map(|c| c.id() as i32)
            .collect()
    }

    pub fn count(&self) -> u16 {
        self.portals.len() as u16
    }
}

/// LUN `id`'s image.
fn image_spec(id: u64) -> String {
    format!("{POOL}/lun{id}")
}

impl Drop for Gateways {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
