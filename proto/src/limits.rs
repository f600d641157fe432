//! The API's size limits and the ranges of a function's limits: one place, so the control
//! plane that refuses, the worker that clamps and the clients that check before sending all
//! agree (and the proto docs can point here).

use crate::v1::{ContainerImage, FunctionLimits};

/// Largest module, bytes: a home node downloads it over a residential link.
pub const MAX_MODULE_BYTES: usize = 16 << 20;
/// Largest stdin of one invocation, bytes.
pub const MAX_INVOKE_INPUT: usize = 8 << 20;
/// Largest stdout, and largest stderr, one invocation may return, bytes: both travel back in
/// one message on the worker's stream and in the caller's answer, which must stay under
/// [`MAX_MESSAGE_BYTES`]. Workers clamp any larger limit to this.
pub const MAX_OUTPUT_BYTES: u32 = 8 << 20;
/// Largest gRPC message a role accepts: a module upload (or a result with both outputs at
/// their cap) plus its envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_MODULE_BYTES + (1 << 20);
/// Largest memory limit per instance, MiB.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Largest CPU reservation per instance, millicores (64 cores).
pub const MAX_CPU_MILLIS: u32 = 64_000;
/// Longest per-invocation deadline, ms (15 minutes).
pub const MAX_TIMEOUT_MS: u32 = 15 * 60 * 1000;

/// Most layers an image may have: overlayfs takes them as one mount option string, which
/// the kernel bounds at a page.
pub const MAX_IMAGE_LAYERS: usize = 40;
/// Largest image, bytes of all its layers: a home node fetches it over a residential link.
pub const MAX_IMAGE_BYTES: u64 = 4 << 30;
/// Most processes a container function may run at once.
pub const MAX_PIDS: u32 = 4096;
/// Container functions' process limit when the deploy gives none.
pub const DEFAULT_PIDS: u32 = 64;
/// A container's private writable layer, MiB: the most a call writes outside `/tmp`, and
/// what each replica reserves on its node's disk beside its image's layers.
pub const CONTAINER_SCRATCH_MIB: u32 = 256;

/// Disk a container replica reserves on its node, MiB: its image's layers (unpacked once
/// per node, counted per replica to stay on the safe side) and its writable layer.
pub fn container_disk_mib(i: &ContainerImage) -> u32 {
    let bytes: u64 = i.layers.iter().map(|l| l.size).sum();
    (bytes.div_ceil(1 << 20) + u64::from(CONTAINER_SCRATCH_MIB)).min(u64::from(u32::MAX)) as u32
}

/// The node archs an image may name (the placement's names; OCI's `amd64`/`arm64`/`arm` map to them).
pub const ARCHS: [&str; 3] = ["x86_64", "aarch64", "armv7"];

/// The placement arch for an OCI architecture name (`amd64` -> `x86_64`), or None if no
/// node kind runs it.
pub fn node_arch(oci: &str) -> Option<&'static str> {
    match oci {
        "amd64" | "x86_64" => Some("x86_64"),
        "arm64" | "aarch64" => Some("aarch64"),
        "arm" | "armv7" => Some("armv7"),
        _ => None,
    }
}

/// Checks a container image's description before anything stores or places it: layer
/// addresses, counts and sizes, a program to run and a known arch. The error says which.
pub fn check_image(i: &ContainerImage) -> Result<(), String> {
    if i.layers.is_empty() || i.layers.len() > MAX_IMAGE_LAYERS {
        return Err(format!(
            "image has {} layers; 1..={MAX_IMAGE_LAYERS} are allowed",
            i.layers.len()
        ));
    }
    let mut total = 0u64;
    for l in &i.layers {
        if !is_sha256_hex(&l.sha256) {
            return Err(format!(
                "image layer `{}` is not a lowercase hex sha256",
                l.sha256.chars().take(80).collect::<String>()
            ));
        }
        total = total.saturating_add(l.size);
    }
    if total > MAX_IMAGE_BYTES {
        return Err(format!(
            "image layers are {total} bytes; the limit is {MAX_IMAGE_BYTES}"
        ));
    }
    if i.entrypoint.is_empty() && i.cmd.is_empty() {
        return Err("image has no ENTRYPOINT or CMD; give a command to run".into());
    }
    if let Some(kv) = i.env.iter().find(|kv| !kv.contains('=')) {
        return Err(format!("image env entry `{kv}` is not KEY=VALUE"));
    }
    if !ARCHS.contains(&i.arch.as_str()) {
        return Err(format!(
            "image arch `{}` is not one nodes run (one of {})",
            i.arch,
            ARCHS.join(", ")
        ));
    }
    let strings = i.entrypoint.iter().chain(&i.cmd).chain(&i.env);
    let bytes: usize = strings.clone().map(String::len).sum::<usize>() + i.working_dir.len();
    if bytes > 64 << 10 {
        return Err(format!(
            "image command, env and working dir are {bytes} bytes; the limit is 64 KiB"
        ));
    }
    Ok(())
}

/// Whether `s` is a sha256 in lowercase hex (how blobs are named everywhere).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a function's limits were refused: the field, its allowed range and the value given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    /// The `FunctionLimits` field at fault.
    pub field: &'static str,
    /// What is allowed, in words.
    pub allowed: String,
    /// What was given.
    pub got: u64,
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limits.{} must be {}, got {}",
            self.field, self.allowed, self.got
        )
    }
}

impl std::error::Error for LimitError {}

/// Checks every field of a deploy's limits against its documented range (0 means "the
/// default" only where the proto says so: fuel and max_output_bytes).
pub fn check_function_limits(l: &FunctionLimits) -> Result<(), LimitError> {
    // (field, value, lowest, highest, unit)
    let checks: [(&'static str, u32, u32, u32, &str); 5] = [
        ("memory_mib", l.memory_mib, 1, MAX_MEMORY_MIB, "MiB"),
        (
            "cpu_millis",
            l.cpu_millis,
            1,
            MAX_CPU_MILLIS,
            "millicores (1000 = one core)",
        ),
        ("timeout_ms", l.timeout_ms, 1, MAX_TIMEOUT_MS, "ms"),
        (
            "max_output_bytes",
            l.max_output_bytes,
            0,
            MAX_OUTPUT_BYTES,
            "bytes (0 = 1 MiB)",
        ),
        ("pids", l.pids, 0, MAX_PIDS, "processes (0 = 64)"),
    ];
    for (field, got, lo, hi, unit) in checks {
        if !(lo..=hi).contains(&got) {
            return Err(LimitError {
                field,
                allowed: format!("{lo}..={hi} {unit}"),
                got: u64::from(got),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> FunctionLimits {
        FunctionLimits {
            cpu_millis: 100,
            memory_mib: 64,
            timeout_ms: 1000,
            ..Default::default()
        }
    }

    fn image() -> ContainerImage {
        ContainerImage {
            layers: vec![crate::v1::ImageLayer {
                sha256: "ab".repeat(32),
                size: 10,
                gzip: false,
            }],
            cmd: vec!["/bin/true".into()],
            arch: "x86_64".into(),
            ..Default::default()
        }
    }

    #[test]
    fn images_are_checked_field_by_field() {
        assert_eq!(check_image(&image()), Ok(()));
        type Spoil = fn(&mut ContainerImage);
        let cases: [(&str, Spoil); 7] = [
            ("layers", |i| i.layers.clear()),
            ("hex sha256", |i| i.layers[0].sha256 = "AB".repeat(32)),
            ("hex sha256", |i| i.layers[0].sha256 = "../etc".into()),
            ("bytes", |i| i.layers[0].size = MAX_IMAGE_BYTES + 1),
            ("ENTRYPOINT", |i| i.cmd.clear()),
            ("KEY=VALUE", |i| i.env.push("NOEQUALS".into())),
            ("arch", |i| i.arch = "s390x".into()),
        ];
        for (word, spoil) in cases {
            let mut i = image();
            spoil(&mut i);
            let e = check_image(&i).unwrap_err();
            assert!(e.contains(word), "{word}: {e}");
        }
        assert_eq!(node_arch("amd64"), Some("x86_64"));
        assert_eq!(node_arch("riscv64"), None);
    }

    #[test]
    fn every_field_is_checked_and_named() {
        assert_eq!(check_function_limits(&ok()), Ok(()));
        type Spoil = fn(&mut FunctionLimits);
        let cases: [(&str, Spoil); 6] = [
            ("memory_mib", |l| l.memory_mib = 65_537),
            ("memory_mib", |l| l.memory_mib = 0),
            ("cpu_millis", |l| l.cpu_millis = 64_001),
            ("cpu_millis", |l| l.cpu_millis = 0),
            ("timeout_ms", |l| l.timeout_ms = 0),
            ("max_output_bytes", |l| l.max_output_bytes = u32::MAX),
        ];
        for (field, spoil) in cases {
            let mut l = ok();
            spoil(&mut l);
            let e = check_function_limits(&l).unwrap_err();
            assert_eq!(e.field, field);
            assert!(
                e.to_string()
                    .starts_with(&format!("limits.{field} must be")),
                "{e}"
            );
        }
    }
}
