//! Prometheus text exposition and a tiny `/metrics` HTTP endpoint on a std `TcpListener`.
//!
//! Labels are bounded: module names, pids of targets, mapping kinds, histogram bounds. The
//! server answers `GET /metrics` and `GET /healthz`, one request per connection; it is not a
//! general HTTP server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};

/// A metric family: name, help and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// Metric name.
    pub name: &'static str,
    /// `# HELP` text.
    pub help: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
}

impl Family {
    /// A gauge: a value that goes up and down. `help` is trimmed (doc comments via `families!`).
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help: help.trim_ascii(),
            kind: "gauge",
        }
    }

    /// A counter: a total that only grows. `help` is trimmed (doc comments via `families!`).
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help: help.trim_ascii(),
            kind: "counter",
        }
    }
}

/// Declares metric families as constants, two lines each: the doc comment is the family's
/// `# HELP` text (and the constant's documentation), then `NAME: gauge|counter = "metric_name";`.
///
/// ```text
/// families! {
///     /// Resident set size of a target process.
///     RSS: gauge = "hermes_mem_rss_bytes";
/// }
/// ```
macro_rules! families {
    ($($(#[doc = $help:literal])+ $name:ident: $kind:ident = $metric:literal;)*) => {
        $(
            $(#[doc = $help])+
            const $name: $crate::metrics::Family =
                $crate::metrics::Family::$kind($metric, concat!($($help),+));
        )*
    };
}
pub(crate) use families;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its family.
    pub family: Family,
    /// Label pairs.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// Collected samples of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Adds a sample.
    pub fn push(&mut self, family: Family, labels: Vec<(&'static str, String)>, value: f64) {
        self.0.push(Sample {
            family,
            labels,
            value,
        });
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders samples in the Prometheus text format, one HELP/TYPE block per family.
pub fn render(samples: &[Sample]) -> String {
    let mut by_family: BTreeMap<&str, (Family, Vec<&Sample>)> = BTreeMap::new();
    for s in samples {
        by_family
            .entry(s.family.name)
            .or_insert((s.family, Vec::new()))
            .1
            .push(s);
    }
    let mut out = String::new();
    for (name, (fam, ss)) in by_family {
        let _ = writeln!(out, "# HELP {name} {}", fam.help);
        let _ = writeln!(out, "# TYPE {name} {}", fam.kind);
        for s in ss {
            out.push_str(name);
            if !s.labels.is_empty() {
                let l: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", l.join(","));
            }
            let _ = writeln!(out, " {}", s.value);
        }
    }
    out
}

/// Binds `addr` and serves `GET /metrics` with the text `body()` returns, on a background
/// thread. Returns the bound address (useful with port 0).
pub fn serve(addr: &str, body: Arc<dyn Fn() -> String + Send + Sync>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::MetricsBind {
        addr: addr.to_owned(),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| Error::MetricsBind {
        addr: addr.to_owned(),
        source,
    })?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = handle(conn, body.as_ref());
            }
        })
        .map_err(|source| Error::Thread {
            name: "metrics".to_owned(),
            source,
        })?;
    Ok(local)
}

fn handle(mut conn: TcpStream, body: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, text) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", body()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Family = Family::gauge("hermes_test_bytes", "Test.");

    families! {
        /// A help text written over
        /// two doc lines.
        TWO_LINES: counter = "hermes_two_lines_total";
    }

    #[test]
    fn families_take_their_help_from_the_doc_comment() {
        assert_eq!(
            TWO_LINES,
            Family {
                name: "hermes_two_lines_total",
                help: "A help text written over two doc lines.",
                kind: "counter",
            }
        );
    }

    #[test]
    fn renders_one_header_per_family_and_escapes() {
        let s = vec![
            Sample {
                family: F,
                labels: vec![("pid", "1".into())],
                value: 2.0,
            },
            Sample {
                family: F,
                labels: vec![("pid", "a\"b".into())],
                value: 0.5,
            },
        ];
        assert_eq!(
            render(&s),
            "# HELP hermes_test_bytes Test.\n# TYPE hermes_test_bytes gauge\n\
             hermes_test_bytes{pid=\"1\"} 2\nhermes_test_bytes{pid=\"a\\\"b\"} 0.5\n"
        );
    }

    #[test]
    fn serves_metrics_over_tcp() {
        let addr = serve("127.0.0.1:0", Arc::new(|| "x 1\n".to_owned())).unwrap();
        let get = |path: &str| {
            let mut c = TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        };
        let r = get("/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nx 1\n"), "{r}");
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
    }
}
