//! `hermes-fuzz-afl TARGET`: runs one hermes-fuzz harness in AFL++'s persistent loop (see
//! scripts/fuzz.sh). Without AFL++ (no shared-memory input), runs the harness once on stdin, so
//! `hermes-fuzz-afl tar < crash-file` reproduces a finding.

use std::process::ExitCode;

fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(harness) = hermes_fuzz::target(&name) else {
        let names: Vec<&str> = hermes_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: hermes-fuzz-afl TARGET  (one of: {})",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    afl::fuzz!(|data: &[u8]| { harness(data) });
    ExitCode::SUCCESS
}
