//! An NBD server for one export ([`Backend`]), speaking the fixed newstyle handshake and
//! simple replies of [`super::proto`].
//!
//! Invariants: each connection handles one request at a time, in order, and replies only
//! once the backend has finished it, so when a client sees a reply the write is in the file
//! (and, for FUA, durable) and queued for replication; the backend's blocking calls run on
//! the blocking pool, never on an async worker; a header that cannot be trusted (bad magic,
//! oversized WRITE payload) closes the connection, any other bad request gets an error reply
//! and the connection goes on.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use super::proto::{self, Command, ProtoError, Request};

/// The export: blocking calls, made from the blocking pool. An `Err` is an errno sent back
/// to the client.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, u32>;
    /// Writes `data` at `offset`, durably before returning if `fua`.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), u32>;
    /// Writes zeros over `[offset, offset + len)` (TRIM and WRITE_ZEROES alike).
    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), u32>;
    /// Makes every acknowledged write durable (a crash-consistent point).
    fn flush(&self) -> Result<(), u32>;
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol: {0}")]
    Proto(#[from] ProtoError),
}

/// Accepts connections forever, one task per connection.
pub async fn serve<B: Backend>(listener: TcpListener, backend: Arc<B>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let backend = backend.clone();
                tokio::spawn(async move {
                    match connection(stream, backend).await {
                        Ok(()) => tracing::debug!("NBD client {peer} disconnected"),
                        Err(e) => tracing::warn!("NBD client {peer}: {e}"),
                    }
                });
            }
            // Out of descriptors and the like: transient, so keep accepting.
            Err(e) => {
                tracing::warn!("NBD accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = BufWriter<tokio::net::tcp::OwnedWriteHalf>;

async fn connection<B: Backend>(stream: TcpStream, backend: Arc<B>) -> Result<(), NbdError> {
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    if handshake(&mut r, &mut w, backend.size()).await? {
        transmission(&mut r, &mut w, backend).await?;
    }
    Ok(())
}

/// Option haggling; `Ok(true)` when the client entered transmission.
async fn handshake(r: &mut Reader, w: &mut Writer, size: u64) -> Result<bool, NbdError> {
    w.write_all(&proto::greeting()).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(client_flags).into());
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    loop {
        let mut h = [0u8; 16];
        r.read_exact(&mut h).await?;
        let (option, len) = proto::parse_option_header(&h)?;
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match option {
            proto::OPT_EXPORT_NAME => {
                w.write_all(&proto::export_name_reply(size, no_zeroes))
                    .await?;
                w.flush().await?;
                return Ok(true);
            }
            proto::OPT_ABORT => {
                w.write_all(&proto::option_reply(option, proto::REP_ACK, &[]))
                    .await?;
                w.flush().await?;
                return Ok(false);
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                Some((_name, infos)) => {
                    // One export, whatever its name.
                    let info = proto::info_export(size);
                    w.write_all(&proto::option_reply(option, proto::REP_INFO, &info))
                        .await?;
                    if infos.contains(&proto::INFO_BLOCK_SIZE) {
                        let bs = proto::info_block_size();
                        w.write_all(&proto::option_reply(option, proto::REP_INFO, &bs))
                            .await?;
                    }
                    w.write_all(&proto::option_reply(option, proto::REP_ACK, &[]))
                        .await?;
                    w.flush().await?;
                    if option == proto::OPT_GO {
                        return Ok(true);
                    }
                }
                None => {
                    w.write_all(&proto::option_reply(option, proto::REP_ERR_INVALID, &[]))
                        .await?;
                    w.flush().await?;
                }
            },
            _ => {
                w.write_all(&proto::option_reply(option, proto::REP_ERR_UNSUP, &[]))
                    .await?;
                w.flush().await?;
            }
        }
    }
}

async fn transmission<B: Backend>(
    r: &mut Reader,
    w: &mut Writer,
    backend: Arc<B>,
) -> Result<(), NbdError> {
    let size = backend.size();
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            // A client may just close instead of sending DISC.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = match Request::parse(&h) {
            Ok(req) => req,
            Err(ProtoError::PayloadTooLarge(len)) => {
                // The payload cannot be skipped safely: refuse it and hang up.
                let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
                w.write_all(&proto::simple_reply(proto::EINVAL, cookie))
                    .await?;
                w.flush().await?;
                return Err(ProtoError::PayloadTooLarge(len).into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut payload = vec![0u8; req.payload_len()];
        r.read_exact(&mut payload).await?;
        if req.command == Command::Disc {
            return Ok(());
        }
        let outcome = match req.check(size) {
            Ok(()) => execute(&backend, req, payload).await,
            Err(errno) => Err(errno),
        };
        match outcome {
            Ok(data) => {
                w.write_all(&proto::simple_reply(0, req.cookie)).await?;
                w.write_all(&data).await?;
            }
            Err(errno) => {
                w.write_all(&proto::simple_reply(errno, req.cookie)).await?;
            }
        }
        w.flush().await?;
    }
}

/// Runs one checked request on the blocking pool; returns the data of a READ.
async fn execute<B: Backend>(
    backend: &Arc<B>,
    req: Request,
    payload: Vec<u8>,
) -> Result<Vec<u8>, u32> {
    let b = backend.clone();
    let job = move || match req.command {
        Command::Read => b.read(req.offset, req.length as usize),
        Command::Write => b.write(req.offset, payload, req.fua()).map(|()| Vec::new()),
        Command::Trim | Command::WriteZeroes => b
            .zero(req.offset, u64::from(req.length), req.fua())
            .map(|()| Vec::new()),
        Command::Flush => b.flush().map(|()| Vec::new()),
        Command::Disc | Command::Other(_) => Err(proto::EINVAL),
    };
    tokio::task::spawn_blocking(job)
        .await
        .unwrap_or(Err(proto::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// An in-memory export.
    struct Mem(Mutex<Vec<u8>>);

    impl Backend for Mem {
        fn size(&self) -> u64 {
            self.0.lock().len() as u64
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
            Ok(self.0.lock()[offset as usize..offset as usize + len].to_vec())
        }
        fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), u32> {
            self.0.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        fn zero(&self, offset: u64, len: u64, _fua: bool) -> Result<(), u32> {
            self.0.lock()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn flush(&self) -> Result<(), u32> {
            Ok(())
        }
    }

    async fn client(size: usize) -> (TcpStream, Arc<Mem>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mem = Arc::new(Mem(Mutex::new(vec![0; size])));
        tokio::spawn(serve(listener, mem.clone()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting, proto::greeting());
        s.write_u32(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        (s, mem)
    }

    async fn option(s: &mut TcpStream, option: u32, data: &[u8]) {
        s.write_u64(proto::IHAVEOPT).await.unwrap();
        s.write_u32(option).await.unwrap();
        s.write_u32(data.len() as u32).await.unwrap();
        s.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (reply type, data).
    async fn option_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
        assert_eq!(s.read_u64().await.unwrap(), proto::REPLY_MAGIC);
        let _option = s.read_u32().await.unwrap();
        let kind = s.read_u32().await.unwrap();
        let mut data = vec![0; s.read_u32().await.unwrap() as usize];
        s.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    async fn go(s: &mut TcpStream) {
        option(s, 99, &[]).await;
        assert_eq!(option_reply(s).await.0, proto::REP_ERR_UNSUP);
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        option(s, proto::OPT_GO, &data).await;
        let (kind, info) = option_reply(s).await;
        assert_eq!((kind, info), (proto::REP_INFO, proto::info_export(1 << 20)));
        assert_eq!(option_reply(s).await.0, proto::REP_INFO);
        assert_eq!(option_reply(s).await.0, proto::REP_ACK);
    }

    async fn request(s: &mut TcpStream, command: Command, offset: u64, length: u32) -> u32 {
        let r = Request {
            flags: 0,
            command,
            cookie: 42,
            offset,
            length,
        };
        s.write_all(&r.encode()).await.unwrap();
        if command == Command::Write && length <= proto::MAX_PAYLOAD {
            s.write_all(&vec![7u8; length as usize]).await.unwrap();
        }
        assert_eq!(s.read_u32().await.unwrap(), proto::SIMPLE_REPLY_MAGIC);
        let error = s.read_u32().await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), 42);
        error
    }

    #[tokio::test]
    async fn bad_requests_get_errors_and_good_ones_work() {
        let (mut s, mem) = client(1 << 20).await;
        go(&mut s).await;
        assert_eq!(request(&mut s, Command::Write, 4096, 512).await, 0);
        assert_eq!(mem.0.lock()[4096..4608], [7u8; 512]);
        assert_eq!(request(&mut s, Command::Read, 4096, 512).await, 0);
        let mut back = [0u8; 512];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [7u8; 512]);
        assert_eq!(
            request(&mut s, Command::Read, 1 << 20, 1).await,
            proto::EINVAL
        );
        assert_eq!(
            request(&mut s, Command::Trim, u64::MAX, 1).await,
            proto::EINVAL
        );
        assert_eq!(
            request(&mut s, Command::Other(9), 0, 0).await,
            proto::EINVAL
        );
        assert_eq!(request(&mut s, Command::Flush, 0, 0).await, 0);
        assert_eq!(request(&mut s, Command::WriteZeroes, 4096, 256).await, 0);
        assert_eq!(mem.0.lock()[4096..4352], [0u8; 256]);
        // A write past the end still has its payload consumed: the stream stays in step.
        assert_eq!(
            request(&mut s, Command::Write, (1 << 20) - 1, 2).await,
            proto::ENOSPC
        );
        assert_eq!(request(&mut s, Command::Flush, 0, 0).await, 0);
        // An oversized write is refused and the connection closed.
        let huge = request(&mut s, Command::Write, 0, proto::MAX_PAYLOAD + 1).await;
        assert_eq!(huge, proto::EINVAL);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn oversized_options_and_export_name_and_abort() {
        let (mut s, _) = client(1 << 20).await;
        option(
            &mut s,
            proto::OPT_GO,
            &vec![0; proto::MAX_OPTION_DATA as usize + 1],
        )
        .await;
        let mut rest = Vec::new();
        // Closed without a reply (the server does not read that much).
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty());

        let (mut s, _) = client(1 << 20).await;
        option(&mut s, proto::OPT_EXPORT_NAME, b"any").await;
        assert_eq!(s.read_u64().await.unwrap(), 1 << 20);
        assert_eq!(s.read_u16().await.unwrap(), proto::TRANSMISSION_FLAGS);
        assert_eq!(request(&mut s, Command::Flush, 0, 0).await, 0);

        let (mut s, _) = client(1 << 20).await;
        option(&mut s, proto::OPT_ABORT, &[]).await;
        assert_eq!(option_reply(&mut s).await.0, proto::REP_ACK);
    }
}
