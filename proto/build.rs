//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PUBLIC: [&str; 3] = [
    "proto/switchyard/v1/node_state.proto",
    "proto/switchyard/v1/query.proto",
    "proto/switchyard/v1/agent_query.proto",
];
const SERVER_TWIN: &str = "proto/switchyard/v1/encoded/node_state_server.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PUBLIC.iter().chain([&SERVER_TWIN]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let public = protox::compile(PUBLIC, ["proto"])?;
    fs::write(
        out.join("switchyard_descriptor.bin"),
        public.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(public)?;

    // The twin shares package switchyard.v1 (same gRPC path), so it is generated into
    // its own folder and only its server and new message are used.
    let twin_dir = out.join("encoded");
    fs::create_dir_all(&twin_dir)?;
    let twin = protox::compile([SERVER_TWIN], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&twin_dir)
        .bytes(".switchyard.v1.EncodedNodeStateResponse.resources")
        .extern_path(
            ".switchyard.v1.NodeStateRequest",
            "crate::v1::NodeStateRequest",
        )
        .extern_path(
            ".switchyard.v1.EffectiveStateQuery",
            "crate::v1::EffectiveStateQuery",
        )
        .compile_fds(twin)?;
    Ok(())
}
