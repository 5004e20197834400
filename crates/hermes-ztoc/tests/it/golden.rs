//! soci's own zTOCs are the reference: ours must be byte-identical, and theirs must read back.

use hermes_ztoc::Ztoc;

use crate::support::{check_every_file, decompress, options, read, streamed};

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
