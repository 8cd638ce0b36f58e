//! Compiles CRIU's RPC and image schemas (written by us in criu-proto/) with the pure-Rust
//! protobuf parser, so no `protoc` is needed at build time.

fn main() {
    let protos = [
        "criu-proto/rpc.proto",
        "criu-proto/stats.proto",
        "criu-proto/pagemap.proto",
        "criu-proto/files.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    protobuf_codegen::Codegen::new()
        .pure()
        .include("criu-proto")
        .inputs(protos)
        .cargo_out_dir("criu_proto")
        .run_from_script();
}
