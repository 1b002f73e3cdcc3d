//! Compiles `proto/failback.proto` with protox (a pure-Rust protobuf compiler), so no
//! system `protoc` is needed, and generates prost messages with `bytes::Bytes` fields plus
//! tonic clients and servers.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/failback.proto");
    let fds = protox::compile(["proto/failback.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
