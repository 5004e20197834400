//! What an index build found for an image and its layers, as the store keeps it (JSON).

use serde::{Deserialize, Serialize};

use crate::Digest;

/// What an index build found for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// The reference as given (the latest, when the image was indexed under several names).
    pub reference: String,
    /// The other names the image was indexed under, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The platform-specific manifest digest.
    pub manifest_digest: Digest,
    /// Platform, when chosen from an index.
    pub platform: Option<String>,
    /// Span size used.
    pub span_size: u64,
    /// Per layer, in image order.
    pub layers: Vec<LayerRecord>,
    /// The SOCI index manifest built for the image (v2 form), if any layer was indexed.
    pub soci_index: Option<Digest>,
    /// When (Unix seconds).
    pub built_at_unix: u64,
}

impl ImageRecord {
    /// Every name the image was indexed under: `reference`, then the aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.reference.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// Whether the image was indexed under `name` (compared as given).
    pub fn is_named(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }
}

/// One layer's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    /// Layer digest.
    pub digest: Digest,
    /// Layer media type.
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
    /// Indexed or skipped.
    pub outcome: LayerOutcome,
}

/// Whether and how a layer was indexed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "status")]
pub enum LayerOutcome {
    /// A zTOC exists.
    Indexed {
        /// zTOC digest.
        ztoc: Digest,
        /// zTOC size.
        ztoc_size: u64,
        /// Spans.
        spans: u32,
        /// Tar entries.
        entries: u64,
        /// Build time (0 when reused).
        seconds: f64,
        /// True if an earlier build was reused (the layer was not read).
        reused: bool,
        /// False for zTOCs only Hermes can serve (zstd layers, sparse files).
        soci_compatible: bool,
        /// The zTOC's own span size (large layers get larger spans than the policy's); 0 in
        /// records written before it was recorded.
        #[serde(default)]
        span_size: u64,
    },
    /// No zTOC, and why.
    Skipped {
        /// Human-readable reason.
        reason: String,
    },
}
