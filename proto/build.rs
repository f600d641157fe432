//! Generates the gRPC and message code from `stellar/v1/*.proto`.
//!
//! Uses the `protoc` named by `PROTOC` (e.g. Debian's) when set, otherwise the vendored
//! binary, so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 7] = [
        "stellar/v1/common.proto",
        "stellar/v1/job.proto",
        "stellar/v1/control.proto",
        "stellar/v1/agent.proto",
        "stellar/v1/raft.proto",
        "stellar/v1/state.proto",
        "stellar/v1/edge.proto",
    ];
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => std::path::PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // The descriptors with their comments (protoc's source info), for the check that every
    // element of the API is documented (tests/proto_docs.rs).
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is unset")?);
    config.file_descriptor_set_path(out.join("stellar_descriptors.bin"));
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_with_config(config, &PROTOS, &["."])?;
    Ok(())
}
