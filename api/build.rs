//! Generates the etcd v3 API types, server traits and clients from `proto/`.
//!
//! tonic's transport feature is off (we serve with hyper on glommio), so the generated
//! code only needs tonic's `codegen` feature.
//!
//! pbjson-build adds serde impls that speak proto3 JSON the way etcd's grpc-gateway does
//! (`jsonpb` with `OrigName`): proto field names on output, proto or lowerCamel names on
//! input, 64-bit integers as strings, bytes as base64, enums by name, defaults omitted.

use std::path::PathBuf;

const PROTO_ROOT: &str = "proto";
/// The proto packages that get JSON impls: every package in `PROTOS`.
const JSON_PACKAGES: &[&str] = &[
    ".mvccpb",
    ".authpb",
    ".etcdserverpb",
    ".v3lockpb",
    ".v3electionpb",
];
const PROTOS: &[&str] = &[
    "proto/mvccpb/kv.proto",
    "proto/authpb/auth.proto",
    "proto/etcdserverpb/rpc.proto",
    "proto/v3lockpb/v3lock.proto",
    "proto/v3electionpb/v3election.proto",
];

fn main() {
    // A vendored protoc keeps the build independent of what the machine has installed.
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let descriptors_path = out_dir.join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors_path)
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // Services can be registered before every method is written; a missing one answers
        // UNIMPLEMENTED, which etcd clients already handle for optional RPCs.
        .generate_default_stubs(true)
        .compile_protos(PROTOS, &[PROTO_ROOT])
        .expect("compile etcd v3 protos");

    let descriptors = std::fs::read(&descriptors_path).expect("read the descriptor set");
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)
        .expect("register the descriptor set")
        .preserve_proto_field_names()
        // grpc-gateway skips fields it does not know; clients of newer etcd versions send some.
        .ignore_unknown_fields()
        .build(JSON_PACKAGES)
        .expect("generate JSON impls");
}
