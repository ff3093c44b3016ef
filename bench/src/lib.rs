//! `ferrocd-bench`: a load generator for any etcd v3 endpoint (put, range, txn-put, txn-mixed,
//! mixed, watch, lease-keepalive) with HDR latency histograms, and `compare`, which runs the
//! same workloads against etcd and ferrocd started side by side and reports the ratios, with a
//! chart. See docs/BENCHMARKS.md.

pub mod chart;
pub mod cli;
pub mod compare;
pub mod lease;
pub mod load;
pub mod server;
pub mod stats;
pub mod watch;

use std::fmt;

/// Errors of the tool are reported to the user; only [`Unsupported`] is ever looked for.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The server answered UNIMPLEMENTED for a service a workload needs (e.g. Watch on a server
/// that has only KV). `compare` marks the workload "unsupported" for that server instead of
/// failing; a single run exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The gRPC service, e.g. `Watch`.
    pub service: &'static str,
    /// The server's status message.
    pub detail: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server does not implement the {} service (gRPC UNIMPLEMENTED: {})",
            self.service, self.detail
        )
    }
}

impl std::error::Error for Unsupported {}

/// Turns an error of a workload's set-up into [`Unsupported`] when the server answered
/// UNIMPLEMENTED, or into a message naming the step that failed otherwise.
pub fn setup_error(
    service: &'static str,
    step: &str,
    error: etcd_client::Error,
) -> Box<dyn std::error::Error + Send + Sync> {
    match &error {
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::Unimplemented => {
            Box::new(Unsupported {
                service,
                detail: status.message().to_string(),
            })
        }
        _ => format!("{step}: {error}").into(),
    }
}

/// The [`Unsupported`] inside a boxed error, if that is what it is.
pub fn as_unsupported<'a>(
    error: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a Unsupported> {
    error.downcast_ref::<Unsupported>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_becomes_unsupported_and_other_errors_keep_their_step() {
        let unimplemented = etcd_client::Error::GRpcStatus(tonic::Status::unimplemented("nope"));
        let error = setup_error("Watch", "create watcher", unimplemented);
        let unsupported = as_unsupported(error.as_ref()).expect("unsupported");
        assert_eq!(unsupported.service, "Watch");
        assert_eq!(unsupported.detail, "nope");
        assert!(error
            .to_string()
            .contains("does not implement the Watch service"));

        let unavailable = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("down"));
        let error = setup_error("Watch", "create watcher", unavailable);
        assert!(as_unsupported(error.as_ref()).is_none());
        assert!(error.to_string().starts_with("create watcher: "), "{error}");
    }
}
