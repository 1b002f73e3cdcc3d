//! The NBD export of `agent replicate`: [`proto`] is the wire format (untrusted bytes in),
//! [`server`] the handshake and request loop over a [`server::Backend`].

pub mod proto;
pub mod server;
