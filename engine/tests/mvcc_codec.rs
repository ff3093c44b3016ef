//! Properties of the MVCC log payload encoding.

use ferrocd_engine::mvcc::codec::{decode, encode, LogPayload};
use ferrocd_engine::mvcc::{Change, Effect};
use proptest::prelude::*;

fn effect() -> impl Strategy<Value = Effect> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (bytes(), bytes(), prop_oneof![Just(0i64), any::<i64>()])
            .prop_map(|(key, value, lease)| Effect::Put { key, value, lease }),
        bytes().prop_map(|key| Effect::Delete { key }),
    ]
}

fn payload() -> impl Strategy<Value = LogPayload> {
    // Subs from gaps so they are strictly increasing, some of them large.
    let gap = prop_oneof![1i64..3, 1i64..1_000_000];
    let changes = prop::collection::vec((gap, effect()), 0..20).prop_map(|gaps| {
        let mut sub = -1;
        gaps.into_iter()
            .map(|(gap, effect)| {
                sub += gap;
                Change { sub, effect }
            })
            .collect()
    });
    prop_oneof![
        (1i64..=i64::MAX, changes)
            .prop_map(|(main, changes)| LogPayload::Changes { main, changes }),
        (1i64..=i64::MAX).prop_map(|rev| LogPayload::Compact { rev }),
    ]
}

proptest! {
    #[test]
    fn round_trips(payload in payload()) {
        prop_assert_eq!(decode(&encode(&payload)), Ok(payload));
    }

    #[test]
    fn every_strict_prefix_is_rejected(payload in payload()) {
        let bytes = encode(&payload);
        for len in 0..bytes.len() {
            prop_assert!(decode(&bytes[..len]).is_err(), "prefix of {} bytes accepted", len);
        }
    }

    #[test]
    fn garbage_never_panics(
        header in prop_oneof![Just(vec![1u8, 1]), Just(vec![1u8, 2]), Just(vec![])],
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let bytes = [header, tail].concat();
        // Only canonical encodings decode: whatever is accepted encodes back to itself.
        if let Ok(payload) = decode(&bytes) {
            prop_assert_eq!(encode(&payload), bytes);
        }
    }

    #[test]
    fn corrupted_encodings_never_panic(
        payload in payload(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut bytes = encode(&payload);
        for (index, mask) in flips {
            let at = index.index(bytes.len());
            bytes[at] ^= mask;
        }
        if let Ok(decoded) = decode(&bytes) {
            prop_assert_eq!(encode(&decoded), bytes);
        }
    }
}
