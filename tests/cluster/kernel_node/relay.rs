//! A TCP relay between the guest's kernel initiator and the target that can hold what
//! the initiator sends and then drop its connections, so that a freeze catches a write
//! that is certainly outstanding (issued by the guest, never seen by the target).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Relay {
    /// The relay's port on 127.0.0.1 (10.0.2.2 in the guest).
    pub port: u16,
    held: watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relay every connection to `target`, passing bytes both ways.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
        let port = listener.local_addr().expect("relay address").port();
        let (held, rx) = watch::channel(false);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((from, _)) = listener.accept().await {
                let Ok(to) = TcpStream::connect(target).await else {
                    continue;
                };
                let task = tokio::spawn(relay(from, to, rx.clone()));
                list.lock().expect("relay list").push(task);
            }
        });
        Relay {
            port,
            held,
            conns,
            accept,
        }
    }

    /// From now on nothing the initiator sends reaches the target (until `cut`).
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Close every connection, discarding what was held, and pass new ones freely.
    pub fn cut(&self) {
        for task in self.conns.lock().expect("relay list").drain(..) {
            task.abort();
        }
        self.held.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// One connection: initiator to target unless held, target to initiator always.
async fn relay(from: TcpStream, to: TcpStream, mut held: watch::Receiver<bool>) {
    let (mut from_r, mut from_w) = from.into_split();
    let (mut to_r, mut to_w) = to.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from_r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            // Bytes read while held wait here; `cut` aborts the task and drops them.
            if held.wait_for(|h| !*h).await.is_err() {
                return Ok(());
            }
            to_w.write_all(&buf[..n]).await?;
        }
    };
    let down = tokio::io::copy(&mut to_r, &mut from_w);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
