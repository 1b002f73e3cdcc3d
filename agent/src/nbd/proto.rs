//! The NBD wire format (fixed newstyle handshake, simple replies), as far as this server
//! speaks it. All integers are big-endian.
//!
//! ```text
//! Handshake, server first:
//!   server: "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16 (FIXED_NEWSTYLE|NO_ZEROES)
//!   client: client flags u32
//!   then, repeatedly, an option:
//!   client: "IHAVEOPT" u64 | option u32 | length u32 | data[length]
//!   server: option reply(s): 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data
//!     NBD_OPT_INFO / NBD_OPT_GO data: name length u32 | name | n u16 | n x info type u16
//!       -> NBD_REP_INFO (NBD_INFO_EXPORT: type u16 | size u64 | transmission flags u16),
//!          NBD_REP_INFO (NBD_INFO_BLOCK_SIZE: type u16 | min u32 | preferred u32 | max u32)
//!          if asked, then NBD_REP_ACK; GO then enters transmission.
//!     NBD_OPT_EXPORT_NAME (data = name): no option reply, but
//!       size u64 | transmission flags u16 | 124 zero bytes (unless NO_ZEROES); transmission.
//!     NBD_OPT_ABORT: NBD_REP_ACK, then the connection closes.
//!     anything else: NBD_REP_ERR_UNSUP.
//!
//! Transmission:
//!   request (28 bytes): 0x25609513 u32 | command flags u16 | type u16 | cookie u64 |
//!                       offset u64 | length u32, then `length` bytes of data for WRITE
//!   reply (16 bytes):   0x67446698 u32 | error u32 | cookie u64, then `length` bytes of data
//!                       for a successful READ
//! ```
//!
//! Everything here decodes untrusted bytes: parsing never panics (a proptest checks it),
//! lengths are bounded by [`MAX_PAYLOAD`] and option data by [`MAX_OPTION_DATA`], and a
//! request is checked against the export's size before anything is done for it.

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": opens the option haggling and prefixes every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags this server advertises.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TRANSMISSION_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Error values of replies (Linux errno numbers, as the protocol defines them).
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Largest READ or WRITE payload (and TRIM/WRITE_ZEROES length) accepted: 32 MiB, the
/// maximum block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Smallest and preferred block sizes advertised: the sector and the page.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option data read during the handshake (a name is at most 4096 bytes).
pub const MAX_OPTION_DATA: u32 = 8192;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    Other(u16),
}

impl Command {
    fn from_wire(t: u16) -> Command {
        match t {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A header the connection cannot go on after.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error("a WRITE of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(u32),
    #[error("option data of {0} bytes is over the {MAX_OPTION_DATA}-byte limit")]
    OptionTooLarge(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("the client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Parses a 28-byte header. A bad magic, or a WRITE whose payload could not be read
    /// safely, is an error after which the connection must close (the byte stream cannot be
    /// resynchronised); anything else is returned for [`Request::check`].
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let req = Request {
            flags: be_u16(b, 4),
            command: Command::from_wire(be_u16(b, 6)),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        };
        if req.command == Command::Write && req.length > MAX_PAYLOAD {
            return Err(ProtoError::PayloadTooLarge(req.length));
        }
        Ok(req)
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.command {
            Command::Write => self.length as usize,
            _ => 0,
        }
    }

    /// Checks the request against an export of `size` bytes: `Err(errno)` to send back.
    pub fn check(&self, size: u64) -> Result<(), u32> {
        match self.command {
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
                if self.length > MAX_PAYLOAD {
                    return Err(EINVAL);
                }
                match self.offset.checked_add(u64::from(self.length)) {
                    Some(end) if end <= size => Ok(()),
                    _ if self.command == Command::Write => Err(ENOSPC),
                    _ => Err(EINVAL),
                }
            }
            Command::Flush | Command::Disc => Ok(()),
            Command::Other(_) => Err(EINVAL),
        }
    }

    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Encodes the header (used by tests and by anyone driving this server directly).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let t = match self.command {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::Other(t) => t,
        };
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&t.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The server's opening: magics and handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The header of one option: `(option, data length)`.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    let len = be_u32(b, 12);
    if len > MAX_OPTION_DATA {
        return Err(ProtoError::OptionTooLarge(len));
    }
    Ok((be_u32(b, 8), len))
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name and the information types asked
/// for; `None` when malformed (answered with `NBD_REP_ERR_INVALID`).
pub fn parse_info_request(data: &[u8]) -> Option<(Vec<u8>, Vec<u16>)> {
    let name_len = usize::try_from(be_u32(data.get(0..4)?, 0)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?.to_vec();
    let rest = &data[4 + name_len..];
    let n = usize::from(be_u16(rest.get(0..2)?, 0));
    let infos = rest.get(2..)?;
    if infos.len() != n * 2 {
        return None;
    }
    Some((name, infos.chunks_exact(2).map(|c| be_u16(c, 0)).collect()))
}

/// An option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT` for an export of `size` bytes.
pub fn info_export(size: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: sector minimum, page preferred, [`MAX_PAYLOAD`] maximum.
pub fn info_block_size() -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    b
}

/// The answer to `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size: u64, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(command: Command, offset: u64, length: u32) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn headers_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            ..req(Command::Write, 1 << 20, 65536)
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        assert!(r.fua());
        assert_eq!(r.payload_len(), 65536);
    }

    #[test]
    fn bounds_are_enforced() {
        let size = 1 << 30;
        assert_eq!(req(Command::Read, 0, MAX_PAYLOAD).check(size), Ok(()));
        assert_eq!(
            req(Command::Read, 0, MAX_PAYLOAD + 1).check(size),
            Err(EINVAL)
        );
        assert_eq!(req(Command::Read, size, 1).check(size), Err(EINVAL));
        assert_eq!(req(Command::Trim, u64::MAX, 2).check(size), Err(EINVAL));
        assert_eq!(req(Command::Write, size - 1, 2).check(size), Err(ENOSPC));
        assert_eq!(req(Command::Other(5), 0, 0).check(size), Err(EINVAL));
        assert_eq!(req(Command::Flush, 0, 0).check(size), Ok(()));
        let big = req(Command::Write, 0, MAX_PAYLOAD + 1).encode();
        assert_eq!(
            Request::parse(&big),
            Err(ProtoError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        let mut bad = big;
        bad[0] = 0;
        assert!(matches!(Request::parse(&bad), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn info_requests_parse_and_malformed_ones_are_refused() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some((b"abc".to_vec(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0]), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            size in any::<u64>(),
        ) {
            let mut h = [0u8; REQUEST_LEN];
            let n = bytes.len().min(REQUEST_LEN);
            h[..n].copy_from_slice(&bytes[..n]);
            // With the right magic, so that the rest of the header is exercised too.
            for magic_first in [false, true] {
                if magic_first {
                    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                }
                if let Ok(r) = Request::parse(&h) {
                    prop_assert!(r.payload_len() <= MAX_PAYLOAD as usize);
                    if r.check(size).is_ok() && r.command != Command::Flush
                        && r.command != Command::Disc
                    {
                        prop_assert!(r.offset + u64::from(r.length) <= size);
                    }
                }
            }
            let mut o = [0u8; 16];
            let m = bytes.len().min(16);
            o[..m].copy_from_slice(&bytes[..m]);
            if let Ok((_, len)) = parse_option_header(&o) {
                prop_assert!(len <= MAX_OPTION_DATA);
            }
            let _ = parse_info_request(&bytes);
        }
    }
}
