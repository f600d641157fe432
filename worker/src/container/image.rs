//! Container images as users hand them over: an OCI image archive (the `oci-layout` tar that
//! skopeo, buildah and `docker buildx --output type=oci` write) or a plain rootfs tarball run
//! with an explicit command. Read in one pass that indexes the archive; layers are read
//! later straight from their offsets, never copied out first.
//!
//! ```text
//! IMAGE.tar ─▶ entries: oci-layout · index.json · blobs/sha256/<hex> (offset, size)
//!          ─▶ index ─▶ manifest (this node's platform) ─▶ config + layers (bottom first)
//!          └▶ no oci-layout: a rootfs tarball = one layer, its sha256 the file's
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest, Sha256};

/// Manifests, indexes and configs larger than this are refused (they are a few KiB).
const MAX_JSON_BLOB: u64 = 4 << 20;

/// Why an image cannot be used: the caller's to fix (`IMAGE_INVALID`).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The archive is not a valid OCI layout or rootfs tarball.
    #[error("{0}")]
    Invalid(String),
    /// A blob's bytes do not hash to its name.
    #[error("blob {digest} is corrupt: its bytes hash to sha256:{actual}")]
    DigestMismatch {
        /// What the manifest names.
        digest: String,
        /// What the bytes hash to.
        actual: String,
    },
}

/// What the image says to run, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD (the arguments when the caller gives none).
    pub cmd: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// The working directory ("/" when unset).
    pub working_dir: String,
    /// The OCI architecture name (`amd64`, `arm64`); empty for a rootfs tarball.
    pub architecture: String,
}

/// One layer as stored in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Hex sha256 of the blob's bytes (what the cache is keyed by).
    pub sha256: String,
    /// Whether the blob is gzip-compressed.
    pub gzip: bool,
    /// Where its bytes start in the archive.
    pub offset: u64,
    /// How many bytes it has.
    pub size: u64,
}

/// An indexed image archive: its config and its layers, bottom first.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    /// The archive's path.
    pub path: PathBuf,
    /// What to run.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<LayerBlob>,
}

impl ImageArchive {
    /// Indexes `path`. A rootfs tarball (no `oci-layout`) needs `command` (program and
    /// arguments); for an OCI image, `command` replaces its ENTRYPOINT and CMD.
    pub fn open(path: &Path, command: Option<Vec<String>>) -> Result<ImageArchive, ImageError> {
        let read = |source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read)?;
        let mut magic = [0u8; 2];
        let gz = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        file.seek(SeekFrom::Start(0)).map_err(read)?;
        let entries = if gz {
            None // a compressed tarball cannot be an OCI layout (its blobs need offsets)
        } else {
            Some(index_entries(&mut file).map_err(|e| {
                ImageError::Invalid(format!(
                    "{} is neither an OCI image archive nor a rootfs tarball: {e}",
                    path.display()
                ))
            })?)
        };
        match entries {
            Some(e) if e.oci_layout.is_some() => {
                let mut image = oci_image(path, &mut file, e)?;
                if let Some(command) = command {
                    image.config.entrypoint = command;
                    image.config.cmd.clear();
                }
                Ok(image)
            }
            _ => rootfs_image(path, &mut file, gz, command),
        }
    }

    /// The program and arguments a call runs: `args` replace CMD when given.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        self.config.argv(args)
    }

    /// The layers' content addresses, bottom first.
    pub fn layer_shas(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.sha256.clone()).collect()
    }
}

impl ImageConfig {
    /// The program and arguments a call runs: `args` replace CMD when given.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone();
        if args.is_empty() {
            argv.extend(self.cmd.iter().cloned());
        } else {
            argv.extend(args.iter().cloned());
        }
        argv
    }
}

/// The OCI architecture name of this machine.
pub fn this_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[derive(Default)]
struct Entries {
    oci_layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    /// hex sha256 → (offset, size); a blob's bytes are read only when needed (the layers
    /// are never read here).
    blobs: HashMap<String, (u64, u64)>,
}

fn index_entries(file: &mut File) -> std::io::Result<Entries> {
    let mut e = Entries::default();
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let size = entry.size();
        let small = |entry: &mut tar::Entry<'_, _>| -> std::io::Result<Vec<u8>> {
            let mut v = Vec::new();
            entry.take(MAX_JSON_BLOB).read_to_end(&mut v)?;
            Ok(v)
        };
        match name.as_str() {
            "oci-layout" => e.oci_layout = Some(small(&mut entry)?),
            "index.json" => e.index = Some(small(&mut entry)?),
            _ => {
                if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                    e.blobs
                        .insert(hex.to_string(), (entry.raw_file_position(), size));
                }
            }
        }
    }
    Ok(e)
}

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::Invalid(msg.into())
}

/// A small (JSON) blob's bytes, read from its offset and checked against its digest.
fn json_blob(file: &mut File, e: &Entries, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let hex = sha256_hex_of(d)?;
    let &(offset, size) = e
        .blobs
        .get(&hex)
        .ok_or_else(|| invalid(format!("the archive has no blob {}", d.digest())))?;
    if size > MAX_JSON_BLOB {
        return Err(invalid(format!(
            "blob {} is {size} bytes: too large for a manifest or config",
            d.digest()
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.take(size).read_to_end(&mut bytes))
        .map_err(|e| invalid(format!("blob {}: {e}", d.digest())))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != hex {
        return Err(ImageError::DigestMismatch {
            digest: d.digest().to_string(),
            actual,
        });
    }
    Ok(bytes)
}

fn sha256_hex_of(d: &Descriptor) -> Result<String, ImageError> {
    let digest = d.digest();
    if digest.algorithm().as_ref() != "sha256" {
        return Err(invalid(format!(
            "blob {digest}: only sha256 digests are supported"
        )));
    }
    Ok(digest.digest().to_string())
}

fn oci_image(path: &Path, file: &mut File, e: Entries) -> Result<ImageArchive, ImageError> {
    let index = ImageIndex::from_reader(e.index.as_deref().unwrap_or_default())
        .map_err(|err| invalid(format!("index.json: {err}")))?;
    let want = this_architecture();
    // An index may list one manifest per platform, or point at a nested index.
    let mut manifests: Vec<Descriptor> = index.manifests().clone();
    let mut chosen = None;
    for _ in 0..4 {
        let pick = manifests
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_none_or(|p| p.architecture().to_string() == want)
            })
            .cloned()
            .ok_or_else(|| invalid(format!("the image has no manifest for {want}")))?;
        if *pick.media_type() == MediaType::ImageIndex {
            let nested = ImageIndex::from_reader(json_blob(file, &e, &pick)?.as_slice())
                .map_err(|err| invalid(format!("nested index: {err}")))?;
            manifests = nested.manifests().clone();
        } else {
            chosen = Some(pick);
            break;
        }
    }
    let manifest_desc = chosen.ok_or_else(|| invalid("image indexes nest too deep"))?;
    let manifest = ImageManifest::from_reader(json_blob(file, &e, &manifest_desc)?.as_slice())
        .map_err(|err| invalid(format!("manifest: {err}")))?;
    let config =
        ImageConfiguration::from_reader(json_blob(file, &e, manifest.config())?.as_slice())
            .map_err(|err| invalid(format!("image config: {err}")))?;
    let architecture = config.architecture().to_string();
    if architecture != want {
        return Err(invalid(format!(
            "the image is built for {architecture}; this node is {want}"
        )));
    }
    let c = config.config().clone().unwrap_or_default();
    let mut layers = Vec::new();
    for d in manifest.layers() {
        let gzip = match d.media_type() {
            MediaType::ImageLayerGzip => true,
            MediaType::ImageLayer => false,
            MediaType::Other(t) if t == "application/vnd.docker.image.rootfs.diff.tar.gzip" => true,
            other => {
                return Err(invalid(format!(
                    "layer {}: media type {other} is not supported (tar or tar+gzip)",
                    d.digest()
                )));
            }
        };
        let sha256 = sha256_hex_of(d)?;
        let (offset, size) = *e
            .blobs
            .get(&sha256)
            .ok_or_else(|| invalid(format!("the archive has no layer {}", d.digest())))?;
        if size != d.size() {
            return Err(invalid(format!(
                "layer {}: {size} bytes in the archive, {} in the manifest",
                d.digest(),
                d.size()
            )));
        }
        layers.push(LayerBlob {
            sha256,
            gzip,
            offset,
            size,
        });
    }
    if layers.is_empty() {
        return Err(invalid("the image has no layers"));
    }
    Ok(ImageArchive {
        path: path.to_path_buf(),
        config: ImageConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c
                .working_dir()
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            architecture,
        },
        layers,
    })
}

fn rootfs_image(
    path: &Path,
    file: &mut File,
    gzip: bool,
    command: Option<Vec<String>>,
) -> Result<ImageArchive, ImageError> {
    let command = command.filter(|c| !c.is_empty()).ok_or_else(|| {
        invalid(format!(
            "{} is a rootfs tarball (no oci-layout): give the program to run with --command",
            path.display()
        ))
    })?;
    let read = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(read)?;
    let mut h = Sha256::new();
    let size = std::io::copy(file, &mut h).map_err(read)?;
    Ok(ImageArchive {
        path: path.to_path_buf(),
        config: ImageConfig {
            entrypoint: command,
            cmd: vec![],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: "/".into(),
            architecture: String::new(),
        },
        layers: vec![LayerBlob {
            sha256: hex::encode(h.finalize()),
            gzip,
            offset: 0,
            size,
        }],
    })
}
