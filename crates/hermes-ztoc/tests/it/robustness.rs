//! Parsing hostile bytes returns an error and never panics.

use hermes_ztoc::Ztoc;
use proptest::prelude::*;

use crate::support::read;

/// Everything a reader might do with a parsed zTOC must also be panic-free.
fn exercise(bytes: &[u8], layer: &[u8]) {
    let Ok(z) = Ztoc::from_bytes(bytes) else {
        return;
    };
    let _ = z.to_bytes();
    let _ = z.path_index();
    for span in z.spans().take(4) {
        if let Some(bytes) = layer.get(span.compressed.start as usize..span.compressed.end as usize)
        {
            let _ = z.decode_span(span.id, bytes);
        }
    }
    for (i, e) in z.entries().iter().enumerate().take(8) {
        let _ = z.plan_entry(i, 0..e.size.min(1 << 20));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn mutated_ztocs_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let golden = read("soci/pax.tar.1048576.ztoc");
        let layer = read("soci/pax.tar");
        let mut bytes = golden.clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        exercise(&bytes, &layer);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(Ztoc::from_bytes(&bytes).is_err() || !bytes.is_empty());
        exercise(&bytes, &[]);
    }

    #[test]
    fn absurd_lengths_are_rejected_without_allocating(len in any::<u32>(), at in 0usize..64) {
        // Overwrite a length or offset word near the start with a huge value.
        let mut bytes = read("soci/pax.tar.1048576.ztoc");
        let at = at * 4;
        bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        exercise(&bytes, &[]);
    }
}

#[test]
fn truncations_of_a_gzip_ztoc_all_fail_cleanly() {
    let golden = read("soci/gnu.tar.gz.65536.ztoc");
    for cut in (0..golden.len()).step_by(997) {
        assert!(
            Ztoc::from_bytes(&golden[..cut]).is_err(),
            "a zTOC cut at {cut} bytes must not parse"
        );
    }
}
