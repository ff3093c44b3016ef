//! Generates the etcd v3 API types, server traits and clients from `proto/`.
//!
//! tonic's transport feature is off (we serve with hyper on glommio), so the generated
//! code only needs tonic's `codegen` feature.

const PROTO_ROOT: &str = "proto";
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
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // Services can be registered before every method is written; a missing one answers
        // UNIMPLEMENTED, which etcd clients already handle for optional RPCs.
        .generate_default_stubs(true)
        .compile_protos(PROTOS, &[PROTO_ROOT])
        .expect("compile etcd v3 protos");
}
