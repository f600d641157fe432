//! A job's files on the client side: local inputs hashed and uploaded to the blob store
//! (each once: what the cluster holds on enough replicas is skipped), outputs downloaded
//! and checked against their sha256 before they take their final name.
//!
//! ```text
//!  input files ─▶ sha256 ─▶ StatBlobs (40 at a time) ─▶ PutBlob the missing ones (bar)
//!  outputs ─▶ GetBlob(sha, offset) ─▶ NAME.part (sha256 checked) ─▶ rename to NAME
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;
use tokio::io::AsyncWriteExt;

use crate::image_upload::{bytes_bar, put_file_range};

/// The sha256 (hex) and size of a file, read on a blocking thread.
pub async fn hash_file(path: &Path) -> Result<(String, u64), String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = f
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            if r == 0 {
                break;
            }
            h.update(&buf[..r]);
            n += r as u64;
        }
        Ok((hex::encode(h.finalize()), n))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A local file as a job input named by its file name.
pub async fn input_ref(path: &Path) -> Result<pb::BlobRef, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !stellar_proto::job_spec::is_file_name(&name) {
        return Err(format!(
            "{}: a job input's file name must be 1-255 characters of A-Z, a-z, 0-9, '.', '_' and '-' (tasks see it as /in/NAME)",
            path.display()
        ));
    }
    let (sha256, size) = hash_file(path).await?;
    Ok(pb::BlobRef { name, sha256, size })
}

/// Uploads the files the cluster lacks (on enough replicas); the bytes sent.
pub async fn upload(
    client: &ClusterClient,
    files: &[(PathBuf, pb::BlobRef)],
) -> Result<u64, tonic::Status> {
    let mut missing = Vec::new();
    for batch in files.chunks(stellar_proto::limits::MAX_IMAGE_LAYERS) {
        let shas: Vec<String> = batch.iter().map(|(_, b)| b.sha256.clone()).collect();
        let stat = crate::image_upload::stat_blobs(client, shas).await?;
        for ((path, b), copies) in batch.iter().zip(&stat.copies) {
            if *copies < stat.needed.max(1)
                && !missing
                    .iter()
                    .any(|(_, m): &(PathBuf, pb::BlobRef)| m.sha256 == b.sha256)
            {
                missing.push((path.clone(), b.clone()));
            }
        }
    }
    let total: u64 = missing.iter().map(|(_, b)| b.size).sum();
    let bar = bytes_bar(total, "uploading inputs");
    for (path, b) in &missing {
        let before = bar.position();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match put_file_range(client, path, (0, b.size), &b.sha256, &bar).await {
                Ok(_) => break,
                // Content-addressed: one more whole try when the first is cut short.
                Err(s) if attempt < 2 && s.code() == tonic::Code::Unavailable => {
                    bar.set_position(before);
                }
                Err(s) => return Err(s),
            }
        }
    }
    bar.finish_and_clear();
    Ok(total)
}

/// Downloads blob `b` into `dir/NAME`, checked against its sha256 (a partial file is
/// resumed from where it stopped).
pub async fn download(
    client: &ClusterClient,
    tenant: &str,
    b: &pb::BlobRef,
    to: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let part = to.with_extension(match to.extension() {
        Some(e) => format!("{}.part", e.to_string_lossy()),
        None => "part".to_string(),
    });
    let mut have = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if have > b.size {
        have = 0;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(have > 0)
        .write(true)
        .truncate(have == 0)
        .open(&part)
        .await
        .map_err(|e| format!("{}: {e}", part.display()))?;
    bar.inc(have);
    let req = pb::GetBlobRequest {
        sha256: b.sha256.clone(),
        offset: have,
        tenant: tenant.to_string(),
    };
    let mut stream = client
        .call(|mut c| {
            let req = req.clone();
            async move { c.get_blob(req).await }
        })
        .await
        .map_err(|s| format!("downloading `{}`: {}", b.name, s.message()))?;
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if !chunk.error.is_empty() {
                    return Err(format!("downloading `{}`: {}", b.name, chunk.error));
                }
                file.write_all(&chunk.data)
                    .await
                    .map_err(|e| format!("{}: {e}", part.display()))?;
                bar.inc(chunk.data.len() as u64);
                if chunk.last {
                    break;
                }
            }
            Ok(None) => break,
            Err(s) => {
                return Err(format!(
                    "downloading `{}`: {} (run again to resume)",
                    b.name,
                    s.message()
                ));
            }
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    drop(file);
    let (sha, size) = hash_file(&part).await?;
    if sha != b.sha256 || size != b.size {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(format!(
            "`{}` arrived as {size} bytes with sha256 {sha}, not {} bytes with {}: removed; run again",
            b.name, b.size, b.sha256
        ));
    }
    tokio::fs::rename(&part, to)
        .await
        .map_err(|e| format!("{}: {e}", to.display()))
}
