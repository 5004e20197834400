//! Property tests: for generated tars in every supported encoding, every file read through the
//! zTOC equals the original, and only the spans overlapping a file are read.

use std::io::Write;

use hermes_ztoc::{Compression, CountingReader, EntryKind, Ztoc};
use proptest::prelude::*;

use crate::support::{options, tar_files};

/// One generated tar entry.
#[derive(Debug, Clone)]
pub enum Item {
    File {
        name: String,
        body: Vec<u8>,
        xattr: Option<Vec<u8>>,
    },
    Dir {
        name: String,
    },
    Symlink {
        name: String,
        target: String,
    },
    /// A hard link to the file generated just before it.
    Hardlink {
        name: String,
    },
}

/// Contents that compress like real files: runs of text mixed with noise.
fn body(max: usize) -> impl Strategy<Value = Vec<u8>> {
    (0..=max, any::<u64>(), 0u8..4).prop_map(|(len, seed, kind)| {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..len)
            .map(|i| match kind {
                0 => (next() & 0xff) as u8,
                1 => b"the quick brown fox jumps over the lazy dog\n"[i % 44],
                2 => {
                    if next() % 8 == 0 {
                        (next() & 0xff) as u8
                    } else {
                        b'a' + (i % 7) as u8
                    }
                }
                _ => 0,
            })
            .collect()
    })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z]{1,12}(/[a-z0-9_]{1,10}(\\.[a-z]{1,3})?){0,3}",
        1 => "[a-z]{60,80}/[a-z]{60,90}", // > 100 bytes: needs a GNU long name or PAX path
    ]
}

fn item(max_file: usize) -> impl Strategy<Value = Item> {
    prop_oneof![
        6 => (name(), body(max_file), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)))
            .prop_map(|(name, body, xattr)| Item::File { name, body, xattr }),
        1 => name().prop_map(|name| Item::Dir { name }),
        1 => (name(), "[a-z/.]{1,150}").prop_map(|(name, target)| Item::Symlink { name, target }),
        1 => name().prop_map(|name| Item::Hardlink { name }),
    ]
}

/// Write items as a tar with the `tar` crate (an independent writer). Names are made unique
/// with an index so later entries never shadow earlier ones.
pub fn make_tar(items: &[Item], pax: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut last_file: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let mut h = if pax {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.set_mtime(1_700_000_000 + i as u64);
        h.set_uid(i as u64 % 3);
        h.set_gid(1000);
        match item {
            Item::File { name, body, xattr } => {
                let name = format!("{name}.{i}");
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(body.len() as u64);
                if let (true, Some(x)) = (pax, xattr) {
                    b.append_pax_extensions([("SCHILY.xattr.user.test", x.as_slice())])
                        .expect("pax");
                }
                b.append_data(&mut h, &name, body.as_slice())
                    .expect("append file");
                last_file = Some(name);
            }
            Item::Dir { name } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}.{i}/"), std::io::empty())
                    .expect("append dir");
            }
            Item::Symlink { name, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, format!("{name}.{i}"), target)
                    .expect("append symlink");
            }
            Item::Hardlink { name } => {
                let Some(target) = &last_file else { continue };
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, format!("{name}.{i}"), target)
                    .expect("append hardlink");
            }
        }
    }
    b.into_inner().expect("finish tar")
}

#[derive(Debug, Clone, Copy)]
pub enum Encoding {
    Plain,
    Gzip { level: u32, members: usize },
    Zstd { frames: usize },
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::Plain),
        (prop_oneof![Just(1u32), Just(6), Just(9)], 1usize..4)
            .prop_map(|(level, members)| Encoding::Gzip { level, members }),
        (2usize..6).prop_map(|frames| Encoding::Zstd { frames }),
    ]
}

/// Split `data` into `n` roughly equal pieces.
fn pieces(data: &[u8], n: usize) -> impl Iterator<Item = &[u8]> {
    let chunk = data.len().div_ceil(n.max(1)).max(1);
    data.chunks(chunk)
}

pub fn encode(tar: &[u8], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Plain => tar.to_vec(),
        Encoding::Gzip { level, members } => {
            let mut out = Vec::new();
            for piece in pieces(tar, members) {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
                gz.write_all(piece).expect("gzip");
                out.extend(gz.finish().expect("gzip"));
            }
            out
        }
        Encoding::Zstd { frames } => {
            let mut out = Vec::new();
            for piece in pieces(tar, frames) {
                out.extend(zstd::bulk::compress(piece, 3).expect("zstd"));
            }
            out
        }
    }
}

/// Build, round-trip, and read every file; assert minimal reads.
pub fn check_layer(tar: &[u8], layer: &[u8], span: u64) -> Ztoc {
    let ztoc = hermes_ztoc::build(layer, &options(span)).expect("build");
    let streamed = crate::support::streamed(layer, &options(span)).expect("streamed build");
    assert!(
        streamed == ztoc.to_bytes(),
        "streamed zTOC differs from the in-memory one ({} vs {} bytes)",
        streamed.len(),
        ztoc.to_bytes().len()
    );
    let reparsed = Ztoc::from_bytes(&ztoc.to_bytes()).expect("parse our own zTOC");
    assert!(
        reparsed.to_bytes() == ztoc.to_bytes(),
        "serialization is not stable"
    );
    assert_eq!(reparsed.entries(), ztoc.entries());

    let files = tar_files(tar);
    let index = ztoc.path_index().expect("index");
    for (path, want) in &files {
        let counting = CountingReader::new(layer);
        let mut got = Vec::new();
        ztoc.extract(&counting, path, &mut got)
            .unwrap_or_else(|e| panic!("extract {path}: {e}"));
        assert!(
            &got == want,
            "{path}: {} bytes extracted, {} expected",
            got.len(),
            want.len()
        );

        // Bytes read are exactly the compressed spans overlapping the file.
        let entry = &ztoc.entries()[index[path.as_bytes()]];
        let expected = if entry.size == 0 {
            0
        } else {
            let first = ztoc.span_of(entry.offset);
            let last = ztoc.span_of(entry.offset + entry.size - 1);
            let a = ztoc.span(first).expect("span").compressed.start;
            let b = ztoc.span(last).expect("span").compressed.end;
            b - a
        };
        assert_eq!(counting.bytes(), expected, "{path}: compressed bytes read");
        assert!(
            counting.requests() <= 1,
            "{path}: one range request per file"
        );
    }
    assert_eq!(
        ztoc.entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Reg)
            .count(),
        tar_regular_count(tar),
        "regular file count"
    );
    ztoc
}

fn tar_regular_count(tar: &[u8]) -> usize {
    tar::Archive::new(tar)
        .entries()
        .expect("entries")
        .filter(|e| e.as_ref().expect("entry").header().entry_type() == tar::EntryType::Regular)
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_file_reads_back_through_the_ztoc(
        items in proptest::collection::vec(item(200_000), 0..40),
        pax in any::<bool>(),
        encoding in encoding(),
        span in prop_oneof![Just(4096u64), Just(32768), Just(65536), Just(1 << 20)],
    ) {
        let tar = make_tar(&items, pax);
        let layer = encode(&tar, encoding);
        let ztoc = check_layer(&tar, &layer, span);
        let expected = match encoding {
            Encoding::Plain => Compression::Uncompressed,
            Encoding::Gzip { .. } => Compression::Gzip,
            Encoding::Zstd { .. } => Compression::Zstd,
        };
        prop_assert_eq!(ztoc.compression(), expected);
        prop_assert_eq!(ztoc.compressed_archive_size(), layer.len() as u64);
    }
}

#[test]
fn thousands_of_entries_and_multi_span_files() {
    let mut items: Vec<Item> = (0..3000)
        .map(|i| Item::File {
            name: format!("d{}/f", i % 50),
            body: vec![(i % 251) as u8; i % 700],
            xattr: None,
        })
        .collect();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    items.push(Item::File {
        name: "big/blob".into(),
        body: big,
        xattr: Some(b"v".to_vec()),
    });
    items.push(Item::File {
        name: "empty".into(),
        body: Vec::new(),
        xattr: None,
    });
    let tar = make_tar(&items, true);
    for encoding in [
        Encoding::Gzip {
            level: 6,
            members: 3,
        },
        Encoding::Plain,
        Encoding::Zstd { frames: 8 },
    ] {
        let layer = encode(&tar, encoding);
        let ztoc = check_layer(&tar, &layer, 65536);
        assert!(
            ztoc.entries().len() >= 3002,
            "{encoding:?}: {} entries",
            ztoc.entries().len()
        );
        assert!(
            ztoc.span_count() > 4,
            "{encoding:?}: {} spans",
            ztoc.span_count()
        );
    }
}

#[test]
fn xattrs_come_from_schily_pax_records() {
    let items = vec![Item::File {
        name: "x".into(),
        body: b"data".to_vec(),
        xattr: Some(vec![0, 1, 255, b'=']),
    }];
    let tar = make_tar(&items, true);
    let ztoc = hermes_ztoc::build(tar.as_slice(), &options(65536)).expect("build");
    let entry = &ztoc.entries()[0];
    let xattrs: Vec<_> = entry.xattrs().collect();
    assert_eq!(xattrs, vec![(&b"user.test"[..], &[0u8, 1, 255, b'='][..])]);
}
