//! Structured logs: every stderr line is a zap-shaped JSON object, start-up facts are logged,
//! `--log-level` filters, and a torn WAL tail cut at start-up is a warn line naming the file and
//! the offset.

mod common;

use common::Server;
use ferrocd_engine::wal::read_dir;
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};

#[tokio::test]
async fn json_log_lines_carry_level_ts_caller_msg_and_start_up_facts() {
    let mut server = Server::ferrocd(&["--log-format", "json", "--shards", "2"]).await;
    server.client().await.put("k", "v", None).await.unwrap();
    server.stop();
    let lines = server.log_lines();
    for line in &lines {
        for key in ["level", "ts", "caller", "msg"] {
            assert!(line[key].is_string(), "{key} missing in {line}");
        }
        let ts = line["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z'),
            "ts {ts} is not RFC 3339 UTC"
        );
    }
    let data_dir = server.data_dir().canonicalize().unwrap();
    let start = [
        ("data-dir", Value::from(data_dir.to_str().unwrap())),
        ("name", "node1".into()),
        ("shards", 2.into()),
    ];
    assert!(
        server.logged("starting ferrocd", &start),
        "{}",
        server.log()
    );
    let member = lines
        .iter()
        .find(|line| line["msg"] == "starting local member")
        .expect("member line");
    assert_eq!(member["cluster-id"].as_str().map(str::len), Some(16));
    assert!(server.logged("received a signal, shutting down", &[]));
}

#[tokio::test]
async fn console_format_is_tab_separated() {
    let mut server = Server::ferrocd(&["--log-format", "console"]).await;
    server.stop();
    let log = server.log();
    let line = log
        .lines()
        .find(|line| line.contains("starting local member"))
        .expect("member line");
    let columns: Vec<&str> = line.split('\t').collect();
    assert_eq!(columns.len(), 5, "{line}");
    assert_eq!(columns[1], "INFO");
}

/// A server that logs only warnings and above prints no info line; after a crash that left
/// garbage at the end of a shard's WAL, the restart cuts it and warns with file and offset.
#[tokio::test]
async fn a_torn_wal_tail_is_a_warn_line_with_file_and_offset_and_warn_hides_info() {
    let mut server = Server::ferrocd(&["--log-level", "warn", "--shards", "1"]).await;
    server.client().await.put("k", "v", None).await.unwrap();
    server.kill9();
    let wal_dir = server
        .data_dir()
        .canonicalize()
        .unwrap()
        .join("wal/shard-000");
    let recovered = read_dir(&wal_dir).unwrap();
    let tail = recovered.tail.expect("a WAL tail");
    let segment = recovered
        .segments
        .iter()
        .find(|segment| segment.seq == tail.seq)
        .expect("the tail's segment");
    // A record header whose length and CRC are garbage, where the next record would go.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .unwrap();
    file.seek(SeekFrom::Start(tail.offset)).unwrap();
    file.write_all(&[0xab; 64]).unwrap();
    file.sync_all().unwrap();
    drop(file);

    server.start().await;
    let value = server.client().await.get("k", None).await.unwrap();
    assert_eq!(
        value.kvs()[0].value(),
        b"v",
        "the acknowledged put survived"
    );
    server.stop();
    let torn = [
        ("level", Value::from("warn")),
        ("file", segment.path.to_str().unwrap().into()),
        ("offset", tail.offset.into()),
    ];
    assert!(
        server.logged("cut a torn WAL tail", &torn),
        "{}",
        server.log()
    );
    let levels: Vec<Value> = server
        .log_lines()
        .into_iter()
        .map(|l| l["level"].clone())
        .collect();
    assert!(!levels.contains(&"info".into()), "{}", server.log());
}
