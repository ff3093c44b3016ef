//! Recovery: rotation, torn tails, corruption in the middle, idempotence.

mod wal_support;

use ferrocd_engine::wal::{
    read_dir, segment_file_name, HardState, ReadItem, Wal, WalError, WalReader,
};
use wal_support::*;

const COUNT: u64 = 900;

#[test]
fn append_and_recover_across_rotation() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), COUNT);

    let recovered = recover(dir.path());
    assert_eq!(entry_indexes(&recovered), (1..=COUNT).collect::<Vec<_>>());
    for record in recovered
        .records
        .iter()
        .filter(|r| HardState::from_record(r).is_none())
    {
        assert_eq!(*record, entry(record.index));
    }
    assert_eq!(
        recovered.last_hard_state(),
        Some(HardState {
            term: 1,
            vote: 1,
            commit: 900
        })
    );
    assert!(recovered.torn_tail.is_none());
    assert!(
        recovered.segments.len() >= 3,
        "64 KiB segments must rotate: {:?}",
        recovered.segments
    );
    for (i, segment) in recovered.segments.iter().enumerate() {
        assert_eq!(segment.seq, i as u64);
        let name = segment.path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, segment_file_name(segment.seq, segment.first_index));
        assert_eq!(
            std::fs::metadata(&segment.path).unwrap().len(),
            SMALL_SEGMENT_BYTES,
            "preallocated"
        );
    }
    // Segment names carry the first entry they hold.
    for window in recovered.segments.windows(2) {
        assert_eq!(
            window[1].first_index,
            window[0].max_entry_index.unwrap() + 1
        );
    }

    // Reopening continues after the last record.
    run(|| async {
        let (wal, again) = Wal::open(dir.path(), small_options()).await.unwrap();
        assert_eq!(again, recovered);
        wal.append(&entries(COUNT + 1..=COUNT + 5)).await.unwrap();
        wal.close().await.unwrap();
    });
    assert_eq!(
        entry_indexes(&recover(dir.path())),
        (1..=COUNT + 5).collect::<Vec<_>>()
    );
}

#[test]
fn new_segments_start_with_the_latest_hard_state() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), COUNT);
    let mut seen_segments = 0;
    let mut expect_hard_state_first = false;
    for item in WalReader::open(dir.path()).unwrap() {
        match item.unwrap() {
            ReadItem::Segment { seq, .. } => {
                seen_segments += 1;
                expect_hard_state_first = seq > 0;
            }
            ReadItem::Record { record, pos, .. } => {
                if expect_hard_state_first {
                    assert!(
                        HardState::from_record(&record).is_some(),
                        "segment {} starts with {record:?}",
                        pos.seq
                    );
                    assert_eq!(pos.offset, 0);
                }
                expect_hard_state_first = false;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seen_segments >= 3);
}

#[test]
fn truncated_last_record_is_cut_and_appends_continue_there() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 100);
    let (file, offset, size, _) = positions(dir.path()).pop().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(offset + size / 2)
        .unwrap();

    let recovered = recover(dir.path());
    let torn = recovered.torn_tail.clone().expect("torn tail reported");
    assert_eq!((torn.file.as_path(), torn.offset), (file.as_path(), offset));
    let tail = recovered.tail.clone().unwrap();
    assert_eq!(tail.offset, offset);
    let kept = recovered.records.len();

    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        wal.append(&entries(500..=502)).await.unwrap();
        wal.close().await.unwrap();
    });
    let after = recover(dir.path());
    assert!(after.torn_tail.is_none(), "{:?}", after.torn_tail);
    assert_eq!(after.records.len(), kept + 3);
    assert_eq!(after.records[..kept], recovered.records[..]);
    assert_eq!(
        positions(dir.path())[kept].1,
        offset,
        "appends overwrite the cut tail"
    );
}

#[test]
fn garbage_after_the_last_record_is_cut_and_zeroed() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 100);
    let (file, offset, size, _) = positions(dir.path()).pop().unwrap();
    let garbage: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 1) as u8).collect();
    overwrite(&file, offset + size, &garbage);

    let first = recover(dir.path());
    assert_eq!(entry_indexes(&first), (1..=100).collect::<Vec<_>>());
    assert_eq!(
        first.torn_tail.as_ref().map(|t| t.offset),
        Some(offset + size)
    );
    assert_eq!(recover(dir.path()), first, "recovery only reads");

    // One small append cannot cover 3000 bytes of garbage: the writer must zero the rest.
    run(|| async {
        let (wal, _) = Wal::open(dir.path(), small_options()).await.unwrap();
        wal.append(&entries([101])).await.unwrap();
        wal.close().await.unwrap();
    });
    let after = recover(dir.path());
    assert!(after.torn_tail.is_none(), "{:?}", after.torn_tail);
    assert_eq!(entry_indexes(&after), (1..=101).collect::<Vec<_>>());
}

#[test]
fn crc_mismatch_in_the_last_record_is_a_torn_tail() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 95);
    let (file, offset, size, _) = positions(dir.path()).pop().unwrap();
    overwrite(&file, offset + size - 1, &[0xaa]);
    let recovered = recover(dir.path());
    assert_eq!(recovered.torn_tail.as_ref().map(|t| t.offset), Some(offset));
    assert_eq!(entry_indexes(&recovered), (1..=94).collect::<Vec<_>>());
}

#[test]
fn corruption_followed_by_valid_records_is_an_error_naming_file_and_offset() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 200);
    let (file, offset, _, _) = positions(dir.path())[40].clone();
    overwrite(&file, offset + 20, &[0xde, 0xad]);

    let error = read_dir(dir.path()).expect_err("corruption in the middle");
    match &error {
        WalError::Corrupt {
            file: bad_file,
            offset: bad_offset,
            detail,
        } => {
            assert_eq!((bad_file, *bad_offset), (&file, offset));
            assert!(detail.contains("crc"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let text = error.to_string();
    assert!(
        text.contains(&file.display().to_string()) && text.contains(&offset.to_string()),
        "{text}"
    );
    run(|| async {
        assert!(matches!(
            Wal::open(dir.path(), small_options()).await,
            Err(WalError::Corrupt { .. })
        ));
    });
}

#[test]
fn damaged_end_of_a_segment_followed_by_a_later_segment_is_an_error() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), COUNT);
    let first_segment = recover(dir.path()).segments[0].path.clone();
    let (_, offset, _, _) = positions(dir.path())
        .into_iter()
        .rfind(|p| p.0 == first_segment)
        .unwrap();
    overwrite(&first_segment, offset, &[0xff; 8]);
    let error = read_dir(dir.path()).expect_err("later segments hold valid records");
    assert!(
        matches!(error, WalError::Corrupt { ref file, offset: o, .. } if *file == first_segment && o == offset),
        "{error}"
    );
}

#[test]
fn zeroed_tail_is_a_clean_end_but_a_zeroed_middle_is_corruption() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 100);
    let records = positions(dir.path());
    let (file, offset, _, _) = records[records.len() - 3].clone();
    overwrite(&file, offset, &vec![0u8; 1024]);
    let recovered = recover(dir.path());
    assert!(recovered.torn_tail.is_none(), "zeros are unwritten space");
    assert_eq!(recovered.records.len(), records.len() - 3);

    let (file, offset, size, _) = records[10].clone();
    overwrite(&file, offset, &vec![0u8; size as usize]);
    let error = read_dir(dir.path()).expect_err("valid records follow the zeroed one");
    assert!(
        matches!(error, WalError::Corrupt { offset: o, .. } if o == offset),
        "{error}"
    );
}

#[test]
fn recovery_is_idempotent_across_reopen() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), COUNT);
    let (file, offset, size, _) = positions(dir.path()).pop().unwrap();
    overwrite(&file, offset + size, &[0x5a; 100]);

    let first = recover(dir.path());
    run(|| async {
        let (wal, reopened) = Wal::open(dir.path(), small_options()).await.unwrap();
        assert_eq!(reopened, first);
        wal.close().await.unwrap();
    });
    let second = recover(dir.path());
    assert!(second.torn_tail.is_none());
    assert_eq!(second.records, first.records);
    assert_eq!(second.segments, first.segments);
    assert_eq!(recover(dir.path()), second);
}

#[test]
fn a_missing_segment_is_an_error() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), COUNT);
    let segments = recover(dir.path()).segments;
    std::fs::remove_file(&segments[1].path).unwrap();
    let error = read_dir(dir.path()).expect_err("gap in the segment sequence");
    assert!(
        matches!(error, WalError::Corrupt { ref file, .. } if *file == segments[2].path),
        "{error}"
    );
}

#[test]
fn streaming_reader_reports_corruption_and_goes_on() {
    let dir = test_dir();
    write_entries(dir.path(), small_options(), 100);
    let records = positions(dir.path());
    let (file, offset, _, _) = records[30].clone();
    overwrite(&file, offset + 4, &[0x77]);

    let items: Vec<ReadItem> = WalReader::open(dir.path())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let corrupt: Vec<_> = items
        .iter()
        .filter(|i| matches!(i, ReadItem::Corrupt { .. }))
        .collect();
    assert_eq!(corrupt.len(), 1);
    assert!(
        matches!(corrupt[0], ReadItem::Corrupt { pos, skipped_bytes, .. } if pos.offset == offset && *skipped_bytes == records[30].2)
    );
    let valid = items
        .iter()
        .filter(|i| matches!(i, ReadItem::Record { .. }))
        .count();
    assert_eq!(valid, records.len() - 1, "every other record is still read");
}
