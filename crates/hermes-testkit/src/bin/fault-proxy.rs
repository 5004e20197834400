//! The testkit's fault proxy as a process, for scripts (`bench/chaos.py`): forwards to a registry
//! and, when told, injects seeded random faults into the requests that match.
//!
//! It prints `{"listening": "127.0.0.1:PORT"}` on stdout, then reads commands on stdin, one a
//! line, and answers each with one JSON line:
//!
//! - `on SEED`: random faults from now on, drawn from SEED (so each phase of a run can be replayed
//!   from its own seed);
//! - `off`: no more faults;
//! - `stats`: what happened since the last `stats`: requests, blob reads (`GET …/blobs/…`),
//!   faults by kind (all, and those on range reads), statuses answered; and the blob body bytes
//!   sent since the start (`blob_bytes_total`).
//!
//! It exits when stdin closes, so it never outlives the script that started it.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hermes_testkit::{FaultProxy, RandomFaults};

#[derive(Debug, Parser)]
#[command(about = "A fault-injecting HTTP/1.1 proxy in front of a registry, driven on stdin")]
struct Args {
    /// The registry to forward to, e.g. 127.0.0.1:5000.
    #[arg(long)]
    upstream: SocketAddr,
    /// Probability, 0 to 1, that a matching request gets a fault while faults are on.
    #[arg(long, default_value_t = 0.1)]
    rate: f64,
    /// Only requests whose path contains this get faults.
    #[arg(long, default_value = "/v2/")]
    path_contains: String,
    /// Longest injected stall, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    max_stall_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.rate) {
        eprintln!("fault-proxy: --rate must be between 0 and 1");
        return ExitCode::from(2);
    }
    let proxy = match FaultProxy::start(args.upstream) {
        Ok(proxy) => proxy,
        Err(error) => {
            eprintln!("fault-proxy: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut say = |value: serde_json::Value| writeln!(out, "{value}").and_then(|()| out.flush());
    if say(serde_json::json!({ "listening": proxy.host() })).is_err() {
        return ExitCode::FAILURE;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["on", seed] => match seed.parse::<u64>() {
                Ok(seed) => {
                    proxy.set_random_faults(Some(
                        RandomFaults::new(seed, args.rate)
                            .path_contains(args.path_contains.clone())
                            .max_stall(Duration::from_millis(args.max_stall_ms)),
                    ));
                    serde_json::json!({ "faults": "on", "seed": seed })
                }
                Err(_) => serde_json::json!({ "error": format!("not a seed: {seed}") }),
            },
            ["off"] => {
                proxy.set_random_faults(None);
                serde_json::json!({ "faults": "off" })
            }
            ["stats"] => stats(&proxy),
            _ => {
                serde_json::json!({ "error": format!("unknown command {line:?}: on SEED | off | stats") })
            }
        };
        if say(answer).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}

/// Requests, faults by kind and answered statuses since the last call.
fn stats(proxy: &FaultProxy) -> serde_json::Value {
    let log = proxy.take_log();
    let mut faults = BTreeMap::<&str, u64>::new();
    let mut on_ranges = BTreeMap::<&str, u64>::new();
    let mut statuses = BTreeMap::<String, u64>::new();
    for request in &log {
        if let Some(fault) = &request.fault {
            *faults.entry(fault.kind()).or_default() += 1;
            if request.range.is_some() {
                *on_ranges.entry(fault.kind()).or_default() += 1;
            }
        }
        *statuses.entry(request.status.to_string()).or_default() += 1;
    }
    let blob_requests = log
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count();
    serde_json::json!({
        "requests": log.len(),
        "blob_requests": blob_requests,
        "blob_bytes_total": proxy.blob_bytes_sent(),
        "range_requests": log.iter().filter(|r| r.range.is_some()).count(),
        "faults": faults,
        "faults_on_ranges": on_ranges,
        "statuses": statuses,
    })
}
