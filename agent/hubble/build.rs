//! Compiles Hubble's API definitions (`proto/`) into Rust with protox (a protobuf compiler in
//! Rust: no `protoc` on the machine) and tonic's generator, and keeps the descriptor set for gRPC
//! reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/observer/observer.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("hubble_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
