//! Generates the gRPC client and server code from `proto/warren.proto` with a vendored
//! protoc, so building needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Read at run time, not with env!(): a build script compiled for a checkout elsewhere
    // (a shared build cache) must not look for the schema there.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = proto_dir.join("warren.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure().compile_protos(&[file], &[proto_dir])?;
    Ok(())
}
