//! Hostile zTOCs and layers cost bounded memory: zTOCs whose entries share one table, span
//! lengths no compressed bytes can hold, sizes beyond the blob, and layers whose table of
//! contents would dwarf them.

use std::io::Write;

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use hermes_ztoc::{Compression, EntryKind, Error, Limit, Limits, Ztoc};

use crate::alloc::peak_bytes;
use crate::support::{options, read};

const MIB: u64 = 1 << 20;

/// A zTOC with `base`'s sizes, checkpoints and digests and `count` directory entries that all
/// point at one table with a `name_len`-byte name (soci's schema, written by hand).
fn ztoc_sharing_one_entry(base: &Ztoc, name_len: usize, count: usize) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let version = b.create_string("0.9");
    let bti = b.create_string(base.build_tool_identifier());
    let name = b.create_vector(&vec![b'a'; name_len]);
    let kind = b.create_string("dir");
    let start = b.start_table();
    b.push_slot_always(4, name);
    b.push_slot_always(6, kind);
    b.push_slot::<i64>(8, 512, 0);
    let entry = b.end_table(start);
    let metadata = b.create_vector(&vec![entry; count]);
    let start = b.start_table();
    b.push_slot_always(4, metadata);
    let toc = b.end_table(start);
    let checkpoints = b.create_vector(base.checkpoints());
    let digests: Vec<WIPOffset<&str>> = base
        .span_digests()
        .iter()
        .map(|d| b.create_string(d))
        .collect();
    let digests = b.create_vector(&digests);
    let start = b.start_table();
    let algorithm: i8 = match base.compression() {
        Compression::Gzip => 1,
        Compression::Uncompressed => 2,
        Compression::Zstd => 3,
    };
    b.push_slot_always::<i8>(4, algorithm);
    b.push_slot_always::<i32>(6, base.span_count() as i32 - 1);
    b.push_slot_always(8, digests);
    b.push_slot_always(10, checkpoints);
    let ci = b.end_table(start);
    let start = b.start_table();
    b.push_slot_always(4, version);
    b.push_slot_always(6, bti);
    b.push_slot::<i64>(8, base.compressed_archive_size() as i64, 0);
    b.push_slot::<i64>(10, base.uncompressed_archive_size() as i64, 0);
    b.push_slot_always(12, toc);
    b.push_slot_always(14, ci);
    let root = b.end_table(start);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

#[test]
fn entries_sharing_one_large_name_are_refused_without_decoding_them() {
    // What made `hermes ztoc info` take 2.07 GB for a 1.06 MB zTOC, scaled down: 8192 offsets
    // to one entry with a 64 KiB name, 512 MiB once decoded.
    let base = Ztoc::from_bytes(&read("soci/pax.tar.1048576.ztoc")).expect("golden");
    let hostile = ztoc_sharing_one_entry(&base, 64 << 10, 8192);
    let (parsed, peak) = peak_bytes(|| Ztoc::from_bytes(&hostile));
    let size = hostile.len() as u64;
    match parsed {
        Err(Error::DecodeTooLarge { size: s, limit }) => {
            assert_eq!(s, size);
            assert_eq!(limit, 4 * size, "four times the zTOC");
        }
        other => panic!(
            "expected DecodeTooLarge, got {:?}",
            other.map(|z| z.entries().len())
        ),
    }
    assert!(
        peak <= 4 * size,
        "parsing a {size}-byte zTOC peaked at {peak} bytes"
    );
}

#[test]
fn honest_ztocs_decode_within_four_times_their_size() {
    // Many entries with short names and no data: the most entries per zTOC byte a real layer has.
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..20_000 {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if i % 2 == 0 {
            tar::EntryType::Regular
        } else {
            tar::EntryType::Directory
        });
        h.set_mode(0o644);
        h.set_size(0);
        tar.append_data(&mut h, format!("{i}"), std::io::empty())
            .expect("append");
    }
    let tar = tar.into_inner().expect("tar");
    let many = hermes_ztoc::build(tar.as_slice(), &options(1 << 20))
        .expect("build")
        .to_bytes();
    let goldens = [
        "soci/pax.tar.1048576.ztoc",
        "soci/pax.tar.gz.65536.ztoc",
        "soci/gnu.tar.gz.65536.ztoc",
        "soci/multi.tar.gz.65536.ztoc",
    ];
    let cases = goldens
        .iter()
        .map(|name| (name.to_string(), read(name)))
        .chain([("20,000 empty entries".to_string(), many)]);
    for (name, bytes) in cases {
        let (parsed, peak) = peak_bytes(|| Ztoc::from_bytes(&bytes));
        let z = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = bytes.len() as u64;
        assert!(
            peak <= 4 * size,
            "{name}: {} entries in {size} bytes peaked at {peak} bytes",
            z.entries().len()
        );
    }
}

/// Where the little-endian bytes of `value` sit in `buf` (exactly once, or the test is wrong).
fn field_at(buf: &[u8], value: u64) -> usize {
    let needle = value.to_le_bytes();
    let hits: Vec<usize> = buf
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{value} must occur once in the zTOC");
    hits[0]
}

fn with_field(buf: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut out = buf.to_vec();
    out[at..at + 8].copy_from_slice(&value.to_le_bytes());
    out
}

#[test]
fn a_flipped_bit_in_the_tar_size_never_allocates_what_it_claims() {
    // One bit flip asked for 1.1 PB and aborted the process (exit 134).
    let golden = read("soci/pax.tar.gz.65536.ztoc");
    let layer = read("soci/pax.tar.gz");
    let z = Ztoc::from_bytes(&golden).expect("golden");
    let size = z.uncompressed_archive_size();
    let at = field_at(&golden, size);
    let last = z.span(z.span_count() - 1).expect("last span");
    let compressed = &layer[last.compressed.start as usize..last.compressed.end as usize];
    let err = Ztoc::from_bytes(&with_field(&golden, at, size | 1 << 50)).expect_err("1.1 PB");
    assert!(
        matches!(&err, Error::Invalid { what, index } if what.contains("more bytes than its compressed bytes can hold") && *index == u64::from(last.id)),
        "{err}"
    );
    let mut parsed_larger = 0;
    for bit in 0..63 {
        let flipped = size ^ (1 << bit);
        let Ok(bad) = Ztoc::from_bytes(&with_field(&golden, at, flipped)) else {
            continue;
        };
        let (decoded, peak) = peak_bytes(|| bad.decode_span(last.id, compressed));
        assert!(
            peak < 4 * MIB,
            "bit {bit}: decoding the last span ({} compressed bytes) peaked at {peak} bytes",
            compressed.len()
        );
        if flipped > size {
            parsed_larger += 1;
            assert!(
                matches!(decoded, Err(Error::SpanDecode { span, .. }) if span == last.id),
                "bit {bit}: a span claiming {flipped} - {} bytes must fail to decode: {:?}",
                last.uncompressed.start,
                decoded.map(|d| d.len())
            );
        }
    }
    assert!(
        parsed_larger >= 4,
        "the claims a span's bytes could hold parse (and fail on decode): {parsed_larger}"
    );
}

#[test]
fn a_compressed_size_beyond_the_file_is_a_read_error_not_an_allocation() {
    let golden = read("soci/pax.tar.gz.65536.ztoc");
    let layer = crate::support::data("soci/pax.tar.gz");
    let z = Ztoc::from_bytes(&golden).expect("golden");
    let size = z.compressed_archive_size();
    let claimed = size + (16 << 30);
    let bad = Ztoc::from_bytes(&with_field(&golden, field_at(&golden, size), claimed))
        .expect("a larger blob size is consistent on its own");
    let last = bad.span(bad.span_count() - 1).expect("last span");
    let file = bad
        .entries()
        .iter()
        .rfind(|e| e.kind == EntryKind::Reg && e.size > 0 && e.offset >= last.uncompressed.start)
        .expect("a file in the last span")
        .display_name();
    let blob = std::fs::File::open(&layer).expect("open layer");
    let (result, peak) = peak_bytes(|| bad.extract(&blob, &file, &mut std::io::sink()));
    assert!(
        matches!(&result, Err(Error::RangeRead { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "{result:?}"
    );
    assert!(peak < MIB, "reading {file} peaked at {peak} bytes");
}

/// Write a tar straight into gzip (tiny, however large the tar).
fn gzip_tar(fill: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>)) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    fill(&mut tar);
    let mut gz = tar.into_inner().expect("tar");
    gz.flush().expect("flush");
    gz.finish().expect("gzip")
}

fn not_indexable(result: hermes_ztoc::Result<Ztoc>, want: Limit) -> String {
    match result {
        Err(e @ Error::NotIndexable { limit, .. }) if limit == want => e.to_string(),
        other => panic!(
            "expected not indexable ({want:?}), got {:?}",
            other.map(|z| (z.entries().len(), z.to_bytes().len()))
        ),
    }
}

#[test]
fn ten_thousand_nested_directories_are_not_indexable() {
    // 335 KiB of layer made a 193 MiB zTOC: every name repeats all its parents.
    let layer = gzip_tar(|tar| {
        let mut path = String::new();
        for _ in 0..10_000 {
            path.push_str("d/");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            tar.append_data(&mut h, &path, std::io::empty())
                .expect("append");
        }
    });
    assert!(layer.len() < MIB as usize, "{} bytes", layer.len());
    let message = not_indexable(
        hermes_ztoc::build(layer.as_slice(), &options(1 << 20)),
        Limit::Depth,
    );
    assert!(
        message.starts_with("not indexable: the entry at uncompressed offset ")
            && message.ends_with(" is more than 1024 directories deep"),
        "{message}"
    );
}

#[test]
fn megabyte_pax_paths_are_not_indexable() {
    // A 206 KiB layer made a 382 MiB zTOC: 1 MB PAX paths, each kept as the name and as a record.
    let layer = gzip_tar(|tar| {
        for i in 0..200u32 {
            let mut path = format!("{i:03}/").into_bytes();
            path.resize(1_000_000, b'p');
            tar.append_pax_extensions([("path", path.as_slice())])
                .expect("pax");
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_path(format!("short-{i}")).expect("path");
            h.set_mode(0o644);
            h.set_size(0);
            h.set_cksum();
            tar.append(&h, std::io::empty()).expect("append");
        }
    });
    assert!(layer.len() < 512 << 10, "{} bytes", layer.len());
    let message = not_indexable(
        hermes_ztoc::build(layer.as_slice(), &options(1 << 20)),
        Limit::NameBytes,
    );
    assert!(
        message.contains("take more than 134217728 bytes"),
        "{message}"
    );
}

#[test]
fn each_build_limit_refuses_one_past_it_and_accepts_it() {
    let layer = gzip_tar(|tar| {
        for i in 0..10 {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            tar.append_data(&mut h, format!("a/b/{i}/"), std::io::empty())
                .expect("append");
        }
    });
    let built = hermes_ztoc::build(layer.as_slice(), &options(1 << 20)).expect("defaults");
    let names: u64 = built
        .entries()
        .iter()
        .map(|e| (e.name.len() + e.uname.len() + e.gname.len()) as u64)
        .sum();
    let exact = Limits {
        max_entries: 10,
        max_name_bytes: names,
        max_depth: 3,
    };
    for (limits, refused) in [
        (exact, None),
        (
            Limits {
                max_entries: 9,
                ..exact
            },
            Some(Limit::Entries),
        ),
        (
            Limits {
                max_name_bytes: names - 1,
                ..exact
            },
            Some(Limit::NameBytes),
        ),
        (
            Limits {
                max_depth: 2,
                ..exact
            },
            Some(Limit::Depth),
        ),
    ] {
        let result = hermes_ztoc::build(
            layer.as_slice(),
            &hermes_ztoc::BuildOptions {
                limits,
                ..options(1 << 20)
            },
        );
        match refused {
            None => assert!(
                result.expect("at the limits").to_bytes() == built.to_bytes(),
                "limits never change a zTOC"
            ),
            Some(limit) => {
                not_indexable(result, limit);
            }
        }
    }
}
