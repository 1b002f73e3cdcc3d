//! Protocol constants and hard limits.
//!
//! Every limit here is checked *before* the bytes it guards are allocated or decompressed:
//! a peer can make us reserve at most [`MAX_MESSAGE_BYTES`] per message and at most
//! [`MAX_BATCH_DATA`] of decompressed data per batch.

/// Version carried by every hello; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Disk sector size: capacities, and nothing else, must be multiples of it.
pub const SECTOR: u64 = 512;

/// Default amount of uncompressed write data an agent puts into one batch.
pub const DEFAULT_BATCH_DATA: usize = 1 << 20;

/// Hard cap on the uncompressed write data of one batch.
pub const MAX_BATCH_DATA: usize = 4 << 20;

/// Hard cap on the write extents of one batch (and, separately, on its zero extents).
pub const MAX_EXTENTS: usize = 8192;

/// Hard cap on the markers of one batch.
pub const MAX_MARKERS: usize = 64;

/// LZ4's best possible ratio: a block can never decompress to more than this many times
/// its compressed size, so a larger declared size is a lie (a decompression bomb).
pub const LZ4_MAX_RATIO: usize = 255;

/// Largest gRPC message either side accepts or sends: a full batch whose payload did not
/// compress (lz4 adds at most size/255 + 16 bytes), its extent lists, and headroom.
pub const MAX_MESSAGE_BYTES: usize =
    MAX_BATCH_DATA + (MAX_BATCH_DATA / 255) + 16 + 2 * MAX_EXTENTS * 24 + 64 * 1024;

/// Longest disk id, name, marker id, tag, group or identity string accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Largest disk capacity accepted (64 TiB, the VMFS limit for a virtual disk).
pub const MAX_CAPACITY: u64 = 64 << 40;

/// Most disks one hello may declare.
pub const MAX_DISKS_PER_HELLO: usize = 256;

/// How long a new stream may take to send its hello before the server ends it: an honest
/// peer sends it at once, a hostile one must not hold a stream open for free.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
