//! The client-facing server: the etcd v3 gRPC services, the HTTP endpoints, and the node they
//! drive (shards on cores, routing, the meta group).

pub mod auth;
pub mod cluster;
pub mod election;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod log;
pub mod members;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod recipes;
pub mod server;
pub mod tls;
pub mod transport;
pub mod watch;
