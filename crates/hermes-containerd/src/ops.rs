//! Typed containerd operations an image pull needs: leases, content writes and label updates,
//! snapshot prepare/commit/remove/stat, diff apply and image records. Each is one or a few gRPC
//! calls; the pull flow that combines them with a registry is `hermes pull`'s.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hermes_node_api::labels;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::containerd::services::content::v1 as content;
use crate::api::containerd::services::diff::v1 as diff;
use crate::api::containerd::services::images::v1 as images;
use crate::api::containerd::services::leases::v1 as leases;
use crate::api::containerd::services::snapshots::v1 as snapshots;
use crate::api::containerd::types::{Descriptor, Mount};
use crate::{Containerd, Error, Result};

/// Size of the data in one content `Write` message.
const WRITE_CHUNK: usize = 1 << 20;

/// A source of a blob's bytes, chunk by chunk (`None` at the end).
pub trait Chunks {
    /// The next chunk, `None` after the last, or an error that aborts the write (the source's
    /// own failures as [`Error::Source`]).
    fn next_chunk(&mut self) -> impl Future<Output = Option<Result<Bytes>>> + Send;
}

impl Chunks for Option<Bytes> {
    async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        self.take().map(Ok)
    }
}

/// A blob's identity in a content write.
#[derive(Debug, Clone)]
pub struct BlobRef<'a> {
    /// `sha256:…`.
    pub digest: &'a str,
    /// Size in bytes.
    pub size: u64,
    /// Labels set on the committed blob (GC references, `containerd.io/uncompressed`, …).
    pub labels: HashMap<String, String>,
}

/// Whether a content write stored the blob or found it present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The blob was written and committed.
    Stored,
    /// containerd already had the blob (its labels were updated instead).
    AlreadyPresent,
}

impl Containerd {
    /// Creates a lease that expires after `expire_after` (containerd's GC removes it then, so a
    /// crashed pull leaves nothing behind for long). Returns its ID.
    pub async fn create_lease(&self, id: &str, expire_after: Duration) -> Result<String> {
        let expires = SystemTime::now() + expire_after;
        let lease = self
            .leases()
            .create(leases::CreateRequest {
                id: id.to_owned(),
                labels: HashMap::from([(labels::GC_EXPIRE.to_owned(), rfc3339(expires))]),
            })
            .await
            .map_err(Error::rpc("leases.Create"))?
            .into_inner()
            .lease
            .ok_or_else(|| Error::Unexpected {
                call: "leases.Create",
                reason: "no lease in the answer".into(),
            })?;
        Ok(lease.id)
    }

    /// Deletes a lease (what it protected is left to the GC unless referenced elsewhere).
    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        self.leases()
            .delete(leases::DeleteRequest {
                id: id.to_owned(),
                sync: false,
            })
            .await
            .map_err(Error::rpc("leases.Delete"))?;
        Ok(())
    }

    /// The labels of a blob in the content store, or `None` if it is not there.
    pub async fn content_labels(&self, digest: &str) -> Result<Option<HashMap<String, String>>> {
        let got = self
            .content()
            .info(content::InfoRequest {
                digest: digest.to_owned(),
            })
            .await
            .map_err(Error::rpc("content.Info"));
        match got {
            Ok(r) => Ok(Some(
                r.into_inner().info.map(|i| i.labels).unwrap_or_default(),
            )),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets `labels` on a blob in the content store (other labels are kept).
    pub async fn set_content_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(content::UpdateRequest {
                info: Some(content::Info {
                    digest: digest.to_owned(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await
            .map_err(Error::rpc("content.Update"))?;
        Ok(())
    }

    /// Writes a blob into the content store from `chunks` and commits it with its labels;
    /// containerd verifies size and digest on commit. A blob that is already there only gets its
    /// labels set. `ingest_ref` names the upload (unique per concurrent writer).
    pub async fn write_content(
        &self,
        ingest_ref: &str,
        blob: BlobRef<'_>,
        mut chunks: impl Chunks,
    ) -> Result<Written> {
        let result = self
            .write_content_inner(ingest_ref, &blob, &mut chunks)
            .await;
        match result {
            Err(e) if e.is_already_exists() => {
                self.set_content_labels(blob.digest, blob.labels).await?;
                Ok(Written::AlreadyPresent)
            }
            Err(e) => {
                // Leave no half-written ingest behind; the write's error is what matters.
                let _ = self
                    .content()
                    .abort(content::AbortRequest {
                        r#ref: ingest_ref.to_owned(),
                    })
                    .await;
                Err(e)
            }
            Ok(()) => Ok(Written::Stored),
        }
    }

    async fn write_content_inner(
        &self,
        ingest_ref: &str,
        blob: &BlobRef<'_>,
        chunks: &mut impl Chunks,
    ) -> Result<()> {
        const CALL: &str = "content.Write";
        let total = i64::try_from(blob.size).map_err(|_| Error::TooLarge {
            digest: blob.digest.to_owned(),
            limit: i64::MAX as u64,
        })?;
        let message = |action: content::WriteAction, offset: i64, data: Vec<u8>| {
            content::WriteContentRequest {
                action: action as i32,
                r#ref: ingest_ref.to_owned(),
                total,
                expected: blob.digest.to_owned(),
                offset,
                data,
                labels: if action == content::WriteAction::Commit {
                    blob.labels.clone()
                } else {
                    HashMap::new()
                },
            }
        };
        let (tx, rx) = mpsc::channel(2);
        let closed = || Error::Unexpected {
            call: CALL,
            reason: "containerd closed the write stream".into(),
        };
        // The first message opens the ingest (and fails with AlreadyExists if the blob is there).
        tx.send(message(content::WriteAction::Stat, 0, Vec::new()))
            .await
            .map_err(|_| closed())?;
        let mut responses = self
            .content()
            .write(ReceiverStream::new(rx))
            .await
            .map_err(Error::rpc(CALL))?
            .into_inner();
        let mut next_response = async || responses.message().await.map_err(Error::rpc(CALL));
        next_response().await?.ok_or_else(closed)?;
        let mut offset: i64 = 0;
        let mut pending: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
        let mut finished = false;
        while !finished {
            match chunks.next_chunk().await {
                Some(chunk) => pending.extend_from_slice(&chunk?),
                None => finished = true,
            }
            if pending.len() >= WRITE_CHUNK || finished {
                let data = std::mem::take(&mut pending);
                let len = data.len() as i64;
                let action = if finished {
                    content::WriteAction::Commit
                } else {
                    content::WriteAction::Write
                };
                tx.send(message(action, offset, data))
                    .await
                    .map_err(|_| closed())?;
                let answer = next_response().await?.ok_or_else(closed)?;
                offset += len;
                if answer.offset != offset {
                    return Err(Error::Unexpected {
                        call: CALL,
                        reason: format!(
                            "containerd is at offset {} of {}, expected {offset}",
                            answer.offset, blob.digest
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// `Prepare` on `snapshotter`: an active snapshot `key` on `parent` ("" for none) with
    /// `labels`; returns its mounts. A remote snapshotter answers `AlreadyExists` (see
    /// [`Error::is_already_exists`]) when it provided the layer itself.
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        Ok(self
            .snapshots()
            .prepare(snapshots::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.to_owned(),
                parent: parent.to_owned(),
                labels,
            })
            .await
            .map_err(Error::rpc("snapshots.Prepare"))?
            .into_inner()
            .mounts)
    }

    /// `Commit`s active snapshot `key` as `name` with `labels`.
    pub async fn commit_snapshot(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.snapshots()
            .commit(snapshots::CommitSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
                labels,
            })
            .await
            .map_err(Error::rpc("snapshots.Commit"))?;
        Ok(())
    }

    /// Removes snapshot `key`.
    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        self.snapshots()
            .remove(snapshots::RemoveSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.to_owned(),
            })
            .await
            .map_err(Error::rpc("snapshots.Remove"))?;
        Ok(())
    }

    /// Whether snapshot `key` exists on `snapshotter`.
    pub async fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let got = self
            .snapshots()
            .stat(snapshots::StatSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.to_owned(),
            })
            .await
            .map_err(Error::rpc("snapshots.Stat"));
        match got {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies the layer blob `layer` (in the content store) onto `mounts` with containerd's
    /// diff service; returns the digest of the uncompressed tar it applied (the diff ID).
    pub async fn apply_layer(&self, layer: Descriptor, mounts: Vec<Mount>) -> Result<String> {
        let applied = self
            .diff()
            .apply(diff::ApplyRequest {
                diff: Some(layer),
                mounts,
                payloads: HashMap::new(),
            })
            .await
            .map_err(Error::rpc("diff.Apply"))?
            .into_inner()
            .applied
            .ok_or_else(|| Error::Unexpected {
                call: "diff.Apply",
                reason: "no applied descriptor".into(),
            })?;
        Ok(applied.digest)
    }

    /// Creates image record `name` pointing at `target`, or updates its target and labels if it
    /// exists.
    pub async fn put_image(
        &self,
        name: &str,
        target: Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let image = images::Image {
            name: name.to_owned(),
            labels,
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let created = self
            .images()
            .create(images::CreateImageRequest {
                image: Some(image.clone()),
            })
            .await
            .map_err(Error::rpc("images.Create"));
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_exists() => {
                self.images()
                    .update(images::UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into(), "labels".into()],
                        }),
                    })
                    .await
                    .map_err(Error::rpc("images.Update"))?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// `time` as RFC 3339 in UTC with second precision (`2024-05-01T12:00:00Z`).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
