//! Credentials learned while the node runs, per repository: what a kubelet sent with a pod's
//! `PullImage` (its `imagePullSecrets`, through the CRI proxy). They live in memory only — never
//! logged (the `Debug` output names registries and repositories, not secrets), never written to
//! disk — and each pull replaces the previous entry, so a rotated secret takes effect on the
//! next pull. The client consults them ahead of its static [`Credentials`](crate::Credentials)
//! (a docker `config.json`).
//!
//! Keyed by registry API host and repository, not by host alone: two pods may pull two
//! repositories of one registry with different secrets.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hermes_oci_types::Reference;
use serde::{Deserialize, Serialize};

use crate::auth::Credential;

/// Shared, in-memory credentials by (registry API host, repository); cheap to clone.
#[derive(Clone, Default)]
pub struct PullCredentials {
    by_repository: Arc<RwLock<HashMap<(String, String), Credential>>>,
}

impl std::fmt::Debug for PullCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self
            .by_repository
            .read()
            .map(|m| m.keys().map(|(h, r)| format!("{h}/{r}")).collect())
            .unwrap_or_default();
        f.debug_struct("PullCredentials")
            .field("repositories", &keys)
            .finish()
    }
}

impl PullCredentials {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or refreshes) the credential for `image`'s repository; `None` forgets it (a pull
    /// without credentials: the pod's secret was removed).
    pub fn set(&self, image: &Reference, credential: Option<Credential>) {
        let key = (image.api_host().to_owned(), image.repository.clone());
        if let Ok(mut map) = self.by_repository.write() {
            match credential {
                Some(c) => map.insert(key, c),
                None => map.remove(&key),
            };
        }
    }

    /// The credential for `repository` on the registry whose API host is `api_host`.
    pub fn get(&self, api_host: &str, repository: &str) -> Option<Credential> {
        let map = self.by_repository.read().ok()?;
        map.get(&(api_host.to_owned(), repository.to_owned()))
            .cloned()
    }

    /// The credential for `image`'s repository.
    pub fn for_image(&self, image: &Reference) -> Option<Credential> {
        self.get(image.api_host(), &image.repository)
    }
}

/// A registry credential as a CRI `AuthConfig` (or a docker `auths` entry) carries it: an
/// identity token wins, then user name and password, then `auth` (base64 `user:password`).
/// `None` when none of them is set. A `registry_token` (a ready bearer token) is not used.
pub fn credential_from_auth_fields(
    username: &str,
    password: &str,
    auth: &str,
    identity_token: &str,
) -> Option<Credential> {
    if !identity_token.is_empty() {
        return Some(Credential::IdentityToken(identity_token.to_owned()));
    }
    if !username.is_empty() {
        return Some(Credential::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        });
    }
    let decoded = STANDARD.decode(auth.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(Credential::Basic {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// How a credential is handed to a child process on its stdin (never on its command line or
/// in its environment, which other tools show and log).
#[derive(Serialize, Deserialize)]
struct Handoff {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    password: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    identity_token: String,
}

/// Largest handoff [`decode_handoff`] reads; a credential is far smaller.
pub const MAX_HANDOFF_SIZE: usize = 64 << 10;

/// Encodes `credential` for [`decode_handoff`] in a child process.
pub fn encode_handoff(credential: &Credential) -> Vec<u8> {
    let handoff = match credential {
        Credential::Basic { username, password } => Handoff {
            username: username.clone(),
            password: password.clone(),
            identity_token: String::new(),
        },
        Credential::IdentityToken(t) => Handoff {
            username: String::new(),
            password: String::new(),
            identity_token: t.clone(),
        },
    };
    serde_json::to_vec(&handoff).unwrap_or_default()
}

/// Decodes what [`encode_handoff`] wrote; `None` for anything else (no detail: the input
/// holds a secret).
pub fn decode_handoff(bytes: &[u8]) -> Option<Credential> {
    if bytes.len() > MAX_HANDOFF_SIZE {
        return None;
    }
    let h: Handoff = serde_json::from_slice(bytes).ok()?;
    credential_from_auth_fields(&h.username, &h.password, "", &h.identity_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(p: &str) -> Credential {
        Credential::Basic {
            username: "u".into(),
            password: p.into(),
        }
    }

    #[test]
    fn keyed_by_repository_refreshed_and_forgotten() {
        let creds = PullCredentials::new();
        let a = Reference::parse("reg:5000/team/a:v1").unwrap();
        let b = Reference::parse(&format!("reg:5000/team/b@sha256:{}", "0".repeat(64))).unwrap();
        creds.set(&a, Some(basic("one")));
        assert_eq!(creds.for_image(&a), Some(basic("one")));
        assert_eq!(
            creds.for_image(&b),
            None,
            "another repository, same registry"
        );
        let a2 = Reference::parse("reg:5000/team/a:v2").unwrap();
        creds.set(&a2, Some(basic("two")));
        assert_eq!(creds.get("reg:5000", "team/a"), Some(basic("two")));
        creds.set(&a, None);
        assert_eq!(creds.for_image(&a), None);
    }

    #[test]
    fn auth_fields_in_cri_order() {
        assert_eq!(credential_from_auth_fields("", "", "", ""), None);
        assert_eq!(
            credential_from_auth_fields("", "", &STANDARD.encode("u:p:q"), ""),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p:q".into()
            })
        );
        assert_eq!(
            credential_from_auth_fields("u", "x", "bm90OnVzZWQ=", ""),
            Some(basic("x"))
        );
        assert_eq!(
            credential_from_auth_fields("u", "x", "", "tok"),
            Some(Credential::IdentityToken("tok".into()))
        );
        assert_eq!(credential_from_auth_fields("", "", "%%%", ""), None);
    }

    #[test]
    fn handoff_round_trips_and_rejects_junk() {
        for c in [basic("p"), Credential::IdentityToken("t".into())] {
            assert_eq!(decode_handoff(&encode_handoff(&c)), Some(c));
        }
        assert_eq!(decode_handoff(b"not json"), None);
        assert_eq!(decode_handoff(b"{}"), None);
        assert_eq!(decode_handoff(&vec![b' '; MAX_HANDOFF_SIZE + 1]), None);
    }

    #[test]
    fn debug_names_repositories_not_secrets() {
        let creds = PullCredentials::new();
        let a = Reference::parse("reg:5000/team/a:v1").unwrap();
        creds.set(&a, Some(basic("hunter2-secret")));
        let shown = format!("{creds:?}");
        assert!(shown.contains("reg:5000/team/a"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
