//! Peak memory of a zTOC build, in memory ([`hermes_ztoc::build`] then `to_bytes`, what
//! `hermes ztoc build` did before it streamed) or streamed ([`hermes_ztoc::build_to`]), on
//! the same layer; both write the zTOC to OUT and print the peak RSS (`VmHWM`).
//!
//!   cargo run --release -p hermes-ztoc --example build_peak -- memory|streamed LAYER OUT

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, layer, out] = args.as_slice() else {
        panic!("usage: build_peak memory|streamed LAYER OUT");
    };
    let layer = BufReader::new(File::open(layer).expect("layer"));
    let options = hermes_ztoc::BuildOptions::default();
    let mut sink = BufWriter::new(File::create(out).expect("output"));
    match mode.as_str() {
        "memory" => {
            let ztoc = hermes_ztoc::build(layer, &options).expect("build");
            sink.write_all(&ztoc.to_bytes()).expect("write");
        }
        "streamed" => {
            let dir = Path::new(out).parent().unwrap_or(Path::new("."));
            hermes_ztoc::build_to(layer, &options, dir, &mut sink).expect("build");
        }
        other => panic!("unknown mode {other}"),
    }
    sink.flush().expect("flush");
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap_or("?")
        .trim();
    println!("{mode}: peak RSS {peak}");
}
