//! The `/metrics` endpoint over [`crate::http`]: the exposition format chosen from the
//! scraper's Accept header.

use crate::http::{Handler, HttpServer, Request, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

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

    fn of(accept: &str) -> Format {
        if accept.contains("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// Renders the current metrics in a format.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// `GET /metrics` answered by `render`; any other path 404.
fn handler(render: Render) -> Handler {
    Arc::new(move |r: &Request| {
        if r.path != "/metrics" {
            return Response::not_found();
        }
        let format = Format::of(&r.accept);
        Response::ok(format.content_type(), render(format))
    })
}

/// A bound metrics listener.
pub struct MetricsServer(HttpServer);

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MetricsServer> {
        HttpServer::bind(addr).await.map(MetricsServer)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Answer scrapes until `shutdown` turns true.
    pub async fn serve(self, render: Render, shutdown: watch::Receiver<bool>) {
        self.0.serve(handler(render), shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, respond};

    #[test]
    fn a_scrape_gets_the_format_its_accept_header_asks_for() {
        let h = handler(Arc::new(|f| format!("holdfast_x 1 {f:?}\n")));
        let open = respond(
            parse_request(
                b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0",
            ),
            &h,
        );
        assert!(String::from_utf8_lossy(&open).ends_with("holdfast_x 1 OpenMetrics\n"));
        let plain = respond(parse_request(b"GET /metrics HTTP/1.0"), &h);
        let plain = String::from_utf8_lossy(&plain).into_owned();
        assert!(plain.contains("version=0.0.4") && plain.ends_with("holdfast_x 1 Prometheus\n"));
        let other = respond(parse_request(b"GET / HTTP/1.1"), &h);
        assert!(String::from_utf8_lossy(&other).starts_with("HTTP/1.1 404"));
    }
}
