//! Prometheus metrics for the servers: the text exposition format and a tiny `/metrics`
//! endpoint.
//!
//! The HTTP side is hand-written HTTP/1.1 (one request per connection, the request head
//! bounded in size and time, at most [`MAX_CONNECTIONS`] at once) so that a scraper, or a
//! hostile client, can never cost a server more than a few KiB and a task; no web framework
//! is pulled in for a handful of gauges.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// A client must send its request and take the reply within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;

/// Prometheus metric types used here.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A metrics page under construction.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// One metric without labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help, [(Vec::<(&str, &str)>::new(), value)]);
    }

    /// One metric family: its HELP and TYPE lines, then a sample per label set. Label values
    /// are escaped as the format requires.
    pub fn family<'a, L>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) where
        L: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.text.push_str(name);
            let mut first = true;
            for (k, v) in labels {
                self.text.push(if first { '{' } else { ',' });
                first = false;
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            if !first {
                self.text.push('}');
            }
            let _ = writeln!(self.text, " {}", format_value(value));
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Serves `GET /metrics` on `listener` with the page `render` builds, until the task is
/// dropped. Anything else gets 404.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                drop(permit);
                if let Some(wait) = crate::incoming::accept_backoff(&e) {
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*render)).await;
            drop(permit);
        });
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, render: &F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let (status, body) = if head.starts_with("GET /metrics ") {
        ("200 OK", render().await)
    } else {
        ("404 Not Found", "only /metrics is served here\n".into())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetches `http://ADDR/metrics` (for tests and `status` tools): the body of a 200 reply.
pub async fn scrape(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await?;
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!(
            "unexpected reply from {addr}: {}",
            reply.lines().next().unwrap_or("")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_labels_and_formats_values() {
        let mut e = Exposition::new();
        e.single("up", Kind::Gauge, "Whether it runs.", 1.0);
        e.family(
            "rpo_seconds",
            Kind::Gauge,
            "Age of the newest durable data.",
            [
                (vec![("disk_id", "a\"b\\c")], 1.5),
                (vec![("disk_id", "d")], 0.0),
            ],
        );
        assert_eq!(
            e.finish(),
            "# HELP up Whether it runs.\n# TYPE up gauge\nup 1\n\
             # HELP rpo_seconds Age of the newest durable data.\n# TYPE rpo_seconds gauge\n\
             rpo_seconds{disk_id=\"a\\\"b\\\\c\"} 1.5\nrpo_seconds{disk_id=\"d\"} 0\n"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoint_serves_metrics_and_404_elsewhere() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(serve(l, || async { "x 1\n".to_string() }));
        assert_eq!(scrape(&addr).await.unwrap(), "x 1\n");

        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

        // Idle connections hold a slot each but never block the endpoint beyond the cap.
        let idle: Vec<_> = futures_idle(&addr, MAX_CONNECTIONS - 1).await;
        assert_eq!(scrape(&addr).await.unwrap(), "x 1\n");
        drop(idle);
        task.abort();
    }

    async fn futures_idle(addr: &str, n: usize) -> Vec<TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(TcpStream::connect(addr).await.unwrap());
        }
        v
    }
}
