//! The `/metrics` endpoint: a minimal HTTP/1.x responder on a tokio listener. One
//! request per connection, read up to a size and time bound, answered, then the
//! connection is closed. Anything it cannot parse gets a 4xx, never a panic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closed connection is drained of what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// Scrapes served at once; connections beyond are closed at once.
const MAX_CLIENTS: usize = 16;

/// The exposition format a scrape asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, when the scraper's Accept header names it.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (what `promtool check metrics` reads).
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Renders the current metrics in a format.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// What a well-formed request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub format: Format,
}

/// Why a request head was refused, with the status it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("malformed request")]
    Malformed,
    #[error("request head too large")]
    TooLarge,
}

/// Parse a complete request head (everything before the blank line).
pub fn parse_request(head: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(head).map_err(|_| BadRequest::Malformed)?;
    let mut lines = text.split("\r\n");
    let line = lines.next().ok_or(BadRequest::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed);
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(BadRequest::Malformed);
    }
    let mut format = Format::Prometheus;
    for h in lines {
        let (name, value) = h.split_once(':').ok_or(BadRequest::Malformed)?;
        if name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text") {
            format = Format::OpenMetrics;
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        format,
    })
}

/// The complete response to a request head (or to its refusal).
pub fn respond(req: Result<Request, BadRequest>, render: &Render) -> Vec<u8> {
    let (status, ctype, body) = match req {
        Err(BadRequest::Malformed) => ("400 Bad Request", "text/plain", "bad request\n".into()),
        Err(BadRequest::TooLarge) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n".into(),
        ),
        Ok(r) if r.path != "/metrics" => ("404 Not Found", "text/plain", "not found\n".into()),
        Ok(r) if r.method != "GET" && r.method != "HEAD" => {
            ("405 Method Not Allowed", "text/plain", "only GET\n".into())
        }
        Ok(r) => {
            let body = if r.method == "HEAD" {
                String::new()
            } else {
                render(r.format)
            };
            ("200 OK", r.format.content_type(), body)
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A bound metrics listener.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MetricsServer> {
        Ok(MetricsServer {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answer scrapes until `shutdown` turns true.
    pub async fn serve(self, render: Render, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else {
                // Out of descriptors or similar: let it pass rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Over MAX_CLIENTS the stream is dropped: closed without an answer.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &render)).await;
                drop(permit);
            });
        }
    }
}

/// Read one request head, answer it, close.
async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let reply = respond(head.and_then(|h| parse_request(&h)), render);
    stream.write_all(&reply).await?;
    stream.shutdown().await?;
    // Lingering close: read what the client still sends (an oversized head) until it
    // closes, so that closing with unread data (a reset) cannot destroy the answer.
    let mut sink = [0u8; 1024];
    let drain = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

/// The bytes before the first blank line, at most [`MAX_REQUEST`] of them.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, BadRequest>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_blank_line(&buf) {
            buf.truncate(end);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(Err(BadRequest::TooLarge));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(BadRequest::Malformed));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render() -> Render {
        Arc::new(|f| format!("holdfast_x 1 {f:?}\n"))
    }

    fn status(reply: &[u8]) -> String {
        let s = String::from_utf8_lossy(reply);
        s.lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn a_scrape_is_parsed_with_its_format() {
        let r = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0").unwrap();
        assert_eq!(
            (r.path.as_str(), r.format),
            ("/metrics", Format::OpenMetrics)
        );
        let r = parse_request(b"GET /metrics HTTP/1.0").unwrap();
        assert_eq!(r.format, Format::Prometheus);
    }

    #[test]
    fn bad_heads_are_refused_not_panicked_on() {
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET  /metrics HTTP/1.1",
            b"get /metrics HTTP/1.1",
            b"GET metrics HTTP/1.1",
            b"GET /metrics SPDY/3",
            b"GET /metrics HTTP/1.1 extra",
            b"GET /metrics HTTP/1.1\r\nno-colon-header",
            b"\xff\xfe /metrics HTTP/1.1",
        ] {
            assert_eq!(parse_request(bad), Err(BadRequest::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn responses_carry_the_right_status() {
        let r = render();
        let ok = respond(parse_request(b"GET /metrics HTTP/1.1"), &r);
        assert_eq!(status(&ok), "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&ok).ends_with("holdfast_x 1 Prometheus\n"));
        let head = respond(parse_request(b"HEAD /metrics HTTP/1.1"), &r);
        assert!(String::from_utf8_lossy(&head).contains("Content-Length: 0\r\n"));
        let cases: [(&[u8], &str); 3] = [
            (b"GET / HTTP/1.1", "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1", "HTTP/1.1 405 Method Not Allowed"),
            (b"GARBAGE", "HTTP/1.1 400 Bad Request"),
        ];
        for (req, want) in cases {
            assert_eq!(status(&respond(parse_request(req), &r)), want);
        }
        let big = respond(Err(BadRequest::TooLarge), &r);
        assert_eq!(status(&big), "HTTP/1.1 431 Request Header Fields Too Large");
    }

    /// Over real TCP: an oversized head, a peer that closes early and garbage bytes
    /// each get their answer (or none), and the server still answers a scrape after.
    #[tokio::test]
    async fn the_server_survives_hostile_clients() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(server.serve(render(), rx));
        let huge = vec![b'a'; MAX_REQUEST * 2];
        assert!(exchange(addr, &huge).await.starts_with("HTTP/1.1 431"));
        assert!(exchange(addr, b"\x00\x01\x02\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        assert!(exchange(addr, b"GET /metr")
            .await
            .starts_with("HTTP/1.1 400"));
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.contains("holdfast_x 1"),
            "{ok}"
        );
    }

    /// Send `req`, half-close, read the reply to the end.
    async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before it read everything.
        let _ = s.write_all(req).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}
