//! Runs the model's requests (etcd.rs) against a real server with the etcd-client crate and
//! turns the answers into the model's responses: the recording half of every history, shared
//! by the single-server robustness harness and the cluster tests.

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::etcd::{Compare, KeyValue, Request, Response, Write};

/// Leases outlive any round: expiry is not part of the model.
const LEASE_TTL_S: i64 = 3_600;
const COMPACTED_ERROR: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE_REVISION_ERROR: &str = "etcdserver: mvcc: required revision is a future revision";
const LEASE_NOT_FOUND_ERROR: &str = "etcdserver: requested lease not found";
/// A gRPC error that proves the request was refused before it did anything. Everything else
/// (lost connection, timeout, unavailable, internal) leaves the outcome unknown.
pub fn is_definite(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::ResourceExhausted
                | Code::Unauthenticated
                | Code::Unimplemented
        ),
        _ => false,
    }
}

/// Sends `request` and converts the answer; an error the model predicts (a compacted or
/// future revision, an unknown lease) comes back as its response.
pub async fn execute(
    client: &mut Client,
    request: &Request,
) -> Result<Response, etcd_client::Error> {
    let response = match request {
        Request::Get { key } => get(client, key, None).await?,
        Request::GetAt { key, revision } => {
            let read = get(client, key, Some(*revision)).await;
            return read.or_else(|error| known_error(&error).ok_or(error));
        }
        Request::Range { prefix } => {
            let options = GetOptions::new().with_prefix();
            let read = client.get(prefix.as_str(), Some(options)).await?;
            Response::Range {
                revision: header_revision(read.header()),
                kvs: read
                    .kvs()
                    .iter()
                    .map(|kv| (utf8(kv.key()), key_value(kv)))
                    .collect(),
            }
        }
        Request::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            match client.put(key.as_str(), value.as_str(), options).await {
                Ok(put) => Response::Put {
                    revision: header_revision(put.header()),
                },
                Err(error) => return known_error(&error).ok_or(error),
            }
        }
        Request::Delete { key } => delete(client, key, None).await?,
        Request::DeletePrefix { prefix } => {
            delete(client, prefix, Some(DeleteOptions::new().with_prefix())).await?
        }
        Request::CompareAndSet {
            key,
            compare,
            value,
        } => {
            let writes = [Write::Put {
                key: key.clone(),
                value: value.clone(),
            }];
            let guards = [(key.clone(), compare.clone())];
            let (revision, succeeded, mut kvs) = txn(client, &guards, &writes).await?;
            Response::CompareAndSet {
                revision,
                succeeded,
                kv: kvs.pop().flatten(),
            }
        }
        Request::Txn { guards, writes } => {
            let (revision, succeeded, kvs) = txn(client, guards, writes).await?;
            Response::Txn {
                revision,
                succeeded,
                kvs,
            }
        }
        Request::LeaseGrant { id } => {
            let options = LeaseGrantOptions::new().with_id(*id);
            let grant = client.lease_grant(LEASE_TTL_S, Some(options)).await?;
            Response::LeaseGrant {
                revision: header_revision(grant.header()),
            }
        }
        Request::LeaseRevoke { id } => match client.lease_revoke(*id).await {
            Ok(revoke) => Response::LeaseRevoke {
                revision: header_revision(revoke.header()),
            },
            Err(error) => return known_error(&error).ok_or(error),
        },
        Request::Compact { revision } => match client.compact(*revision, None).await {
            Ok(compact) => Response::Compact {
                revision: header_revision(compact.header()),
            },
            Err(error) => return known_error(&error).ok_or(error),
        },
        Request::Defragment => match client.defragment().await {
            Ok(_) => Response::Defragmented,
            Err(error) => return Err(error),
        },
    };
    Ok(response)
}

/// The errors the model predicts, as responses; `None` for any other.
pub fn known_error(error: &etcd_client::Error) -> Option<Response> {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return None;
    };
    match (status.code(), status.message()) {
        (tonic::Code::OutOfRange, COMPACTED_ERROR) => Some(Response::Compacted),
        (tonic::Code::OutOfRange, FUTURE_REVISION_ERROR) => Some(Response::FutureRevision),
        (tonic::Code::NotFound, LEASE_NOT_FOUND_ERROR) => Some(Response::LeaseNotFound),
        _ => None,
    }
}

async fn get(
    client: &mut Client,
    key: &str,
    revision: Option<i64>,
) -> Result<Response, etcd_client::Error> {
    let options = revision.map(|revision| GetOptions::new().with_revision(revision));
    let read = client.get(key, options).await?;
    Ok(Response::Get {
        revision: header_revision(read.header()),
        kv: read.kvs().first().map(key_value),
    })
}

async fn delete(
    client: &mut Client,
    key: &str,
    options: Option<DeleteOptions>,
) -> Result<Response, etcd_client::Error> {
    let delete = client.delete(key, options).await?;
    Ok(Response::Delete {
        revision: header_revision(delete.header()),
        deleted: delete.deleted(),
    })
}

/// `Txn { every guard (EQUAL) } then writes else get(each guard's key)`: the header's
/// revision, whether it succeeded, and the else branch's reads (empty on success).
async fn txn(
    client: &mut Client,
    guards: &[(String, Compare)],
    writes: &[Write],
) -> Result<(i64, bool, Vec<Option<KeyValue>>), etcd_client::Error> {
    let compares = guards
        .iter()
        .map(|(key, compare)| match compare {
            Compare::ModRevision(revision) => {
                EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
            }
            Compare::Value(expected) => {
                EtcdCompare::value(key.as_str(), CompareOp::Equal, expected.as_str())
            }
        })
        .collect::<Vec<_>>();
    let then = writes
        .iter()
        .map(|write| match write {
            Write::Put { key, value } => TxnOp::put(key.as_str(), value.as_str(), None),
            Write::Delete { key } => TxnOp::delete(key.as_str(), None),
        })
        .collect::<Vec<_>>();
    let otherwise = guards
        .iter()
        .map(|(key, _)| TxnOp::get(key.as_str(), None))
        .collect::<Vec<_>>();
    let response = client
        .txn(Txn::new().when(compares).and_then(then).or_else(otherwise))
        .await?;
    let revision = header_revision(response.header());
    if response.succeeded() {
        return Ok((revision, true, Vec::new()));
    }
    let kvs = response
        .op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(key_value),
            other => panic!("the else branch of a txn answered {other:?}"),
        })
        .collect();
    Ok((revision, false, kvs))
}

pub fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("a response header").revision()
}

pub fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        value: utf8(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

/// Every key and value here is UTF-8, which keeps failure explanations readable.
pub fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("keys and values are UTF-8")
}
