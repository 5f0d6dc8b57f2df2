//! A fake systemd: the Unix datagram socket a service's NOTIFY_SOCKET names, with every
//! line received kept in order, so a test can wait for READY=1, STATUS=…, WATCHDOG=1.
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct NotifySocket {
    path: PathBuf,
    /// (when received, line)
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    /// Bind `path` and collect what arrives on it from now on.
    pub fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, st) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !st.load(Ordering::SeqCst) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let mut v = l.lock().unwrap();
                v.extend(text.lines().map(|x| (now, x.to_string())));
            }
        });
        NotifySocket {
            path: path.to_path_buf(),
            lines,
            stop,
        }
    }

    /// The socket's path, for NOTIFY_SOCKET.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every line received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// When each line equal to `line` arrived.
    pub fn times_of(&self, line: &str) -> Vec<Instant> {
        let v = self.lines.lock().unwrap();
        v.iter()
            .filter(|(_, l)| l == line)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Wait for the first line received after the first `skip` lines that satisfies
    /// `pred`; returns it and its index. Panics with all lines after `timeout`.
    pub fn wait_for(
        &self,
        skip: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let end = Instant::now() + timeout;
        loop {
            let v = self.lines();
            if let Some(i) = (skip..v.len()).find(|&i| pred(&v[i])) {
                return (i, v[i].clone());
            }
            assert!(
                Instant::now() < end,
                "no {what} on the notify socket within {timeout:?}; received: {v:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
