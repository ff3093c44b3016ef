//! Durability (I5) and atomicity (I2) across kill -9: every acknowledged write survives, a
//! cross-shard write is all-or-nothing, and the revision counter carries on without reuse.

mod common;

use common::Server;
use etcd_client::{DeleteOptions, GetOptions, Txn, TxnOp};

const KEYS: usize = 120;

#[tokio::test]
async fn acknowledged_writes_survive_kill9_immediately_after_the_ack() {
    let mut server = Server::ferrocd(&["--shards", "4"]).await;
    let mut client = server.client().await;
    let mut last_rev = 0;
    for i in 0..KEYS {
        let key = format!("key/{i:04}");
        if i % 10 == 9 {
            // A txn over two keys on (very likely) different shards goes through the meta group.
            let txn = Txn::new().and_then(vec![
                TxnOp::put(key.clone(), format!("v{i}"), None),
                TxnOp::put(format!("pair/{i:04}"), format!("v{i}"), None),
            ]);
            last_rev = client.txn(txn).await.unwrap().header().unwrap().revision();
        } else {
            last_rev = client
                .put(key, format!("v{i}"), None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision();
        }
    }
    // A range delete (every shard, meta group) as the very last acknowledged write.
    let deleted = client
        .delete("pair/0009", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 1);
    last_rev = last_rev.max(deleted.header().unwrap().revision());
    drop(client);
    server.crash_restart().await;

    let mut client = server.client().await;
    let all = client
        .get("key/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), KEYS as i64, "every acknowledged put survived");
    assert_eq!(
        all.header().unwrap().revision(),
        last_rev,
        "no acknowledged revision was lost"
    );
    let pairs = client
        .get("pair/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        pairs.count(),
        (KEYS / 10 - 1) as i64,
        "the cross-shard delete survived whole"
    );
    let next = client.put("after", "crash", None).await.unwrap();
    assert_eq!(
        next.header().unwrap().revision(),
        last_rev + 1,
        "revisions continue without reuse"
    );
}
