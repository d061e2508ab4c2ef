//! Compiles Hubble's API definitions (`proto/`) into Rust with protox (a protobuf compiler in
//! Rust: no `protoc` on the machine) and tonic's generator, and keeps the descriptor set for gRPC
//! reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/observer/observer.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("hubble_descriptor.bin"), &encoded)?;
    // Well-known types from pbjson-types: they carry protobuf's JSON mapping (timestamps as
    // RFC 3339, wrappers as bare values), as Hubble's JSON output has them.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        // Hubble prints protobuf field names (`traffic_direction`, not `trafficDirection`).
        .preserve_proto_field_names()
        .build(&[".flow", ".observer", ".relay"])?;
    Ok(())
}
