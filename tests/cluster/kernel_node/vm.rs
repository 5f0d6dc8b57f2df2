//! The `../shared/vm-initiator` guest from a test: whether it can run here, and its
//! run-guest.sh and QEMU processes (QEMU is the guest's power and clock: SIGKILL cuts the
//! power, SIGSTOP freezes it).

use holdfast::cli::cluster_kit as kit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What running the guest needs: run-guest.sh and a built image.
pub struct VmInitiator {
    run_guest: PathBuf,
}

/// The vm-initiator, or None (with the reason printed) when the test must skip.
pub fn vm_initiator() -> Option<VmInitiator> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = std::env::var_os("HOLDFAST_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared"));
    let images = std::env::var_os("VM_INITIATOR_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/vm-initiator")
        });
    let run_guest = shared.join("vm-initiator/run-guest.sh");
    let missing = if std::env::var("SKIP_VM").as_deref() == Ok("1") {
        Some("SKIP_VM=1".to_string())
    } else if !run_guest.is_file() {
        Some(format!("{} missing", run_guest.display()))
    } else if let Some(f) = ["vmlinuz", "initrd.img", "root.img"]
        .iter()
        .find(|f| !images.join(f).is_file())
    {
        Some(format!(
            "guest image {} missing (run {}/vm-initiator/build-image.sh)",
            images.join(f).display(),
            shared.display()
        ))
    } else if !Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("qemu-system-x86_64 not installed".to_string())
    } else {
        None
    };
    match missing {
        None => Some(VmInitiator { run_guest }),
        Some(why) if std::env::var("HOLDFAST_VM_TESTS").as_deref() == Ok("require") => {
            panic!("kernel_node: HOLDFAST_VM_TESTS=require but {why}")
        }
        Some(why) => {
            eprintln!("SKIP kernel_node: {why}");
            None
        }
    }
}

/// run-guest.sh with guest-node.sh, and its QEMU.
pub struct Guest {
    run_guest: Child,
    qemu: i32,
}

impl Guest {
    /// `run-guest.sh SCRIPT OPTIONS`, output to `out`; returns once its QEMU runs.
    pub fn boot(vmi: &VmInitiator, script: &Path, options: &[String], out: &Path) -> Guest {
        let log = std::fs::File::create(out).expect("guest output file");
        let err = log.try_clone().expect("guest output file");
        let mut run_guest = Command::new(&vmi.run_guest)
            .arg(script)
            .args(options)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start run-guest.sh");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let qemu = kit::children_of(run_guest.id())
                .into_iter()
                .find(|&p| is_qemu(p));
            if let Some(qemu) = qemu {
                return Guest { run_guest, qemu };
            }
            if Instant::now() > end || matches!(run_guest.try_wait(), Ok(Some(_))) {
                let _ = run_guest.kill();
                let _ = run_guest.wait();
                let text = std::fs::read_to_string(out).unwrap_or_default();
                panic!("no QEMU under run-guest.sh:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether run-guest.sh has ended (and how).
    pub fn ended(&mut self) -> Option<ExitStatus> {
        self.run_guest.try_wait().ok().flatten()
    }

    /// Wait until every thread of QEMU is stopped (after SIGSTOP), up to 2 s.
    pub fn wait_stopped(&self) {
        let end = Instant::now() + Duration::from_secs(2);
        while !kit::all_threads_stopped(self.qemu) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send `sig` to QEMU: SIGKILL is a power cut, SIGSTOP a frozen host.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of QEMU, a child of our run-guest.sh child that is still
        // running (run-guest.sh reaps it only when it exits, and we have not waited).
        unsafe { libc::kill(self.qemu, sig) };
    }

    /// Wait up to `timeout` for run-guest.sh to end; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.run_guest.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.run_guest.try_wait() {
            self.signal(libc::SIGCONT);
            self.signal(libc::SIGKILL);
            // run-guest.sh then sees QEMU gone and exits.
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.run_guest.kill();
                let _ = self.run_guest.wait();
            }
        }
    }
}

fn is_qemu(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu-system"))
}
