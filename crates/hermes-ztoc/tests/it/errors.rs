//! Bad layers get clear errors: hostile paths, unsupported entries, corrupt or truncated streams,
//! single-frame zstd.

use std::io::Write;

use hermes_ztoc::Error;

use crate::roundtrip::{Encoding, Item, encode, make_tar};
use crate::support::options;

/// A tar with one file whose raw header name is `name` (bypassing the tar crate's checks).
fn tar_with_raw_name(name: &[u8], typeflag: u8, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_size(if typeflag == b'0' { 5 } else { 0 });
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &h,
        if typeflag == b'0' {
            &b"hello"[..]
        } else {
            &b""[..]
        },
    )
    .expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn names_escaping_the_root_are_refused_by_name() {
    for name in [&b"../etc/passwd"[..], b"a/../../b"] {
        let tar = tar_with_raw_name(name, b'0', b"");
        let err = hermes_ztoc::build(tar.as_slice(), &options(65536)).expect_err("must refuse");
        let shown = String::from_utf8_lossy(name).into_owned();
        assert!(
            matches!(&err, Error::UnsafePath { name, .. } if *name == shown),
            "{err}"
        );
        assert!(
            err.to_string().contains(&shown),
            "message names the entry: {err}"
        );
    }
    // A hardlink whose target escapes is refused too; a symlink may point anywhere.
    let tar = tar_with_raw_name(b"link", b'1', b"../../etc/passwd");
    assert!(matches!(
        hermes_ztoc::build(tar.as_slice(), &options(65536)),
        Err(Error::UnsafePath { .. })
    ));
    let tar = tar_with_raw_name(b"link", b'2', b"/etc/passwd");
    hermes_ztoc::build(tar.as_slice(), &options(65536)).expect("absolute symlink targets are fine");
    // `./` and inner `..` that stay inside are fine, and absolute names are relative to the
    // root, as containerd unpacks them.
    for name in [&b"./a/../b"[..], b"/etc/shadow", b"/../etc/shadow"] {
        let tar = tar_with_raw_name(name, b'0', b"");
        hermes_ztoc::build(tar.as_slice(), &options(65536)).expect("stays inside the root");
    }
}

#[test]
fn unsupported_entry_types_are_named() {
    let tar = tar_with_raw_name(b"contig", b'7', b"");
    let err = hermes_ztoc::build(tar.as_slice(), &options(65536)).expect_err("type 7");
    assert!(
        err.to_string().contains("contig") && err.to_string().contains("'7'"),
        "{err}"
    );
}

fn sample_tar() -> Vec<u8> {
    let items: Vec<Item> = (0..20)
        .map(|i| Item::File {
            name: format!("f{i}"),
            body: vec![i as u8; 30_000 + i * 1000],
            xattr: None,
        })
        .collect();
    make_tar(&items, false)
}

#[test]
fn single_frame_zstd_is_not_seekable() {
    let layer = encode(&sample_tar(), Encoding::Zstd { frames: 1 });
    let err = hermes_ztoc::build(layer.as_slice(), &options(65536)).expect_err("single frame");
    assert!(matches!(err, Error::ZstdNotSeekable), "{err}");
    assert!(err.to_string().contains("not seekable"), "{err}");
}

#[test]
fn truncated_and_corrupt_gzip_fail() {
    let layer = encode(
        &sample_tar(),
        Encoding::Gzip {
            level: 6,
            members: 1,
        },
    );
    let truncated = &layer[..layer.len() / 2];
    let err = hermes_ztoc::build(truncated, &options(65536)).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");

    let mut corrupt = layer.clone();
    corrupt[layer.len() / 3] ^= 0xff;
    corrupt[layer.len() / 3 + 1] ^= 0x5a;
    hermes_ztoc::build(corrupt.as_slice(), &options(65536)).expect_err("corrupt data or CRC");

    let mut trailing = layer.clone();
    trailing.write_all(&[0u8; 100]).expect("pad");
    let err =
        hermes_ztoc::build(trailing.as_slice(), &options(65536)).expect_err("trailing garbage");
    assert!(matches!(err, Error::Gzip { .. }), "{err}");
}

#[test]
fn truncated_tar_fails_and_empty_layer_fails() {
    let tar = sample_tar();
    let err = hermes_ztoc::build(&tar[..100_000], &options(65536)).expect_err("cut inside a file");
    assert!(matches!(err, Error::TarTruncated { .. }), "{err}");
    assert!(matches!(
        hermes_ztoc::build(&[][..], &options(65536)),
        Err(Error::EmptyLayer)
    ));
    assert!(matches!(
        hermes_ztoc::build(tar.as_slice(), &options(0)),
        Err(Error::InvalidSpanSize(0))
    ));
}

#[test]
fn tar_without_end_marker_is_indexed_to_its_length() {
    let tar = sample_tar();
    // Cut off the two zero blocks (and any record padding after them).
    let end = tar.len() - tar.iter().rev().take_while(|&&b| b == 0).count();
    let cut = &tar[..end.div_ceil(512) * 512];
    let ztoc = hermes_ztoc::build(cut, &options(65536)).expect("no end marker");
    assert_eq!(ztoc.uncompressed_archive_size(), cut.len() as u64);
}

#[test]
fn streamed_builds_fail_as_in_memory_builds_do_and_leave_no_spill_files() {
    let tar = sample_tar();
    let gzip = encode(
        &tar,
        Encoding::Gzip {
            level: 6,
            members: 1,
        },
    );
    let mut corrupt = gzip.clone();
    corrupt[gzip.len() / 3] ^= 0xff;
    corrupt[gzip.len() / 3 + 1] ^= 0x5a;
    let mut trailing = gzip.clone();
    trailing.extend_from_slice(&[0u8; 100]);
    let escaping = tar_with_raw_name(b"../etc/passwd", b'0', b"");
    let cases: [(&str, &[u8], u64); 7] = [
        ("truncated gzip", &gzip[..gzip.len() / 2], 65536),
        ("corrupt gzip", &corrupt, 65536),
        ("trailing garbage", &trailing, 65536),
        ("truncated tar", &tar[..100_000], 65536),
        ("empty layer", &[], 65536),
        ("span size 0", &tar, 0),
        ("escaping name", &escaping, 65536),
    ];
    for (what, layer, span) in cases {
        let in_memory = hermes_ztoc::build(layer, &options(span)).expect_err(what);
        let streamed = crate::support::streamed(layer, &options(span)).expect_err(what);
        assert_eq!(streamed.to_string(), in_memory.to_string(), "{what}");
    }
}

#[test]
fn a_streamed_build_names_a_spill_dir_it_cannot_use_and_a_failed_output() {
    let layer = encode(
        &sample_tar(),
        Encoding::Gzip {
            level: 6,
            members: 1,
        },
    );
    let missing = std::path::Path::new("/nonexistent/hermes-spill");
    let err = hermes_ztoc::build_to(layer.as_slice(), &options(4096), missing, Vec::new())
        .expect_err("no spill dir");
    assert!(
        matches!(&err, Error::Spill { dir, .. } if dir == missing),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("/nonexistent/hermes-spill"),
        "{err}"
    );

    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let spill = tempfile::tempdir().expect("spill dir");
    let err = hermes_ztoc::build_to(layer.as_slice(), &options(4096), spill.path(), Full)
        .expect_err("output fails");
    assert!(matches!(err, Error::Output(_)), "{err:?}");
    assert_eq!(
        std::fs::read_dir(spill.path()).expect("dir").count(),
        0,
        "spill files left behind"
    );
}
