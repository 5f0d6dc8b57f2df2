//! A holdfast gateway for the RBD tests: one `holdfast target` process (so one Ceph
//! client of its own) serving one image of the shared throwaway cluster (ceph_fixture)
//! as LUN 0 on one portal, killed when dropped.

use crate::ceph_fixture::cluster;
use crate::common::{clear_unit_attention, TARGET};
use holdfast::initiator::{InitiatorConfig, Session};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test gateway is set up.
pub(crate) struct GatewayConfig<'a> {
    /// Its portal's address (the port is picked free).
    pub ip: &'a str,
    /// Its TPGT, unique across the gateways of one image.
    pub tpgt: u16,
    /// "POOL/IMAGE".
    pub spec: &'a str,
    pub mib: u64,
    /// `[ceph] notify_timeout`; None: the default.
    pub notify_timeout: Option<&'a str>,
    /// With ALUA: the other gateway's port group (this one's is its TPGT).
    pub alua_peer: Option<u16>,
}

pub(crate) struct Gateway {
    dir: tempfile::TempDir,
    child: Child,
    pub(crate) portal: SocketAddr,
    /// Its Prometheus endpoint.
    pub(crate) metrics: SocketAddr,
}

/// A free port on `ip` (bound and released: the gateway binds it right after).
fn free_addr(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn config_text(c: &GatewayConfig, portal: SocketAddr, metrics: SocketAddr) -> String {
    let notify = c
        .notify_timeout
        .map(|t| format!("notify_timeout = \"{t}\"\n"))
        .unwrap_or_default();
    let alua = c
        .alua_peer
        .map(|peer| {
            format!(
                "[alua]\ngroup = {}\n[[alua.peer]]\ngroup = {peer}\n",
                c.tpgt
            )
        })
        .unwrap_or_default();
    format!(
        "data_dir = \"data\"\nmetrics = \"{metrics}\"\n[ceph]\nconf = \"{}\"\n\
         client = \"client.holdfast\"\n{notify}{alua}\
         [[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{portal}\"\n\
         tpgt = {}\n[[target.lun]]\nid = 0\nrbd = \"{}\"\nsize = \"{}MiB\"\n",
        cluster().join("ceph.conf").display(),
        c.tpgt,
        c.spec,
        c.mib
    )
}

impl Gateway {
    /// Gateway `tpgt` of `spec` (8 MiB served) on `ip`, without ALUA.
    pub(crate) async fn start(ip: &str, tpgt: u16, spec: &str, notify_timeout: &str) -> Gateway {
        Gateway::with(&GatewayConfig {
            ip,
            tpgt,
            spec,
            mib: 8,
            notify_timeout: Some(notify_timeout),
            alua_peer: None,
        })
        .await
    }

    /// Start it and wait until its portal accepts connections.
    pub(crate) async fn with(c: &GatewayConfig<'_>) -> Gateway {
        let (portal, metrics) = (free_addr(c.ip), free_addr(c.ip));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, config_text(c, portal, metrics)).expect("config");
        let log = std::fs::File::create(dir.path().join("gw.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["--log", "info", "target", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn holdfast target");
        let mut g = Gateway {
            dir,
            child,
            portal,
            metrics,
        };
        g.wait_up().await;
        g
    }

    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("gateway exited ({st}): {}", self.log());
            }
            if tokio::net::TcpStream::connect(self.portal).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gateway {} not up: {}", self.portal, self.log());
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gw.log")).unwrap_or_default()
    }

    /// A session as `iqn.2026-12.org.holdfast:WHO` with ISID 80 00 00 00 00 `isid_last`,
    /// its power-on unit attention cleared.
    pub(crate) async fn login(&self, who: &str, isid_last: u8) -> Session {
        let mut c = InitiatorConfig::new(
            format!("iqn.2026-12.org.holdfast:{who}"),
            TARGET,
            self.portal,
        );
        c.isid = Some([0x80, 0, 0, 0, 0, isid_last]);
        let s = Session::login(c).await.expect("login");
        clear_unit_attention(&s, 0).await;
        s
    }

    pub(crate) fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
