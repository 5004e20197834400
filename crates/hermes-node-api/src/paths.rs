//! The node API's routes. Each is a constant in the server's route syntax (`{digest}` for a
//! path parameter) and, where it has a parameter, a function giving the path a client requests;
//! the tests hold the two together.

use hermes_oci::{Digest, encode_query};

use crate::ZtocQuery;

/// `GET`: a layer's zTOC (`{digest}`: the layer digest), see [`ztoc`].
pub const ZTOC: &str = "/v1/layers/{digest}/ztoc";
/// `GET`: a layer's merged startup profile, a [`PrefetchProfile`](crate::PrefetchProfile).
pub const PREFETCH: &str = "/v1/layers/{digest}/prefetch";
/// `GET`: every image report.
pub const IMAGES: &str = "/v1/images";
/// `GET`: one image's report (`{digest}`: the manifest digest).
pub const IMAGE: &str = "/v1/images/{digest}";
/// `GET`: every policy's status.
pub const POLICIES: &str = "/v1/policies";
/// `POST`: a [`Miss`](crate::Miss).
pub const MISSES: &str = "/v1/misses";
/// `POST`: a [`PullReport`](crate::PullReport).
pub const PULLS: &str = "/v1/pulls";
/// `POST`: a [`TraceReport`](crate::TraceReport).
pub const TRACES: &str = "/v1/traces";
/// `GET`: liveness (no token needed).
pub const HEALTHZ: &str = "/healthz";
/// `GET`: readiness (no token needed).
pub const READYZ: &str = "/readyz";
/// `GET`: Prometheus metrics (no token needed).
pub const METRICS: &str = "/metrics";

/// The path of a zTOC lookup for `layer`, with what the node knows about its image as the query.
pub fn ztoc(layer: &Digest, query: &ZtocQuery) -> String {
    let mut pairs = Vec::new();
    if let Some(image) = &query.image {
        pairs.push(format!("image={}", encode_query(image)));
    }
    if let Some(manifest) = &query.manifest {
        pairs.push(format!("manifest={}", encode_query(manifest)));
    }
    if let Some(namespace) = &query.namespace {
        pairs.push(format!("namespace={}", encode_query(namespace)));
    }
    if let Some(labels) = &query.labels {
        pairs.push(format!("labels={}", encode_query(labels)));
    }
    let path = fill(ZTOC, layer);
    if pairs.is_empty() {
        path
    } else {
        format!("{path}?{}", pairs.join("&"))
    }
}

/// The path of `layer`'s startup profile.
pub fn prefetch(layer: &Digest) -> String {
    fill(PREFETCH, layer)
}

/// The path of the report of the image with manifest `manifest`.
pub fn image(manifest: &Digest) -> String {
    fill(IMAGE, manifest)
}

fn fill(route: &str, digest: &Digest) -> String {
    route.replace("{digest}", digest.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `path` is one the server's `route` pattern matches (a `{…}` segment matches any
    /// one segment).
    fn routed(route: &str, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or_default();
        let (r, p): (Vec<_>, Vec<_>) = (route.split('/').collect(), path.split('/').collect());
        r.len() == p.len()
            && r.iter()
                .zip(&p)
                .all(|(r, p)| r == p || (r.starts_with('{') && r.ends_with('}') && !p.is_empty()))
    }

    #[test]
    fn client_paths_are_the_routes_the_server_declares() {
        let d = Digest::of(b"layer");
        for (route, path) in [
            (ZTOC, ztoc(&d, &ZtocQuery::default())),
            (PREFETCH, prefetch(&d)),
            (IMAGE, image(&d)),
        ] {
            assert!(routed(route, &path), "{path} does not match {route}");
            assert!(path.contains(d.as_str()), "{path}");
        }
        assert!(!routed(ZTOC, &prefetch(&d)));
    }

    #[test]
    fn a_ztoc_query_names_the_image_percent_encoded() {
        let d = Digest::of(b"layer");
        let m = Digest::of(b"manifest");
        let q = ZtocQuery {
            image: Some("ghcr.io/acme/web:1@x".into()),
            manifest: Some(m.to_string()),
            ..Default::default()
        };
        assert_eq!(
            ztoc(&d, &q),
            format!(
                "/v1/layers/{d}/ztoc?image=ghcr.io%2Facme%2Fweb%3A1%40x&manifest=sha256%3A{}",
                m.hex()
            )
        );
        let only_manifest = ZtocQuery {
            image: None,
            manifest: Some(m.to_string()),
            ..Default::default()
        };
        assert!(
            ztoc(&d, &only_manifest).ends_with(&format!("/ztoc?manifest=sha256%3A{}", m.hex()))
        );
        let pod = ZtocQuery {
            namespace: Some("team-a".into()),
            labels: Some("app=web,hermes.dev/tier=x".into()),
            ..Default::default()
        };
        assert!(
            ztoc(&d, &pod)
                .ends_with("/ztoc?namespace=team-a&labels=app%3Dweb%2Chermes.dev%2Ftier%3Dx"),
            "{}",
            ztoc(&d, &pod)
        );
    }
}
