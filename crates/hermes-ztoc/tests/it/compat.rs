//! Layers that containerd unpacks and that earlier builds refused or described differently:
//! root entries and absolute names, PAX global headers, GNU sparse files (written by GNU tar,
//! an independent writer, and read back through the zTOC).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use hermes_ztoc::{Entry, EntryKind, Error, Ztoc};

use crate::roundtrip::{Encoding, encode};
use crate::support::options;

/// One ustar header block (plus data) with a raw name, so any name can be written.
fn raw_entry(name: &[u8], typeflag: u8, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// A PAX global header ('g') named `name` with these records.
fn global_header(name: &[u8], records: &[u8]) -> Vec<u8> {
    raw_entry(name, b'g', records)
}

fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0; 1024]);
    tar
}

fn build(tar: &[u8]) -> hermes_ztoc::Result<Ztoc> {
    hermes_ztoc::build(tar, &options(65536))
}

fn names(z: &Ztoc) -> Vec<String> {
    z.entries().iter().map(Entry::display_name).collect()
}

#[test]
fn root_entries_and_absolute_names_are_indexed() {
    let mut tar = Vec::new();
    for name in [&b"/"[..], b"./", b"."] {
        tar.extend(raw_entry(name, b'5', b""));
    }
    tar.extend(raw_entry(b"/etc/hosts", b'0', b"127.0.0.1 localhost\n"));
    let tar = finish(tar);
    let z = build(&tar).expect("containerd unpacks these: the layer must be indexed");
    assert_eq!(names(&z), ["/", "./", ".", "/etc/hosts"]);
    // Names are stored as written (soci does the same); paths are relative to the root.
    assert_eq!(z.entries()[0].path().unwrap(), None);
    assert_eq!(
        z.entries()[3].path().unwrap().as_deref(),
        Some(&b"etc/hosts"[..])
    );
    let mut out = Vec::new();
    z.extract(tar.as_slice(), "/etc/hosts", &mut out).unwrap();
    assert_eq!(out, b"127.0.0.1 localhost\n");
}

#[test]
fn a_leading_pax_global_header_is_skipped() {
    // What `git archive` writes first.
    let mut tar = global_header(
        b"pax_global_header",
        b"52 comment=4f6ad3c9e1b2b8a0e9b3f1c0d2e4f6a8b0c2d4e6\n",
    );
    tar.extend(raw_entry(b"a", b'0', b"after the global header\n"));
    let tar = finish(tar);
    for encoding in [
        Encoding::Plain,
        Encoding::Gzip {
            level: 6,
            members: 1,
        },
    ] {
        let layer = encode(&tar, encoding);
        let z = build(&layer).expect("a leading global header must not refuse the layer");
        assert_eq!(names(&z), ["a"], "the global header is no entry");
        let mut out = Vec::new();
        z.extract(layer.as_slice(), "a", &mut out).unwrap();
        assert_eq!(out, b"after the global header\n");
        assert!(z.is_soci_compatible());
    }
}

#[test]
fn pax_global_headers_that_containerd_would_act_on_are_refused() {
    // containerd removes whatever the header's name points at and creates its parents.
    let mut late = raw_entry(b"a", b'0', b"x");
    late.extend(global_header(b"a", b"10 path=a\n"));
    let nested = global_header(b"d/pax_global_header", b"13 comment=x\n");
    let whiteout = global_header(b".wh.a", b"13 comment=x\n");
    for (what, tar) in [
        ("after an entry", late),
        ("nested", nested),
        ("whiteout", whiteout),
    ] {
        let err = build(&finish(tar)).expect_err(what);
        assert!(
            matches!(err, Error::UnsupportedEntry { ref kind, .. } if kind.contains("PAX global header")),
            "{what}: {err}"
        );
    }
    // A global header naming the root is ignored wherever it is.
    let mut tar = raw_entry(b"a", b'0', b"x");
    tar.extend(global_header(b"./", b"13 comment=x\n"));
    assert_eq!(names(&build(&finish(tar)).unwrap()), ["a"]);
}

/// A sparse file: `size` bytes, these fragments of data, zeros elsewhere.
fn sparse_file(path: &Path, size: u64, fragments: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (at, data) in fragments {
        f.seek(SeekFrom::Start(*at)).unwrap();
        f.write_all(data).unwrap();
    }
    drop(f);
    std::fs::read(path).unwrap()
}

/// GNU tar's archive of `dir/name` with `--sparse` and these format flags.
fn gnu_tar(dir: &Path, name: &str, flags: &[&str]) -> Vec<u8> {
    let out = dir.join("out.tar");
    let status = Command::new("tar")
        .args(flags)
        .arg("--sparse")
        .arg("-cf")
        .arg(&out)
        .arg("-C")
        .arg(dir)
        .arg(name)
        .status()
        .expect("GNU tar is needed to write sparse test archives: apt-get install tar");
    assert!(status.success(), "tar {flags:?}");
    std::fs::read(&out).unwrap()
}

fn noise(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

#[test]
fn gnu_sparse_files_in_pax_form_read_back_with_their_holes() {
    let dir = tempfile::tempdir().unwrap();
    let fragments = [
        (0, noise(700, 1)),
        (200_000, noise(9000, 2)),
        (600_000, noise(100, 3)),
    ];
    let want = sparse_file(&dir.path().join("sp"), 1 << 20, &fragments);
    for version in ["0.0", "0.1", "1.0"] {
        let tar = gnu_tar(
            dir.path(),
            "sp",
            &["--format=posix", &format!("--sparse-version={version}")],
        );
        for encoding in [
            Encoding::Plain,
            Encoding::Gzip {
                level: 6,
                members: 1,
            },
        ] {
            let layer = encode(&tar, encoding);
            let z = build(&layer).unwrap_or_else(|e| panic!("{version}: {e}"));
            let e = z
                .entries()
                .iter()
                .find(|e| e.kind == EntryKind::Reg)
                .expect("the file");
            assert_eq!(
                e.display_name(),
                "sp",
                "{version}: the real name, as Go reads it"
            );
            let map = e.sparse().expect("sparse").unwrap();
            assert_eq!(map.size(), 1 << 20, "{version}");
            assert!(
                e.size < 100_000,
                "{version}: the entry covers the packed data only ({} bytes)",
                e.size
            );
            let mut got = Vec::new();
            z.extract(layer.as_slice(), "sp", &mut got).unwrap();
            assert!(
                got == want,
                "{version}: extracted bytes differ from the file"
            );
            assert!(
                !z.is_soci_compatible(),
                "{version}: soci would serve the packed data"
            );
            // The map survives serialization (format 1.0's map is copied out of the data).
            let back = Ztoc::from_bytes(&z.to_bytes()).unwrap();
            assert_eq!(back.entries(), z.entries());
        }
    }
}

#[test]
fn old_gnu_sparse_files_are_refused_like_containerd_does() {
    let dir = tempfile::tempdir().unwrap();
    sparse_file(&dir.path().join("sp"), 1 << 20, &[(4096, noise(100, 1))]);
    let tar = gnu_tar(dir.path(), "sp", &["--format=gnu"]);
    assert_eq!(tar[156], b'S', "GNU tar wrote an old GNU sparse header");
    let err = build(&tar).expect_err("containerd cannot unpack type 'S'");
    assert!(
        matches!(err, Error::UnsupportedEntry { ref kind, .. } if kind.contains("'S'") && kind.contains("containerd")),
        "{err}"
    );
}

/// A PAX format 1.0 sparse file written by hand: `map` then the packed data.
fn pax_sparse(name: &str, size: u64, map: &str, data: &[u8], records: &str) -> Vec<u8> {
    let mut pax = String::new();
    for rec in [
        "GNU.sparse.major=1".to_owned(),
        "GNU.sparse.minor=0".to_owned(),
        format!("GNU.sparse.name={name}"),
        format!("GNU.sparse.realsize={size}"),
    ]
    .into_iter()
    .chain(records.lines().map(str::to_owned))
    {
        // A record's length counts its own digits.
        let body = format!(" {rec}\n");
        let mut n = body.len() + 1;
        while n != body.len() + n.to_string().len() {
            n = body.len() + n.to_string().len();
        }
        pax.push_str(&format!("{n}{body}"));
    }
    let mut out = raw_entry(b"PaxHeaders/sp", b'x', pax.as_bytes());
    let mut body = map.as_bytes().to_vec();
    body.resize(body.len().next_multiple_of(512), 0);
    body.extend_from_slice(data);
    out.extend(raw_entry(b"GNUSparseFile.0/sp", b'0', &body));
    out
}

#[test]
fn sparse_maps_that_go_rejects_refuse_the_layer() {
    let ok = pax_sparse("sp", 100, "1\n10\n5\n", b"hello", "");
    build(&finish(ok)).expect("a valid hand-written map");
    for (what, tar) in [
        (
            "past the end",
            pax_sparse("sp", 100, "1\n98\n5\n", b"hello", ""),
        ),
        (
            "data left over",
            pax_sparse("sp", 100, "1\n10\n4\n", b"hello", ""),
        ),
        (
            "data missing",
            pax_sparse("sp", 100, "1\n10\n6\n", b"hello", ""),
        ),
        (
            "overlap",
            pax_sparse("sp", 100, "2\n10\n3\n11\n2\n", b"hello", ""),
        ),
        (
            "not a number",
            pax_sparse("sp", 100, "1\nten\n5\n", b"hello", ""),
        ),
        (
            "map past the data",
            pax_sparse("sp", 100, "900000\n", b"", ""),
        ),
    ] {
        let err = build(&finish(tar)).expect_err(what);
        assert!(matches!(err, Error::TarHeader { .. }), "{what}: {err}");
    }
    // An unknown sparse version is an ordinary file to Go, records and all.
    let odd = pax_sparse("sp", 100, "1\n10\n5\n", b"hello", "GNU.sparse.major=2");
    let z = build(&finish(odd)).expect("unknown versions are plain files");
    assert!(z.entries()[0].sparse().is_none());
}
