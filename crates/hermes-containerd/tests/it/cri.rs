//! A kubelet's container start through containerd's CRI (normal overlayfs path, no Hermes).

use std::time::{Duration, Instant};

use hermes_containerd::{ContainerState, Cri, log_lines};
use hermes_testkit::{Registry, busybox_image, sandbox_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_style_start_runs_a_container_and_logs_its_output() {
    let registry = Registry::start().unwrap();
    let sandbox = sandbox_image()
        .unwrap()
        .push(&registry.host(), "pause:v1")
        .unwrap();
    let image = busybox_image()
        .unwrap()
        .layer()
        .file("etc/message", "started through CRI\n")
        .push(&registry.host(), "app:v1")
        .unwrap();
    let containerd = hermes_testkit::Containerd::builder()
        .registry_host(&registry.host())
        .cri(&sandbox.reference)
        .start()
        .unwrap();
    let logs = tempfile::tempdir().unwrap();

    let cri = Cri::connect(containerd.address()).await.unwrap();
    let (name, _) = cri.version().await.unwrap();
    assert_eq!(name, "containerd");
    let fail = |what: &str, e: hermes_containerd::Error| -> ! {
        panic!("{what}: {e:?}\ncontainerd log:\n{}", containerd.log())
    };
    let image_id = cri
        .pull_image(&image.reference)
        .await
        .unwrap_or_else(|e| fail("PullImage", e));
    assert_eq!(
        image_id, image.config_digest,
        "CRI's image ID is the config digest"
    );
    let pod = cri
        .run_host_network_pod("pod-a", "default", logs.path())
        .await
        .unwrap_or_else(|e| fail("RunPodSandbox", e));
    let id = cri
        .start_container(&pod, "app", &image.reference, &["/bin/cat", "/etc/message"])
        .await
        .unwrap_or_else(|e| fail("CreateContainer/StartContainer", e));

    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        let state = cri.container_state(&id).await.unwrap();
        if matches!(state, ContainerState::Exited(_)) || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state, ContainerState::Exited(0));
    let log = std::fs::read_to_string(Cri::log_path(&pod, "app")).unwrap();
    assert_eq!(log_lines(&log), vec!["started through CRI"], "log:\n{log}");
    cri.remove_pod(&pod).await.unwrap();
}
