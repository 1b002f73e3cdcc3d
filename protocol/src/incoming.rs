//! Accept-side limits of the gRPC servers: a cap on open connections and a deadline for a
//! new connection's first bytes.
//!
//! HTTP/2 and tonic bound what a connection may send (message sizes, streams per connection)
//! but not how many connections there are, nor how slowly a peer starts: a client that opens
//! a socket and sends one byte a second would otherwise hold a task and its buffers forever.
//! Every accepted socket is wrapped in [`Guarded`], which fails its reads (so the server
//! closes it) unless the first [`HANDSHAKE_BYTES`] arrive within the handshake timeout. Those
//! bytes are the HTTP/2 preface, or the start of a TLS ClientHello; once a connection is up,
//! HTTP/2 keepalive pings and the roles' own hello and idle timeouts take over. Connections
//! beyond the cap are closed as soon as they are accepted.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS...): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long to wait before accepting again after `e`: a failure of the one pending
/// connection (the errors accept(2) says to treat like EAGAIN: ECONNABORTED, EPROTO, EPERM
/// from a firewall rule, a network gone...) concerns only it, so go on at once; any other
/// (out of descriptors or memory, or anything unforeseen) would likely fail the next accept
/// the same way at once, a spin, so wait [`ACCEPT_BACKOFF`].
pub(crate) fn accept_backoff(e: &io::Error) -> Option<Duration> {
    let one_connection = matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    );
    (!one_connection).then_some(ACCEPT_BACKOFF)
}

/// Bytes a new connection must send within the handshake timeout: the length of the HTTP/2
/// client preface (a TLS ClientHello is longer).
pub const HANDSHAKE_BYTES: usize = 24;

/// Accept-side limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Time a new connection has to send its first [`HANDSHAKE_BYTES`].
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The accepted connections of `listener`, guarded by `limits`, for
/// `serve_with_incoming`.
pub fn guarded(listener: TcpListener, limits: Limits) -> Incoming {
    Incoming {
        listener,
        limits,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        backoff: None,
    }
}

/// A stream of guarded connections.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    /// Set after a failed accept, until [`ACCEPT_BACKOFF`] has passed.
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.backoff.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.backoff = None;
            }
            let (stream, peer) = match ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                // Failures (ECONNABORTED, EMFILE...) must not end the server, nor spin it.
                Err(e) => {
                    let wait = accept_backoff(&e);
                    tracing::warn!(
                        "accept failed: {e}; retrying in {:?}",
                        wait.unwrap_or_default()
                    );
                    this.backoff = wait.map(|w| Box::pin(tokio::time::sleep(w)) as _);
                    continue;
                }
            };
            let Ok(permit) = this.slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    "closing connection from {peer}: {} connections already open",
                    this.limits.max_connections
                );
                continue;
            };
            let _ = stream.set_nodelay(true);
            return Poll::Ready(Some(Ok(Guarded {
                inner: stream,
                _permit: permit,
                deadline: Some(Box::pin(tokio::time::sleep(this.limits.handshake_timeout))),
                seen: 0,
            })));
        }
    }
}

/// An accepted connection holding its slot until dropped.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Set until the first [`HANDSHAKE_BYTES`] have been read.
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    this.seen += buf.filled().len() - before;
                    if this.seen >= HANDSHAKE_BYTES {
                        this.deadline = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = match this.deadline.as_mut() {
                    Some(d) => d.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "peer sent {} of its first {HANDSHAKE_BYTES} bytes in time",
                            this.seen
                        ),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    #[test]
    fn accept_waits_unless_the_error_is_the_pending_connection_s_own() {
        let e = io::Error::from_raw_os_error;
        assert_eq!(accept_backoff(&e(libc::ECONNABORTED)), None);
        assert_eq!(accept_backoff(&e(libc::EPERM)), None);
        assert_eq!(accept_backoff(&e(libc::EMFILE)), Some(ACCEPT_BACKOFF));
        assert_eq!(
            accept_backoff(&e(libc::EBADF)),
            Some(ACCEPT_BACKOFF),
            "unforeseen"
        );
        assert_eq!(
            accept_backoff(&io::Error::other("no errno")),
            Some(ACCEPT_BACKOFF)
        );
    }

    async fn setup(limits: Limits) -> (Incoming, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (guarded(l, limits), addr)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_starter_is_cut_and_a_prompt_one_is_not() {
        let limits = Limits {
            max_connections: 8,
            handshake_timeout: Duration::from_millis(300),
        };
        let (mut incoming, addr) = setup(limits).await;

        // One byte, then silence: the read fails once the deadline passes.
        let mut slow = TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"P").await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // The whole preface at once: later silence is no longer the guard's business.
        let mut prompt = TcpStream::connect(&addr).await.unwrap();
        prompt.write_all(&[b'x'; HANDSHAKE_BYTES]).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut got = 0;
        while got < HANDSHAKE_BYTES {
            got += conn.read(&mut buf).await.unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(600), conn.read(&mut buf)).await;
        assert!(quiet.is_err(), "a started connection must not be timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_cap_are_closed_until_a_slot_frees() {
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(10),
        };
        let (mut incoming, addr) = setup(limits).await;
        let _a = TcpStream::connect(&addr).await.unwrap();
        let _b = TcpStream::connect(&addr).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();

        // The third is accepted and closed: its peer reads EOF.
        let mut third = TcpStream::connect(&addr).await.unwrap();
        let accept = tokio::spawn(async move {
            let next = incoming.next().await;
            (incoming, next)
        });
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("the refused connection is closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0);

        // Once a slot frees, the next connection is served.
        drop(first);
        let _fourth = TcpStream::connect(&addr).await.unwrap();
        let (_incoming, next) = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .unwrap()
            .unwrap();
        assert!(next.unwrap().is_ok());
    }
}
