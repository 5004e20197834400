//! Fuzz harnesses: one function per kind of untrusted input the node and the controller parse,
//! each calling the same library code they do.
//!
//! The AFL++ binary in `fuzz/` (its own workspace, so the main build never compiles it with
//! instrumentation) runs these in a persistent loop; this crate's test replays every committed
//! corpus file through them, so a regression shows up in a plain `cargo test`. A harness returns
//! normally on any input the library rejects with an error; a panic, an abort (a failed
//! allocation) or a hang is a finding. Beyond "does not crash", the harnesses check properties
//! that hold for every input: what the zTOC parser accepts re-serializes to a zTOC that parses to
//! the same value, every file read through a zTOC built from a layer equals the layer's bytes, and
//! an admission patch applied to its pod makes the next review a no-op.
//!
//! Inputs are bounded by the fuzzer (a few KB to a few hundred KB); per input, the harnesses touch
//! at most [`MAX_ITEMS`] entries and spans so one execution stays in the millisecond range.

#![warn(missing_docs)]

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hermes_controller::modules::MemoryModules;
use hermes_controller::selector::{LabelRequirement, LabelSelector, Operator};
use hermes_kube::webhook::selector::ModulesPolicy;
use hermes_kube::webhook::server::mutate_with_policies;
use hermes_kube::webhook::{InjectConfig, SidecarMode, pod_patch};
use hermes_modules::catalog::ModuleCatalog;
use hermes_modules::directive::{Origin, parse_directives, parse_modules_env};
use hermes_oci::manifest::{Index, LayerEncoding, Manifest, Platform, to_go_json};
use hermes_oci::soci::annotation;
use hermes_oci::{Challenge, Digest, Reference};
use hermes_snapshotter::NodeConfig;
use hermes_snapshotter::config::parse_size;
use hermes_ztoc::{BuildOptions, Compression, EntryKind, Ztoc};
use serde_json::Value;

/// How many entries, spans and ranges one execution exercises at most.
pub const MAX_ITEMS: usize = 64;

/// A harness: takes any bytes, panics only on a bug.
pub type Harness = fn(&[u8]);

/// Every target by name, as the fuzz binary and the corpus directories (`fuzz/corpus/NAME/`) call
/// them.
pub const TARGETS: &[(&str, Harness)] = &[
    ("ztoc", ztoc),
    ("tar", tar),
    ("oci", oci),
    ("node_config", node_config),
    ("directive", directive),
    ("admission", admission),
];

/// The harness called `name`.
pub fn target(name: &str) -> Option<Harness> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, h)| h)
}

/// A zTOC as the node gets it from the controller or a registry, plus a layer blob to read
/// through it. Input: a little-endian `u32` zTOC length, the zTOC, then the blob (a length beyond
/// the input takes everything as the zTOC).
///
/// Parses with [`Ztoc::from_bytes`]; checks that the parsed value re-serializes to bytes that
/// parse to the same zTOC; builds the path index; plans reads of every regular file and of ranges
/// of the layer; reads planned ranges from the blob; decodes spans. As a fuzzer cannot forge
/// SHA-256, the decode steps run a second time on a copy whose span digests are rewritten to
/// match the blob, so span decoding sees hostile checkpoints, sizes and data too.
pub fn ztoc(data: &[u8]) {
    let (toc, blob) = match data.split_first_chunk::<4>() {
        Some((len, rest)) => {
            let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
            rest.split_at(len)
        }
        None => (data, &[][..]),
    };
    let Ok(z) = Ztoc::from_bytes(toc) else {
        return;
    };
    let again = Ztoc::from_bytes(&z.to_bytes()).expect("a parsed zTOC re-serializes to a zTOC");
    assert_same_ztoc(&z, &again);
    read_through(&z, blob);
    if let Some(fixed) = with_true_digests(&z, blob) {
        read_through(&fixed, blob);
    }
}

/// A layer stream as the controller's indexer (and `hermes ztoc build`) reads it. Input: a mode
/// byte, a sizes byte, then the tar bytes. The mode picks how the tar is encoded before
/// [`hermes_ztoc::build`] sees it: as is with the encoding detected (so hostile gzip and zstd
/// streams are covered), plain tar, gzip with a block boundary every chunk, gzip with a member per
/// chunk, zstd with a frame per chunk, or zstd in one frame. The sizes byte picks the chunk size
/// and the span size (512 B to 64 KiB, so small inputs still have many spans).
///
/// When the tar bytes are known (every mode but a detected compressed stream), every regular
/// file and every span read back through the built zTOC must equal those bytes.
pub fn tar(data: &[u8]) {
    let [mode, sizes, body @ ..] = data else {
        return;
    };
    let chunk = 512usize << (sizes & 7);
    let span_size = 512u64 << ((sizes >> 3) & 7);
    let (blob, compression) = match mode % 6 {
        0 => (body.to_vec(), None),
        1 => (body.to_vec(), Some(Compression::Uncompressed)),
        2 => (gzip_blocks(body, chunk), Some(Compression::Gzip)),
        3 => (gzip_members(body, chunk), Some(Compression::Gzip)),
        4 => (zstd_frames(body, chunk), Some(Compression::Zstd)),
        _ => (zstd_frames(body, usize::MAX), Some(Compression::Zstd)),
    };
    let options = BuildOptions {
        span_size,
        compression,
        ..BuildOptions::default()
    };
    let Ok(z) = hermes_ztoc::build(blob.as_slice(), &options) else {
        return;
    };
    let again = Ztoc::from_bytes(&z.to_bytes()).expect("a built zTOC serializes to a zTOC");
    assert_same_ztoc(&z, &again);
    let known = compression.is_some() || z.compression() == Compression::Uncompressed;
    if !known {
        read_through(&z, &blob);
        return;
    }
    for span in z.spans().take(MAX_ITEMS) {
        let compressed = slice(&blob, &span.compressed).expect("span inside the blob");
        let decoded = z
            .decode_span(span.id, compressed)
            .expect("a span of a layer the zTOC was built from decodes");
        let want = slice(body, &span.uncompressed).unwrap_or_else(|| {
            panic!(
                "span {} covers {:?}, beyond the {}-byte tar",
                span.id,
                span.uncompressed,
                body.len()
            )
        });
        assert!(decoded == want, "span {} decoded to other bytes", span.id);
    }
    let reg = z.entries().iter().enumerate();
    for (i, e) in reg
        .filter(|(_, e)| e.kind == EntryKind::Reg)
        .take(MAX_ITEMS)
    {
        let want = slice(body, &(e.offset..e.offset + e.size)).expect("file inside the tar");
        // The whole file, then its second half (a read that starts inside a span).
        for from in [0, e.size / 2] {
            let mut got = Vec::new();
            if let Some(plan) = z.plan_entry(i, from..e.size).expect("plan a file") {
                z.read_planned(blob.as_slice(), &plan, &mut got)
                    .expect("read a file of a layer the zTOC was built from");
            }
            assert!(
                got == want[from as usize..],
                "entry {i} {:?} read back other bytes from {from}",
                e.display_name()
            );
        }
    }
}

/// ModuleCatalog JSON: an image manifest, an image index or manifest list, a SOCI index (a manifest),
/// and the strings the node takes from containerd labels and registry headers (references,
/// platforms, digests, `WWW-Authenticate` challenges).
///
/// What parses must serialize (in Go's JSON form, as pushed) to JSON that parses to a value that
/// serializes the same; references must print to a string that parses back to them.
pub fn oci(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        for layer in m.layers.iter().chain(&m.subject) {
            let _ = LayerEncoding::of(&layer.media_type);
            if let Some(d) = layer.annotation(annotation::LAYER_DIGEST) {
                let _ = Digest::parse(d);
            }
        }
        if let Some(d) = m
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::INDEX_DIGEST))
        {
            let _ = Digest::parse(d);
        }
        let json = to_go_json(&m);
        let back: Manifest = serde_json::from_slice(&json).expect("a manifest re-parses");
        assert!(to_go_json(&back) == json, "manifest JSON is not stable");
    }
    if let Ok(index) = serde_json::from_slice::<Index>(data) {
        let host = Platform::host();
        for d in &index.manifests {
            if let Some(p) = &d.platform {
                let _ = (host.matches(p), Platform::parse(&p.to_string()));
            }
        }
        let json = to_go_json(&index);
        let back: Index = serde_json::from_slice(&json).expect("an index re-parses");
        assert!(to_go_json(&back) == json, "index JSON is not stable");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        let printed = r.to_string();
        let back = Reference::parse(&printed)
            .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(back, r, "{text:?} printed as {printed:?}");
        let _ = (r.api_host(), r.manifest_ref());
    }
    let _ = (
        Platform::parse(text),
        Digest::parse(text),
        Challenge::parse(text),
    );
}

/// The node daemon's config file (`hermes node --config`), as TOML and as YAML, and the size
/// syntax of `cache_size`.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for parsed in [NodeConfig::from_toml(text), NodeConfig::from_yaml(text)] {
        match parsed {
            Ok(c) => {
                let _ = (c.mount_timeout(), c.controller.map(|c| c.timeout()));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    let _ = parse_size(text);
}

/// Loader-script output (`module=mem-profiler,config=prod-tunings` lines) and the
/// `HERMES_MODULES` short form, parsed and then planned against the built-in module table, as
/// `hermes modules resolve` does.
pub fn directive(data: &[u8]) {
    static CATALOG: OnceLock<ModuleCatalog> = OnceLock::new();
    let catalog = CATALOG.get_or_init(ModuleCatalog::builtin);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let script = Origin::Script(PathBuf::from("/etc/hermes/load-sidecars.sh"));
    for (origin, parsed) in [
        (&script, parse_directives(&script, text)),
        (&Origin::EnvVar, parse_modules_env(text)),
    ] {
        let planned = parsed.and_then(|ds| catalog.plan(origin, &ds));
        if let Err(e) = planned {
            let _ = e.to_string();
        }
    }
}

/// An `AdmissionReview` body as the webhook's `POST /mutate` gets it, decided against a fixed set
/// of policies (namespaced, label selectors with every operator, a catch-all).
///
/// The answer must always allow the pod and echo the request's `uid`; a patch must be base64 of
/// a JSON array of operations; applied to the pod, it must leave a pod that the next review does
/// not patch again (the webhook is idempotent under reinvocation).
pub fn admission(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let response = mutate_with_policies(&request, policies(), inject_config());
    let _ = serde_json::to_vec(&response).expect("a review response serializes");
    let answer = &response["response"];
    assert_eq!(answer["allowed"], true, "the webhook always allows");
    assert_eq!(answer["uid"], request["request"]["uid"], "uid not echoed");
    let Some(patch) = answer["patch"].as_str() else {
        return;
    };
    let bytes = STANDARD.decode(patch).expect("the patch is base64");
    let ops: Vec<Value> = serde_json::from_slice(&bytes).expect("the patch is a JSON array");
    assert!(!ops.is_empty(), "an empty patch is sent as no patch");
    let mut pod = request["request"]["object"].clone();
    // Real pods always have both; a patch needs them to apply.
    if !(pod["metadata"].is_object() && pod["spec"].is_object()) {
        return;
    }
    for op in &ops {
        apply(&mut pod, op).unwrap_or_else(|e| panic!("patch op {op} does not apply: {e}"));
    }
    assert!(
        pod_patch(&pod, inject_config()).is_empty(),
        "a patched pod gets patched again"
    );
}

fn policies() -> &'static [ModulesPolicy] {
    static POLICIES: OnceLock<Vec<ModulesPolicy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let policy =
            |name: &str, namespaces: &[&str], selector: Option<LabelSelector>| ModulesPolicy {
                name: name.to_owned(),
                modules: MemoryModules {
                    namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                    pod_selector: selector,
                    loader_config_map: format!("{name}-loader"),
                },
            };
        let requirement = |key: &str, operator: Operator, values: &[&str]| LabelRequirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|s| s.to_string()).collect(),
        };
        vec![
            policy(
                "ml",
                &["ml", "training"],
                Some(LabelSelector {
                    match_labels: [("app".to_owned(), "trainer".to_owned())].into(),
                    match_expressions: vec![
                        requirement("tier", Operator::In, &["gpu", "cpu"]),
                        requirement("canary", Operator::NotIn, &["true"]),
                        requirement("team", Operator::Exists, &[]),
                        requirement("legacy", Operator::DoesNotExist, &[]),
                    ],
                }),
            ),
            policy(
                "profiled",
                &[],
                Some(LabelSelector {
                    match_labels: [("hermes.dev/profile".to_owned(), "on".to_owned())].into(),
                    match_expressions: vec![requirement("x", Operator::DoesNotExist, &[])],
                }),
            ),
            policy("batch", &["batch"], None),
        ]
    })
}

fn inject_config() -> &'static InjectConfig {
    static CONFIG: OnceLock<InjectConfig> = OnceLock::new();
    CONFIG.get_or_init(|| InjectConfig {
        image: "registry.example/hermes:fuzz".to_owned(),
        loader_config_map: String::new(),
        metrics_port: 9464,
        sidecar: SidecarMode::Native,
    })
}

/// Applies one RFC 6902 `add` or `replace` (the only operations the webhook sends).
fn apply(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"].as_str().ok_or("no path")?;
    let value = op.get("value").ok_or("no value")?.clone();
    let tokens: Vec<String> = path
        .strip_prefix('/')
        .ok_or("path not absolute")?
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let (last, parents) = tokens.split_last().ok_or("empty path")?;
    let mut at = doc;
    for t in parents {
        at = match at {
            Value::Object(m) => m.get_mut(t).ok_or(format!("no member {t}"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("bad index {t}"))?;
                a.get_mut(i).ok_or(format!("no element {i}"))?
            }
            _ => return Err(format!("{t} inside a scalar")),
        };
    }
    match (op["op"].as_str(), at) {
        (Some("add"), Value::Array(a)) if last == "-" => a.push(value),
        (Some("add"), Value::Object(m)) => {
            m.insert(last.clone(), value);
        }
        (Some("replace"), Value::Object(m)) if m.contains_key(last) => {
            m.insert(last.clone(), value);
        }
        (kind, _) => return Err(format!("cannot {kind:?} at {path}")),
    }
    Ok(())
}

/// Set (to anything) to skip decoding spans longer than [`KNOWN_SPAN_CAP`]: span decoding
/// allocates the span's claimed length up front (`vec![0u8; len]`), a known bug being fixed
/// separately that otherwise ends most long `ztoc` runs in the same crash.
pub const SKIP_KNOWN_ENV: &str = "HERMES_FUZZ_SKIP_KNOWN";

/// See [`SKIP_KNOWN_ENV`].
pub const KNOWN_SPAN_CAP: u64 = 64 << 20;

/// Plans and reads everything a node would through `z`, with `blob` as the layer. Errors are
/// expected (hostile input); only panics and aborts count.
fn read_through(z: &Ztoc, blob: &[u8]) {
    static SKIP_KNOWN: OnceLock<bool> = OnceLock::new();
    let skip_known = *SKIP_KNOWN.get_or_init(|| std::env::var_os(SKIP_KNOWN_ENV).is_some());
    let _ = z.path_index();
    let plans_only = skip_known
        && z.spans()
            .any(|s| s.uncompressed.end - s.uncompressed.start > KNOWN_SPAN_CAP);
    let entries = z.entries().iter().enumerate().take(MAX_ITEMS);
    for (i, e) in entries {
        let _ = (e.path(), e.xattrs().count(), e.display_name());
        if e.kind != EntryKind::Reg {
            continue;
        }
        if plans_only {
            let _ = z.plan_entry(i, 0..e.size);
            continue;
        }
        if let Ok(Some(plan)) = z.plan_entry(i, 0..e.size) {
            let _ = z.read_planned(blob, &plan, &mut io::sink());
        }
        if let Ok(Some(path)) = e.path() {
            let path = String::from_utf8_lossy(&path).into_owned();
            let _ = z.extract(blob, &path, &mut io::sink());
        }
    }
    let size = z.uncompressed_archive_size();
    for range in [
        0..size,
        size / 3..size / 2,
        size.saturating_sub(1)..size + 1,
    ] {
        if let Ok(Some(plan)) = z.plan(range)
            && !plans_only
        {
            let _ = z.read_planned(blob, &plan, &mut io::sink());
        }
    }
    if plans_only {
        return;
    }
    for span in z.spans().take(MAX_ITEMS) {
        if let Some(compressed) = slice(blob, &span.compressed) {
            let _ = z.decode_span(span.id, compressed);
        }
    }
}

/// A copy of `z` whose span digests are those of `blob`'s bytes (spans whose digest is shared
/// with another span, or whose bytes lie outside the blob, are left alone); `None` when nothing
/// changes. Works on the serialized form: digests are fixed-length strings stored verbatim.
fn with_true_digests(z: &Ztoc, blob: &[u8]) -> Option<Ztoc> {
    let digests = z.span_digests();
    let mut bytes = z.to_bytes();
    let mut changed = false;
    for span in z.spans().take(MAX_ITEMS) {
        let have = &digests[span.id as usize];
        let Some(compressed) = slice(blob, &span.compressed) else {
            continue;
        };
        let want = Digest::of(compressed).to_string();
        if *have == want || digests.iter().filter(|d| *d == have).count() != 1 {
            continue;
        }
        let Some(at) = bytes.windows(have.len()).position(|w| w == have.as_bytes()) else {
            continue;
        };
        bytes[at..at + want.len()].copy_from_slice(want.as_bytes());
        changed = true;
    }
    if !changed {
        return None;
    }
    Ztoc::from_bytes(&bytes).ok()
}

fn assert_same_ztoc(a: &Ztoc, b: &Ztoc) {
    assert_eq!(a.version(), b.version());
    assert_eq!(a.build_tool_identifier(), b.build_tool_identifier());
    assert_eq!(a.compressed_archive_size(), b.compressed_archive_size());
    assert_eq!(a.uncompressed_archive_size(), b.uncompressed_archive_size());
    assert_eq!(a.compression(), b.compression());
    assert_eq!(a.span_digests(), b.span_digests());
    assert_eq!(a.checkpoints(), b.checkpoints());
    assert!(
        a.entries() == b.entries(),
        "entries differ after a round trip"
    );
}

fn slice<'a>(bytes: &'a [u8], range: &std::ops::Range<u64>) -> Option<&'a [u8]> {
    bytes.get(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)
}

fn gzip_blocks(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for piece in data.chunks(chunk) {
        enc.write_all(piece).expect("write to memory");
        // A sync flush ends the deflate block: the builder can checkpoint here.
        enc.flush().expect("write to memory");
    }
    enc.finish().expect("write to memory")
}

fn gzip_members(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        out.extend(gzip_blocks(piece, usize::MAX));
    }
    out
}

fn zstd_frames(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in data.chunks(chunk.min(data.len().max(1))) {
        out.extend(zstd::bulk::compress(piece, 1).expect("compress to memory"));
    }
    out
}
