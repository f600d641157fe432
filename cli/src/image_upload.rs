//! `stellar deploy --image`: an image archive's layers uploaded to the control plane's blob
//! store (each once: what the cluster holds on enough replicas is skipped), then described by
//! a `ContainerImage` that the deploy carries instead of a module. A byte progress bar shows
//! on a terminal.
//!
//! ```text
//!  IMAGE.tar ─▶ ImageArchive (index, config, layers) ─▶ StatBlobs(layers)
//!    each layer short of copies ─▶ PutBlob (1 MiB chunks read at its offset) ─▶ copies ≥ 2
//!  ─▶ ContainerImage { layers, entrypoint, cmd, env, working_dir, arch }
//! ```

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use stellar_worker::container::ImageArchive;

/// Bytes per uploaded chunk.
const CHUNK: usize = 1 << 20;

/// Indexes an image archive (a rootfs tarball needs `command`), checking it as the cluster
/// will; the deployable description and the archive.
pub fn describe(
    path: &Path,
    command: Option<Vec<String>>,
    arch: Option<&str>,
) -> Result<(pb::ContainerImage, ImageArchive), String> {
    let rootfs_needs = command.is_none();
    let archive = ImageArchive::open(path, command).map_err(|e| e.to_string())?;
    let oci_arch = archive.config.architecture.clone();
    let arch = match arch {
        Some(a) => a.to_string(),
        // A rootfs tarball names no arch: it was most likely built for this machine.
        None if oci_arch.is_empty() => {
            stellar_worker::container::image::this_architecture().to_string()
        }
        None => oci_arch,
    };
    let arch = stellar_proto::limits::node_arch(&arch)
        .ok_or_else(|| {
            format!(
                "{}: arch `{arch}` is not one StellarCloud nodes run; pass --arch x86_64, aarch64 or armv7",
                path.display()
            )
        })?
        .to_string();
    let image = pb::ContainerImage {
        layers: archive
            .layers
            .iter()
            .map(|l| pb::ImageLayer {
                sha256: l.sha256.clone(),
                size: l.size,
                gzip: l.gzip,
            })
            .collect(),
        entrypoint: archive.config.entrypoint.clone(),
        cmd: archive.config.cmd.clone(),
        env: archive.config.env.clone(),
        working_dir: archive.config.working_dir.clone(),
        arch,
    };
    stellar_proto::limits::check_image(&image).map_err(|e| {
        if rootfs_needs && image.entrypoint.is_empty() && image.cmd.is_empty() {
            format!("{}: {e} (--command \"PROGRAM ARGS\")", path.display())
        } else {
            format!("{}: {e}", path.display())
        }
    })?;
    Ok((image, archive))
}

/// How many replicas hold each of `shas` (at most 40), and how many are needed.
pub async fn stat_blobs(
    client: &ClusterClient,
    shas: Vec<String>,
) -> Result<pb::StatBlobsResponse, tonic::Status> {
    client
        .call(|mut c| {
            let req = pb::StatBlobsRequest {
                sha256: shas.clone(),
            };
            async move { c.stat_blobs(req).await }
        })
        .await
}

/// Uploads the layers the cluster does not hold on enough replicas yet; the bytes sent.
pub async fn upload_layers(
    client: &ClusterClient,
    image: &pb::ContainerImage,
    archive: &ImageArchive,
) -> Result<u64, tonic::Status> {
    let shas: Vec<String> = image.layers.iter().map(|l| l.sha256.clone()).collect();
    let stat = stat_blobs(client, shas).await?;
    let missing: Vec<_> = archive
        .layers
        .iter()
        .zip(&stat.copies)
        .filter(|(_, copies)| **copies < stat.needed.max(1))
        .map(|(l, _)| l.clone())
        .collect();
    let total: u64 = missing.iter().map(|l| l.size).sum();
    let bar = progress_bar(total);
    let mut sent = 0;
    for layer in &missing {
        // Idempotent (content-addressed): one more try when the first is cut short.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = put_blob(client, &archive.path, layer, &bar).await;
            match r {
                Ok(_) => break,
                Err(s) if attempt < 2 && s.code() == tonic::Code::Unavailable => {
                    bar.set_position(sent);
                }
                Err(s) => return Err(s),
            }
        }
        sent += layer.size;
    }
    bar.finish_and_clear();
    Ok(total)
}

/// The layer upload's byte progress bar.
pub fn progress_bar(total: u64) -> indicatif::ProgressBar {
    bytes_bar(total, "uploading layers")
}

/// A byte progress bar on stderr for `what` (hidden off a terminal or for nothing).
pub fn bytes_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, {{eta}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Streams one layer from the archive.
async fn put_blob(
    client: &ClusterClient,
    archive: &Path,
    layer: &stellar_worker::container::image::LayerBlob,
    bar: &indicatif::ProgressBar,
) -> Result<pb::PutBlobResponse, tonic::Status> {
    let range = (layer.offset, layer.size);
    put_file_range(client, archive, range, &layer.sha256, bar).await
}

/// Streams `size` bytes of `path` from `offset` as blob `sha256` (1 MiB chunks, read on a
/// blocking thread a few chunks ahead); the store checks the bytes against the name.
pub async fn put_file_range(
    client: &ClusterClient,
    path: &Path,
    (offset, size): (u64, u64),
    sha256: &str,
    bar: &indicatif::ProgressBar,
) -> Result<pb::PutBlobResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::BlobChunk>(4);
    let (path, sha, bar2) = (path.to_path_buf(), sha256.to_string(), bar.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut f = f.take(size);
        let mut at = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
            buf.truncate(n);
            let last = at + n as u64 >= size;
            let chunk = pb::BlobChunk {
                sha256: sha.clone(),
                size,
                offset: at,
                data: buf,
                last,
                error: String::new(),
            };
            if tx.blocking_send(chunk).is_err() {
                return Ok(()); // the call ended; its status says why
            }
            at += n as u64;
            bar2.inc(n as u64);
            if last {
                return Ok(());
            }
            if n == 0 {
                return Err(format!("{}: the file ends early", path.display()));
            }
        }
    });
    let mut stream = Some(tokio_stream::wrappers::ReceiverStream::new(rx));
    let r = client
        .call_with(stellar_proto::client::RetryPolicy::Unrun, |mut c| {
            let chunks = stream.take();
            async move {
                match chunks {
                    Some(chunks) => c.put_blob(chunks).await,
                    None => Err(tonic::Status::unavailable("upload interrupted; retrying")),
                }
            }
        })
        .await;
    if let Ok(Err(e)) = reader.await {
        return Err(tonic::Status::invalid_argument(e));
    }
    r
}
