//! Containerd: a real containerd + runc in a temp dir pulls from the local plain-HTTP registry and
//! runs a container; `Drop` leaves no process, mount or dir behind.

use std::path::Path;

use hermes_testkit::{Containerd, Registry, busybox_image};

#[test]
fn containerd_pulls_from_the_local_registry_and_runs_a_busybox_container() {
    let registry = Registry::start().unwrap();
    let image = busybox_image()
        .unwrap()
        .layer()
        .file("etc/greeting", "hello from the testkit\n")
        .entrypoint(&["/bin/cat", "/etc/greeting"])
        .push(&registry.host(), "greet:v1")
        .unwrap();
    let containerd = containerd_with_pulled(&registry, &image.reference);
    let out = containerd
        .ctr(&["run", "--rm", &image.reference, "greet-1"])
        .unwrap_or_else(|e| panic!("{e:?}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(out, "hello from the testkit\n");
}

#[test]
fn dropping_containerd_leaves_no_process_no_mount_and_no_dir() {
    let registry = Registry::start().unwrap();
    let image = busybox_image()
        .unwrap()
        .entrypoint(&["/bin/sleep", "600"])
        .push(&registry.host(), "sleeper:v1")
        .unwrap();
    let containerd = containerd_with_pulled(&registry, &image.reference);
    containerd
        .ctr(&["run", "-d", &image.reference, "sleeper-1"])
        .unwrap();
    let dir = containerd.dir().to_path_buf();
    let pid = containerd.pid().unwrap();
    let address = containerd.address().display().to_string();
    let tasks = containerd.ctr(&["tasks", "ls"]).unwrap();
    assert!(tasks.contains("RUNNING"), "{tasks}");
    assert!(mounts_under(&dir) > 0, "the container's rootfs is mounted");

    drop(containerd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "containerd is gone"
    );
    assert_eq!(
        mounts_under(&dir),
        0,
        "nothing stays mounted under {}",
        dir.display()
    );
    assert!(!dir.exists(), "{} is removed", dir.display());
    let leftovers = processes_mentioning(&address);
    assert!(leftovers.is_empty(), "shims left running: {leftovers:?}");
}

#[test]
fn the_cri_plugin_comes_up_with_the_local_sandbox_image() {
    let registry = Registry::start().unwrap();
    let sandbox = hermes_testkit::sandbox_image()
        .unwrap()
        .push(&registry.host(), "pause:v1")
        .unwrap();
    let containerd = Containerd::builder()
        .registry_host(&registry.host())
        .cri(&sandbox.reference)
        .start()
        .unwrap();
    let plugins = containerd.ctr(&["plugins", "ls"]).unwrap();
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
        .unwrap_or_else(|| panic!("no cri plugin in:\n{plugins}"));
    assert!(cri.trim_end().ends_with("ok"), "{cri}");
    assert!(
        containerd.log().contains(&sandbox.reference),
        "the CRI config names the sandbox image"
    );
}

fn mounts_under(dir: &Path) -> usize {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|p| p.starts_with(&prefix))
        })
        .count()
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// A containerd (1.6) reading `registry`, with `reference` pulled.
fn containerd_with_pulled(registry: &Registry, reference: &str) -> Containerd {
    let containerd = Containerd::builder()
        .registry_host(&registry.host())
        .start()
        .unwrap();
    let hosts = containerd.hosts_dir().display().to_string();
    containerd
        .ctr(&["images", "pull", "--hosts-dir", &hosts, reference])
        .unwrap();
    containerd
}
