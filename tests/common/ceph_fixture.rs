//! The throwaway Ceph cluster the RBD tests share: tools/ceph-up.sh starts it once per
//! test process (and it is torn down when the process exits), plus `rbd`/`ceph` as
//! client.admin and `rbd export` to read an image straight from RADOS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const POOL: &str = "holdfast";

/// The cluster's directory (ceph.conf, keyrings), started on first use.
pub fn cluster() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(start_cluster)
        .as_deref()
        .unwrap_or_else(|e| panic!("no Ceph test cluster: {e}"))
}

fn start_cluster() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("holdfast-ceph-{}", std::process::id()));
    up(&dir)?;
    Ok(dir)
}

/// tools/ceph-up.sh DIR, torn down by its watchdog when this process exits.
fn up(dir: &Path) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let log_path = format!("{}.log", dir.display());
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    // status(), not output(): the daemons it starts may keep inherited pipes open.
    let st = Command::new(root.join("tools/ceph-up.sh"))
        .arg(dir)
        .env("CEPH_OWNER_PID", std::process::id().to_string())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .map_err(|e| format!("tools/ceph-up.sh: {e}"))?;
    if !st.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(format!(
            "tools/ceph-up.sh failed ({st}): {}",
            tail.join(" | ")
        ));
    }
    let _ = std::fs::remove_file(&log_path);
    Ok(())
}

/// A cluster of one test's own, for faults the shared one must not see (killing an
/// OSD); stopped when dropped.
pub struct OwnCluster {
    pub dir: PathBuf,
}

impl OwnCluster {
    pub fn start(name: &str) -> OwnCluster {
        let dir = std::env::temp_dir().join(format!("holdfast-ceph-{name}-{}", std::process::id()));
        up(&dir).unwrap_or_else(|e| panic!("no Ceph cluster for {name}: {e}"));
        OwnCluster { dir }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// `rbd ARGS` on this cluster; stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        run_rbd(&self.conf(), args)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(root.join("tools/ceph-down.sh"))
            .arg(&self.dir)
            .status();
    }
}

/// `rbd ARGS` as client.admin on the test cluster; stdout.
pub fn rbd(args: &[&str]) -> String {
    run_rbd(&cluster().join("ceph.conf"), args)
}

fn run_rbd(conf: &Path, args: &[&str]) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh image of `mib` MiB, named after the test.
pub fn image(name: &str, mib: u64) -> String {
    let spec = format!("{POOL}/{name}-{}", std::process::id());
    rbd(&["create", "--size", &format!("{mib}M"), &spec]);
    spec
}

/// The image's bytes as `rbd export` sees them (straight from RADOS, not via holdfast).
pub fn export(spec: &str) -> Vec<u8> {
    let out = cluster().join(format!("export-{}", spec.replace('/', "-")));
    let _ = std::fs::remove_file(&out);
    rbd(&[
        "export",
        "--no-progress",
        spec,
        out.to_str().expect("utf-8 path"),
    ]);
    let data = std::fs::read(&out).expect("read export");
    let _ = std::fs::remove_file(&out);
    data
}

/// `ceph ARGS` as client.admin on the test cluster: (success, stdout, stderr).
pub fn ceph(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ceph")
        .arg("-c")
        .arg(cluster().join("ceph.conf"))
        .args(args)
        .output()
        .expect("run ceph");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
