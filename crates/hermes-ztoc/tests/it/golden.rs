//! soci's own zTOCs are the reference: ours must be byte-identical, and theirs must read back.

use hermes_ztoc::Ztoc;

use crate::support::{check_every_file, data, decompress, options, read, streamed};

const GOLDENS: &[(&str, u64)] = &[
    ("pax.tar", 1 << 20),
    ("pax.tar.gz", 65536),
    ("gnu.tar.gz", 65536),
    ("multi.tar.gz", 65536),
];

#[test]
fn builds_byte_identical_ztocs_to_soci() {
    for &(layer, span) in GOLDENS {
        let blob = read(&format!("soci/{layer}"));
        let golden = read(&format!("soci/{layer}.{span}.ztoc"));
        let ours = hermes_ztoc::build(blob.as_slice(), &options(span))
            .unwrap_or_else(|e| panic!("{layer}: {e}"));
        let bytes = ours.to_bytes();
        let streamed = streamed(&blob, &options(span)).unwrap_or_else(|e| panic!("{layer}: {e}"));
        assert!(
            streamed == golden,
            "{layer}: streamed zTOC differs from soci's ({} vs {} bytes)",
            streamed.len(),
            golden.len()
        );
        if bytes != golden {
            let theirs = Ztoc::from_bytes(&golden).expect("golden parses");
            assert_eq!(
                ours.compressed_archive_size(),
                theirs.compressed_archive_size(),
                "{layer}: compressed size"
            );
            assert_eq!(
                ours.uncompressed_archive_size(),
                theirs.uncompressed_archive_size(),
                "{layer}: uncompressed size"
            );
            assert_eq!(
                ours.entries().len(),
                theirs.entries().len(),
                "{layer}: entry count"
            );
            for (a, b) in ours.entries().iter().zip(theirs.entries()) {
                assert_eq!(a, b, "{layer}: entry differs");
            }
            assert_eq!(
                ours.span_digests(),
                theirs.span_digests(),
                "{layer}: span digests"
            );
            assert!(
                ours.checkpoints() == theirs.checkpoints(),
                "{layer}: checkpoint blobs differ"
            );
            panic!(
                "{layer}: decoded fields agree but bytes differ ({} vs {} bytes)",
                bytes.len(),
                golden.len()
            );
        }
    }
}

#[test]
fn soci_ztocs_parse_and_round_trip() {
    for &(layer, span) in GOLDENS {
        let golden = read(&format!("soci/{layer}.{span}.ztoc"));
        let ztoc = Ztoc::from_bytes(&golden).unwrap_or_else(|e| panic!("{layer}: {e}"));
        assert_eq!(ztoc.span_size(), span, "{layer}");
        assert_eq!(ztoc.build_tool_identifier(), "AWS SOCI CLI v0.2");
        assert!(
            ztoc.to_bytes() == golden,
            "{layer}: re-serialized zTOC differs from soci's"
        );
    }
}

#[test]
fn every_file_extracts_through_socis_ztocs() {
    for &(layer, span) in GOLDENS {
        let blob = read(&format!("soci/{layer}"));
        let ztoc = Ztoc::from_bytes(&read(&format!("soci/{layer}.{span}.ztoc"))).expect("parse");
        let tar = decompress(&blob);
        let (files, _) = check_every_file(&ztoc, &blob, &tar);
        assert!(files > 10, "{layer}: only {files} files");
    }
}

#[test]
fn socis_ztocs_opened_with_their_windows_on_disk_decode_the_same() {
    for &(layer, span) in GOLDENS {
        let path = data(&format!("soci/{layer}.{span}.ztoc"));
        let in_memory =
            Ztoc::from_bytes(&read(&format!("soci/{layer}.{span}.ztoc"))).expect("parse");
        let opened = Ztoc::open(&path).unwrap_or_else(|e| panic!("{layer}: {e}"));
        if in_memory.compression() == hermes_ztoc::Compression::Gzip {
            assert!(
                opened.checkpoints().is_empty(),
                "{layer}: windows copied into memory"
            );
        }
        assert_eq!(opened.span_count(), in_memory.span_count(), "{layer}");
        let blob = read(&format!("soci/{layer}"));
        for span in in_memory.spans() {
            let compressed = &blob[span.compressed.start as usize..span.compressed.end as usize];
            assert!(
                opened.decode_span(span.id, compressed).expect("decode")
                    == in_memory.decode_span(span.id, compressed).expect("decode"),
                "{layer}: span {} decodes differently",
                span.id
            );
        }
        let (files, _) = check_every_file(&opened, &blob, &decompress(&blob));
        assert!(files > 10, "{layer}: only {files} files");
    }
}

#[test]
fn a_ztoc_file_cut_short_does_not_open() {
    let (layer, span) = GOLDENS[0];
    let bytes = read(&format!("soci/{layer}.{span}.ztoc"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cut.ztoc");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert!(Ztoc::open(&path).is_err());
    assert!(Ztoc::open(&dir.path().join("missing.ztoc")).is_err());
}

#[test]
fn the_peeked_size_of_socis_ztocs_is_the_parsed_one_and_garbage_has_none() {
    for &(layer, span) in GOLDENS {
        let bytes = read(&format!("soci/{layer}.{span}.ztoc"));
        let parsed = Ztoc::from_bytes(&bytes).expect("parse");
        assert_eq!(
            Ztoc::peek_uncompressed_size(&bytes).expect("peek"),
            parsed.uncompressed_archive_size(),
            "{layer}"
        );
        assert!(parsed.uncompressed_archive_size() > 0, "{layer}");
    }
    assert!(Ztoc::peek_uncompressed_size(b"").is_err());
    assert!(Ztoc::peek_uncompressed_size(&[0xff; 64]).is_err());
}
