//! A minimal HTTP/1.x responder on a tokio listener, for the read-only endpoints
//! (`/metrics`, the status page). One request per connection, read up to a size and time
//! bound, answered by a handler, then the connection is closed. Anything it cannot parse
//! gets a 4xx, never a panic; methods other than GET and HEAD get 405.

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
/// Requests served at once; connections beyond are closed at once.
const MAX_CLIENTS: usize = 16;

/// What a well-formed request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The target without its query.
    pub path: String,
    /// The Accept header ("" when absent).
    pub accept: String,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Response {
        Response {
            status: 200,
            content_type,
            body,
        }
    }

    pub fn not_found() -> Response {
        Response::text(404, "not found\n")
    }

    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }
}

/// Answers a GET (or HEAD) request.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

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
    let mut accept = String::new();
    for h in lines.filter(|h| !h.is_empty()) {
        let (name, value) = h.split_once(':').ok_or(BadRequest::Malformed)?;
        if name.eq_ignore_ascii_case("accept") {
            accept = value.trim().to_string();
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        accept,
    })
}

/// The complete response to a request head (or to its refusal).
pub fn respond(req: Result<Request, BadRequest>, handler: &Handler) -> Vec<u8> {
    let r = match req {
        Err(BadRequest::Malformed) => Response::text(400, "bad request\n"),
        Err(BadRequest::TooLarge) => Response::text(431, "request too large\n"),
        Ok(r) if r.method != "GET" && r.method != "HEAD" => Response::text(405, "only GET\n"),
        Ok(r) => {
            let mut answer = handler(&r);
            if r.method == "HEAD" {
                answer.body.clear();
            }
            answer
        }
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(r.body.as_bytes());
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    }
}

/// A bound listener.
pub struct HttpServer {
    listener: TcpListener,
}

impl HttpServer {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<HttpServer> {
        Ok(HttpServer {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answer requests until `shutdown` turns true.
    pub async fn serve(self, handler: Handler, mut shutdown: watch::Receiver<bool>) {
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
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &handler)).await;
                drop(permit);
            });
        }
    }
}

/// Read one request head, answer it, close.
async fn answer(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let reply = respond(head.and_then(|h| parse_request(&h)), handler);
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

    /// Serves `holdfast_x 1` on /metrics, 404 elsewhere.
    fn handler() -> Handler {
        Arc::new(|r: &Request| match r.path.as_str() {
            "/metrics" => Response::ok("text/plain", "holdfast_x 1\n".into()),
            _ => Response::not_found(),
        })
    }

    fn status(reply: &[u8]) -> String {
        let s = String::from_utf8_lossy(reply);
        s.lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn a_request_is_parsed_with_its_path_and_accept_header() {
        let r = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0").unwrap();
        assert_eq!(r.path, "/metrics");
        assert_eq!(r.accept, "application/openmetrics-text;version=1.0.0");
        let r = parse_request(b"GET /metrics HTTP/1.0").unwrap();
        assert_eq!(r.accept, "");
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
        let h = handler();
        let ok = respond(parse_request(b"GET /metrics HTTP/1.1"), &h);
        assert_eq!(status(&ok), "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&ok).ends_with("holdfast_x 1\n"));
        let head = respond(parse_request(b"HEAD /metrics HTTP/1.1"), &h);
        assert!(String::from_utf8_lossy(&head).contains("Content-Length: 0\r\n"));
        let cases: [(&[u8], &str); 3] = [
            (b"GET / HTTP/1.1", "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1", "HTTP/1.1 405 Method Not Allowed"),
            (b"GARBAGE", "HTTP/1.1 400 Bad Request"),
        ];
        for (req, want) in cases {
            assert_eq!(status(&respond(parse_request(req), &h)), want);
        }
        let big = respond(Err(BadRequest::TooLarge), &h);
        assert_eq!(status(&big), "HTTP/1.1 431 Request Header Fields Too Large");
    }

    /// Over real TCP: an oversized head, a peer that closes early and garbage bytes
    /// each get their answer (or none), and the server still answers a request after.
    #[tokio::test]
    async fn the_server_survives_hostile_clients() {
        let server = HttpServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(server.serve(handler(), rx));
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
