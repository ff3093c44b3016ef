//! `ferrocd-bench compare` in a short mode (tiny key count, 300 ms steps) against a real etcd
//! and the ferrocd binary of this workspace: the Markdown, JSON and SVG it writes.
//!
//! The ferrocd binary is taken from the target dir next to `ferrocd-bench`; `cargo test
//! --workspace` builds it (with `-p ferrocd-bench` alone, build it first: `cargo build --bin
//! ferrocd`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Normally about 10 s (single node) or 15 s (three etcd members); this only stops a hang.
const COMPARE_TIMEOUT_MS: u64 = 120_000;
/// Rows of the quick suite: the load phase and nine workloads.
const QUICK_ROWS: usize = 10;

fn ferrocd_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_ferrocd-bench")).with_file_name("ferrocd");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --bin ferrocd)",
        path.display()
    );
    path
}

async fn run_compare(out_dir: &Path, extra_args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferrocd-bench"))
        .args([
            "compare",
            "--suite",
            "quick",
            "--keys",
            "200",
            "--step-ms",
            "300",
        ])
        .arg("--ferrocd")
        .arg(ferrocd_binary())
        .arg("--out-dir")
        .arg(out_dir)
        .args(extra_args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_millis(COMPARE_TIMEOUT_MS), run)
        .await
        .expect("compare finished in time")
        .expect("compare ran");
    assert!(
        output.status.success(),
        "compare failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    output
}

fn read_json(out_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out_dir.join("compare.json")).expect("compare.json");
    serde_json::from_str(&text).expect("compare.json parses")
}

/// The tag names of `svg` in document order, checked to nest properly: `<a>` ... `</a>`,
/// `<b/>` self-closing. Returns the opening tags (self-closing ones included).
fn balanced_tags(svg: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("every tag is closed by >") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop().as_deref(), Some(name), "unbalanced </{name}>");
            continue;
        }
        let name = tag
            .split_whitespace()
            .next()
            .expect("tag name")
            .trim_end_matches('/');
        seen.push(tag.to_string());
        if !tag.ends_with('/') {
            open.push(name.to_string());
        }
    }
    assert!(open.is_empty(), "unclosed tags: {open:?}");
    seen
}

/// Opening tags of `svg` whose text contains `needle`.
fn count_tags(tags: &[String], needle: &str) -> usize {
    tags.iter().filter(|tag| tag.contains(needle)).count()
}

#[tokio::test]
async fn short_quick_compare_writes_markdown_json_and_a_chart() {
    let out_dir = tempfile::tempdir().expect("temp dir");
    let output = run_compare(out_dir.path(), &[]).await;

    let json = read_json(out_dir.path());
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), QUICK_ROWS, "{json}");
    assert_eq!(json["keys_loaded"], 200);
    assert_eq!(json["cluster_size"], 1);
    for row in rows {
        let etcd = &row["etcd"]["measured"];
        assert!(etcd["ops"].as_u64().expect("etcd ops") > 0, "{row}");
        assert_eq!(etcd["errors"], 0, "{row}");
        let ferrocd = &row["ferrocd"];
        let workload = row["workload"].as_str().expect("name");
        let needs_watch_or_lease = workload.starts_with("watch") || workload.starts_with("lease");
        if ferrocd["unsupported"].is_string() {
            // Marked, not failed: only where ferrocd lacks the service.
            assert!(needs_watch_or_lease, "{row}");
        } else {
            assert!(
                ferrocd["measured"]["ops"].as_u64().expect("ops") > 0,
                "{row}"
            );
        }
    }
    let watch = rows
        .iter()
        .find(|r| r["workload"] == "watch w16 c8")
        .expect("watch");
    let events = &watch["etcd"]["measured"]["watch"];
    assert_eq!(
        events["events_received"], events["events_expected"],
        "{watch}"
    );
    for server in ["etcd", "ferrocd"] {
        let footprint = &json[server];
        assert!(
            footprint["peak_rss_bytes"].as_u64().expect("rss") > 1 << 20,
            "{json}"
        );
        assert!(
            footprint["data_dir_bytes_after_load"]
                .as_u64()
                .expect("disk")
                > 0
        );
    }

    let markdown = std::fs::read_to_string(out_dir.path().join("compare.md")).expect("md");
    assert!(String::from_utf8_lossy(&output.stdout).contains(&markdown));
    assert!(
        markdown.contains("| load 200 keys (put c32) |"),
        "{markdown}"
    );
    assert!(markdown.contains("| peak RSS (VmHWM) |"), "{markdown}");
    let table_rows = markdown.lines().filter(|l| l.starts_with("| ")).count();
    assert_eq!(
        table_rows,
        1 + QUICK_ROWS + 1 + 2,
        "two headers, rows, footprints"
    );

    let svg = std::fs::read_to_string(out_dir.path().join("compare.svg")).expect("svg");
    assert!(svg.starts_with("<svg "), "{svg}");
    let tags = balanced_tags(&svg);
    // Two panels: one bar per workload and server, or an n/a mark where unsupported.
    assert_eq!(count_tags(&tags, r#"class="bar etcd""#), 2 * QUICK_ROWS);
    let unsupported = rows
        .iter()
        .filter(|r| r["ferrocd"]["unsupported"].is_string())
        .count();
    assert_eq!(
        count_tags(&tags, r#"class="bar ferrocd""#),
        2 * (QUICK_ROWS - unsupported)
    );
    assert_eq!(count_tags(&tags, r#"class="unsupported""#), 2 * unsupported);
}

#[tokio::test]
async fn a_three_member_compare_runs_etcd_and_marks_a_server_that_cannot_cluster() {
    let out_dir = tempfile::tempdir().expect("temp dir");
    run_compare(out_dir.path(), &["--cluster", "3"]).await;

    let json = read_json(out_dir.path());
    assert_eq!(json["cluster_size"], 3);
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), QUICK_ROWS, "{json}");
    for row in rows {
        assert!(
            row["etcd"]["measured"]["ops"].as_u64().expect("ops") > 0,
            "{row}"
        );
    }
    // ferrocd either forms the cluster and is measured, or exits at start-up and is marked.
    if json["ferrocd"].is_null() {
        for row in rows {
            let reason = row["ferrocd"]["unsupported"].as_str().expect("marked");
            assert!(reason.starts_with("clustering not built"), "{row}");
        }
        let markdown = std::fs::read_to_string(out_dir.path().join("compare.md")).expect("md");
        assert!(markdown.contains("| unsupported | n/a |"), "{markdown}");
    }
    assert!(json["etcd"]["peak_rss_bytes"].as_u64().expect("rss") > 3 << 20);
}
