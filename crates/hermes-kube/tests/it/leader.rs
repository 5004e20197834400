//! Two controller replicas sharing a store repository: one leader builds and publishes, the
//! other copies; killing the leader hands over after the lease expires, and the new leader
//! rebuilds nothing; a graceful stop releases the lease at once.

use std::path::Path;
use std::time::{Duration, Instant};

use hermes_controller::mirror::Mirror;
use hermes_kube::controller;
use hermes_kube::crd::ImagePhase;
use hermes_testkit::{Registry, TestImage};

use crate::cluster::{CONTROLLER_USER, Cluster, engine_setup, eventually, replica_options};

const WAIT: Duration = Duration::from_secs(60);

/// A replica on a runtime of its own, so it can be killed: dropping the runtime ends every task
/// at once — no builds finish, the lease is not released — as a SIGKILL would.
struct KillableReplica {
    /// The node API this replica serves (not listening: read directly).
    api: Option<hermes_controller::api::NodeApi>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<hermes_kube::Result<()>>>,
}

impl KillableReplica {
    /// A replica publishing to and copying from the store repository `mirror`.
    fn start(kubeconfig: &Path, identity: &str, store: &Path, mirror: &Mirror) -> KillableReplica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (kubeconfig, identity) = (kubeconfig.to_path_buf(), identity.to_owned());
        let mut setup = engine_setup(store);
        setup.mirror = Some(mirror.clone());
        let api = setup.api.clone();
        runtime.spawn(async move {
            let client = crate::apiserver::client_from(&kubeconfig, Some(CONTROLLER_USER)).await;
            let result = controller::run(client, &setup, replica_options(identity), async move {
                let _ = stop_rx.await;
            })
            .await;
            let _ = done_tx.send(result);
        });
        KillableReplica {
            api: Some(api),
            runtime: Some(runtime),
            stop: Some(stop_tx),
            done: Some(done_rx),
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    fn stop(&mut self) -> hermes_kube::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = self
            .done
            .take()
            .expect("running")
            .recv_timeout(Duration::from_secs(20))
            .expect("replica stops within 20 s");
        self.kill();
        result
    }
}

impl Drop for KillableReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The sum of a counter's samples in a replica's metrics.
fn counter(replica: &KillableReplica, name: &str) -> u64 {
    let text = replica.api.as_ref().expect("replica").metrics_text();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn has_ztoc(store: &Path, layer: &str) -> bool {
    let digest = hermes_oci::Digest::parse(layer).expect("digest");
    hermes_oci::Store::open(store)
        .expect("store")
        .any_ztoc_for_layer(&digest)
        .expect("read store")
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_other_takes_over_when_it_is_killed() {
    let registry = Registry::start().expect("registry");
    let host = registry.host();
    let first = TestImage::new()
        .file("a", vec![3u8; 256 << 10])
        .push(&host, "team/first:v1")
        .expect("push first");
    let second = TestImage::new()
        .file("b", vec![4u8; 256 << 10])
        .push(&host, "team/second:v1")
        .expect("push second");

    let cluster = Cluster::start().await;
    cluster.namespace("apps", &[]).await;
    cluster
        .apply_policy(
            "apiVersion: hermes.dev/v1alpha1\nkind: HermesPolicy\nmetadata: {name: all}\nspec:\n  \
             images: [\"**\"]\n  index: {minLayerSize: 0, spanSize: 64Ki}\n",
        )
        .await
        .expect("policy");
    let image_id = |repo: &str, digest: &str| format!("{host}/{repo}@{digest}");
    cluster
        .running_pod(
            "apps",
            "first",
            &format!("{host}/team/first:v1"),
            &image_id("team/first", &first.manifest_digest),
            None,
        )
        .await;

    let stores = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let names = ["replica-a", "replica-b"];
    let mirror = Mirror::new(
        hermes_oci::Client::new(hermes_oci::ClientOptions {
            plain_http: true,
            ..hermes_oci::ClientOptions::default()
        })
        .expect("client"),
        hermes_oci::Reference::parse(&format!("{host}/hermes/store")).expect("repository"),
    );
    let kubeconfig = cluster.server.kubeconfig();
    let mut replicas = [
        KillableReplica::start(&kubeconfig, names[0], stores[0].path(), &mirror),
        KillableReplica::start(&kubeconfig, names[1], stores[1].path(), &mirror),
    ];

    eventually(WAIT, "first image Ready", || async {
        cluster.image(&first.manifest_digest).await.filter(|i| {
            i.status
                .as_ref()
                .is_some_and(|s| s.phase == ImagePhase::Ready)
        })
    })
    .await;
    let holder = cluster
        .lease_holder()
        .await
        .expect("a leader holds the lease");
    let leader = names
        .iter()
        .position(|n| *n == holder)
        .expect("holder is a replica");
    let follower = 1 - leader;
    let layer = &first.layers[0].digest;
    assert!(
        has_ztoc(stores[leader].path(), layer),
        "the leader built the image"
    );
    // The follower copies what the leader published, and builds nothing itself.
    eventually(WAIT, "the follower's copy of the first zTOC", || async {
        has_ztoc(stores[follower].path(), layer).then_some(())
    })
    .await;
    // Built once between the two (summed: under load a lease may change hands before the
    // image is Ready, and the new holder then finds it built).
    let builds = |replicas: &[KillableReplica]| {
        replicas
            .iter()
            .map(|r| counter(r, "hermes_controller_builds_total"))
            .sum::<u64>()
    };
    let bytes_read = |replicas: &[KillableReplica]| {
        replicas
            .iter()
            .map(|r| counter(r, "hermes_controller_bytes_read_total"))
            .sum::<u64>()
    };
    assert_eq!(builds(&replicas), 1, "the first image is built once");

    let killed_at = Instant::now();
    replicas[leader].kill();
    eventually(WAIT, "the follower takes the lease", || async {
        (cluster.lease_holder().await.as_deref() == Some(names[follower])).then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover after the leader was killed: {takeover:?} (lease duration 4 s)");
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );

    // The new leader reconciles: a pod started after the failover gets its image indexed.
    cluster
        .running_pod(
            "apps",
            "second",
            &format!("{host}/team/second:v1"),
            &image_id("team/second", &second.manifest_digest),
            None,
        )
        .await;
    eventually(WAIT, "second image Ready under the new leader", || async {
        cluster.image(&second.manifest_digest).await.filter(|i| {
            i.status
                .as_ref()
                .is_some_and(|s| s.phase == ImagePhase::Ready)
        })
    })
    .await;
    assert!(has_ztoc(stores[follower].path(), &second.layers[0].digest));
    // The new leader built the second image only: the first was Ready from the copy.
    assert_eq!(
        builds(&replicas),
        2,
        "the new leader rebuilt nothing the old one had published"
    );
    assert_eq!(
        bytes_read(&replicas),
        first.layers[0].size + second.layers[0].size,
        "each layer was read from the registry once"
    );
    let first_status = cluster
        .image(&first.manifest_digest)
        .await
        .and_then(|i| i.status)
        .expect("first image status");
    assert_eq!(first_status.phase, ImagePhase::Ready);
    assert!(
        !has_ztoc(stores[leader].path(), &second.layers[0].digest),
        "the killed replica built nothing more"
    );

    // A graceful stop releases the lease instead of letting it expire.
    tokio::task::spawn_blocking({
        let mut r = std::mem::replace(
            &mut replicas[follower],
            KillableReplica {
                api: None,
                runtime: None,
                stop: None,
                done: None,
            },
        );
        move || r.stop()
    })
    .await
    .expect("join")
    .expect("graceful stop");
    assert_eq!(cluster.lease_holder().await, None, "released on shutdown");
}
