//! `Drop` leaves nothing behind: no process, no temp dir, no listener.

use std::path::Path;

use hermes_testkit::{FaultProxy, Registry};

use crate::support::get;

#[test]
fn dropping_a_registry_leaves_no_process_and_no_temp_dir() {
    let registry = Registry::start_with_htpasswd("u", "p").unwrap();
    let pid = registry.pid().expect("a running registry has a pid");
    let root = registry.root().to_path_buf();
    let proc_dir = format!("/proc/{pid}");
    let cmdline = std::fs::read(format!("{proc_dir}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("docker-registry"),
        "pid {pid} is the registry"
    );
    assert!(root.is_dir());

    drop(registry);
    assert!(
        !Path::new(&proc_dir).exists(),
        "process {pid} is killed and reaped"
    );
    assert!(!root.exists(), "{} is removed", root.display());
}

#[test]
fn dropping_a_proxy_closes_its_port() {
    let registry = Registry::start().unwrap();
    let proxy = FaultProxy::start(registry.addr()).unwrap();
    let addr = proxy.addr();
    assert_eq!(get(addr, "/v2/").status, 200);
    drop(proxy);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens on {addr} after drop"
    );
}
