//! Registry authentication as values: `WWW-Authenticate` challenges, credentials from a docker
//! `config.json` or a Kubernetes `kubernetes.io/dockerconfigjson` Secret, and token expiry.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::{Error, Result};

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic.
    Basic {
        /// Realm, informational.
        realm: String,
    },
    /// Docker/OCI token auth.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter, if any.
        service: Option<String>,
        /// `scope` parameter, if any.
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parse one challenge: `Scheme key="value", key=value, …`. `None` for unknown schemes.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header
            .split_once(char::is_whitespace)
            .unwrap_or((header, ""));
        let params = parse_params(rest);
        let get = |k: &str| params.get(k).cloned();
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Self::Basic {
                realm: get("realm").unwrap_or_default(),
            }),
            "bearer" => Some(Self::Bearer {
                realm: get("realm")?,
                service: get("service"),
                scope: get("scope"),
            }),
            _ => None,
        }
    }
}

/// `key="quoted, value", key2=token` → map (keys lower-cased).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password (or token used as password).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An identity (refresh) token for the token endpoint.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

impl Credential {
    /// The `Authorization: Basic …` value.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Self::Basic { username, password } => Some(format!(
                "Basic {}",
                STANDARD.encode(format!("{username}:{password}"))
            )),
            Self::IdentityToken(_) => None,
        }
    }
}

/// Credentials by registry host.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: BTreeMap<String, Credential>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

#[derive(Deserialize)]
struct Secret {
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<BTreeMap<String, String>>,
    #[serde(rename = "stringData")]
    string_data: Option<BTreeMap<String, String>>,
}

/// Reduce an `auths` key (`https://index.docker.io/v1/`, `host:5000`, `https://host/v2/`) to a host.
fn normalize_host(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_owned(),
        h => h.to_owned(),
    }
}

impl Credentials {
    /// No credentials (anonymous).
    pub fn none() -> Self {
        Self::default()
    }

    /// Add or replace the credential for a registry host.
    pub fn insert(&mut self, registry: &str, credential: Credential) {
        self.by_host.insert(normalize_host(registry), credential);
    }

    /// The credential for a registry (`docker.io` or `host[:port]`).
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(registry))
    }

    /// Merge another set in (its entries win).
    pub fn merge(&mut self, other: Credentials) {
        self.by_host.extend(other.by_host);
    }

    /// Parse a docker `config.json` (`auths` only; credential helpers are not run).
    pub fn from_docker_config(json: &[u8], source_name: &str) -> Result<Self> {
        let bad = |what: String| Error::Credentials {
            source_name: source_name.to_owned(),
            what,
        };
        let config: DockerConfig = serde_json::from_slice(json)
            .map_err(|e| bad(format!("not a docker config.json: {e}")))?;
        let mut creds = Self::default();
        for (key, entry) in config.auths {
            let credential = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Credential::IdentityToken(token)
            } else if let (Some(username), Some(password)) =
                (entry.username.clone(), entry.password.clone())
            {
                Credential::Basic { username, password }
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        bad(format!("`auth` for {key} is not base64 of user:password"))
                    })?;
                let (username, password) = decoded.split_once(':').ok_or_else(|| {
                    bad(format!(
                        "`auth` for {key} has no ':' between user and password"
                    ))
                })?;
                Credential::Basic {
                    username: username.to_owned(),
                    password: password.to_owned(),
                }
            } else {
                continue;
            };
            creds.insert(&key, credential);
        }
        Ok(creds)
    }

    /// Parse a Kubernetes Secret of type `kubernetes.io/dockerconfigjson` (JSON), or its raw
    /// `.dockerconfigjson` payload.
    pub fn from_pull_secret(json: &[u8], source_name: &str) -> Result<Self> {
        let bad = |what: String| Error::Credentials {
            source_name: source_name.to_owned(),
            what,
        };
        let secret: Secret =
            serde_json::from_slice(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        if secret.data.is_none() && secret.string_data.is_none() {
            return Self::from_docker_config(json, source_name);
        }
        if let Some(kind) = &secret.kind
            && kind != "kubernetes.io/dockerconfigjson"
            && kind != "kubernetes.io/dockercfg"
        {
            return Err(bad(format!(
                "secret type {kind:?} is not kubernetes.io/dockerconfigjson"
            )));
        }
        if let Some(raw) = secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
        {
            return Self::from_docker_config(raw.as_bytes(), source_name);
        }
        let encoded = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
            .ok_or_else(|| bad("no .dockerconfigjson key in the secret's data".into()))?;
        let payload = STANDARD
            .decode(encoded.trim())
            .map_err(|_| bad(".dockerconfigjson is not base64".into()))?;
        Self::from_docker_config(&payload, source_name)
    }
}

/// A bearer token and when to stop using it.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub value: String,
    pub expires: Instant,
}

#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// Tokens are refreshed a little before they expire; registries default to 60 s.
    pub(crate) fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let ttl = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        let margin = (ttl / 10).min(Duration::from_secs(10));
        Some(Token {
            value,
            expires: now + ttl - margin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic {
                realm: "basic-realm".into()
            })
        );
        assert_eq!(
            Challenge::parse("Bearer service=x"),
            None,
            "bearer without realm is unusable"
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn docker_config_and_pull_secret() {
        let config = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},"localhost:5000":{"username":"u","password":"p"},"ghcr.io":{"identitytoken":"tok"}}}"#;
        let c = Credentials::from_docker_config(config, "config.json").unwrap();
        assert_eq!(
            c.get("docker.io"),
            Some(&Credential::Basic {
                username: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            c.get("localhost:5000")
                .and_then(Credential::basic_header)
                .as_deref(),
            Some("Basic dTpw")
        );
        assert_eq!(
            c.get("ghcr.io"),
            Some(&Credential::IdentityToken("tok".into()))
        );
        assert!(c.get("quay.io").is_none());

        let secret = format!(
            r#"{{"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/dockerconfigjson","data":{{".dockerconfigjson":"{}"}}}}"#,
            STANDARD.encode(config)
        );
        let s = Credentials::from_pull_secret(secret.as_bytes(), "secret default/pull").unwrap();
        assert_eq!(s.get("localhost:5000"), c.get("localhost:5000"));

        let err = Credentials::from_docker_config(br#"{"auths":{"h":{"auth":"!!"}}}"#, "cfg")
            .unwrap_err();
        assert!(err.to_string().contains("`auth` for h"), "{err}");
        let err =
            Credentials::from_pull_secret(br#"{"type":"Opaque","data":{}}"#, "s").unwrap_err();
        assert!(err.to_string().contains("Opaque"), "{err}");
    }
}
