//! The etcd v3 API: message types, server traits (`*_server`) and clients (`*_client`)
//! generated from the protos in `proto/`, wire-compatible with etcd.
//!
//! The modules sit side by side at the crate root because the generated code refers to
//! other packages as `super::<package>` (e.g. `super::mvccpb::KeyValue` from `etcdserverpb`).

/// Key-value and event types shared by KV and Watch (`mvccpb` in etcd).
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// Users, roles and permissions (`authpb` in etcd).
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// The KV, Watch, Lease, Cluster, Maintenance and Auth services.
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// The Lock service (etcd's `v3lock` gRPC proxy of the client lock recipe).
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// The Election service (etcd's `v3election`).
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tonic::server::NamedService;

    use super::*;

    /// gRPC routes requests by these names: they must be etcd's exactly.
    #[test]
    fn service_names_match_etcd() {
        struct Unused;
        macro_rules! assert_name {
            ($server:ty, $name:literal) => {
                assert_eq!(<$server as NamedService>::NAME, $name);
            };
        }
        assert_name!(etcdserverpb::kv_server::KvServer<Unused>, "etcdserverpb.KV");
        assert_name!(
            etcdserverpb::watch_server::WatchServer<Unused>,
            "etcdserverpb.Watch"
        );
        assert_name!(
            etcdserverpb::lease_server::LeaseServer<Unused>,
            "etcdserverpb.Lease"
        );
        assert_name!(
            etcdserverpb::cluster_server::ClusterServer<Unused>,
            "etcdserverpb.Cluster"
        );
        assert_name!(
            etcdserverpb::maintenance_server::MaintenanceServer<Unused>,
            "etcdserverpb.Maintenance"
        );
        assert_name!(
            etcdserverpb::auth_server::AuthServer<Unused>,
            "etcdserverpb.Auth"
        );
        assert_name!(v3lockpb::lock_server::LockServer<Unused>, "v3lockpb.Lock");
        assert_name!(
            v3electionpb::election_server::ElectionServer<Unused>,
            "v3electionpb.Election"
        );
    }

    /// Field numbers and types on the wire, spot-checked against etcd's rpc.proto/kv.proto.
    #[test]
    fn wire_format_matches_etcd() {
        let put = etcdserverpb::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 7,
            prev_kv: true,
            ignore_value: true,
            ignore_lease: true,
        };
        // key=1 bytes, value=2 bytes, lease=3 int64, prev_kv=4, ignore_value=5, ignore_lease=6 bool.
        let expected = [
            0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 7, 0x20, 1, 0x28, 1, 0x30, 1,
        ];
        assert_eq!(put.encode_to_vec(), expected);

        let event = mvccpb::Event {
            r#type: mvccpb::event::EventType::Delete as i32,
            kv: Some(mvccpb::KeyValue {
                mod_revision: 9,
                ..Default::default()
            }),
            prev_kv: None,
        };
        // type=1 enum (DELETE = 1), kv=2 message holding mod_revision=3.
        assert_eq!(event.encode_to_vec(), [0x08, 1, 0x12, 2, 0x18, 9]);

        let header = etcdserverpb::ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 3,
            raft_term: 4,
        };
        assert_eq!(header.encode_to_vec(), [0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4]);
    }

    /// The proto3 JSON etcd's gateway writes (`jsonpb`, `OrigName`): proto field names as
    /// declared (`peerURLs`, `dbSize` are camelCase in etcd's protos), 64-bit integers as
    /// strings, bytes as base64, enums by name, defaults omitted; input also in lowerCamel.
    #[test]
    fn json_matches_etcd_gateway() {
        let response = etcdserverpb::RangeResponse {
            header: Some(etcdserverpb::ResponseHeader {
                revision: 3,
                ..Default::default()
            }),
            kvs: vec![mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                version: 1,
                ..Default::default()
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            serde_json::to_string(&response).unwrap(),
            r#"{"header":{"revision":"3"},"kvs":[{"key":"Zm9v","create_revision":"2","version":"1"}],"count":"1"}"#
        );
        let member = etcdserverpb::Member {
            id: u64::MAX,
            peer_ur_ls: vec!["http://p".into()],
            is_learner: true,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&member).unwrap(),
            r#"{"ID":"18446744073709551615","peerURLs":["http://p"],"isLearner":true}"#
        );
        let op = etcdserverpb::RequestOp {
            request: Some(etcdserverpb::request_op::Request::RequestTxn(
                etcdserverpb::TxnRequest::default(),
            )),
        };
        assert_eq!(serde_json::to_string(&op).unwrap(), r#"{"request_txn":{}}"#);
        let compare: etcdserverpb::Compare =
            serde_json::from_str(r#"{"result":"NOT_EQUAL","target":"MOD","modRevision":"7"}"#)
                .unwrap();
        assert_eq!(
            compare.result,
            etcdserverpb::compare::CompareResult::NotEqual as i32
        );
        assert_eq!(
            compare.target_union,
            Some(etcdserverpb::compare::TargetUnion::ModRevision(7))
        );
    }
}
