//! A deployed container function's call on a worker: the assignment's image and limits and
//! the invocation's input become a [`ContainerCall`] run on the cached layers; the output is
//! collected (the runtime caps it) for the result the gateway gets.
//!
//! ```text
//!  Assignment.image + limits ─▶ ImageConfig, ContainerLimits
//!  Invocation (args, env, stdin) ─▶ run_cached ─▶ stdout/stderr buffers + ContainerOutcome
//! ```

use stellar_proto::limits::{DEFAULT_PIDS, MAX_OUTPUT_BYTES};
use stellar_proto::v1 as pb;

use super::image::ImageConfig;
use super::run::{
    ContainerCall, ContainerLimits, ContainerOutcome, ContainerRuntime, OutputStream,
};
use crate::sandbox::InvocationLimits;

/// What the image says to run, from the deployed description.
pub fn image_config(i: &pb::ContainerImage) -> ImageConfig {
    ImageConfig {
        entrypoint: i.entrypoint.clone(),
        cmd: i.cmd.clone(),
        env: i.env.clone(),
        working_dir: i.working_dir.clone(),
        architecture: i.arch.clone(),
    }
}

/// A call's limits from the function's (the same defaults and clamps as for wasm).
pub fn limits(l: &pb::FunctionLimits) -> ContainerLimits {
    let wasm = InvocationLimits::from_spec(l);
    let defaults = ContainerLimits::default();
    ContainerLimits {
        memory_bytes: wasm.memory_bytes,
        timeout: wasm.timeout,
        pids: u64::from(if l.pids == 0 { DEFAULT_PIDS } else { l.pids }),
        cpu_millis: if l.cpu_millis == 0 {
            defaults.cpu_millis
        } else {
            u64::from(l.cpu_millis)
        },
        max_output_bytes: wasm.max_output_bytes.min(u64::from(MAX_OUTPUT_BYTES)),
        ..defaults
    }
}

/// One call's output and outcome.
#[derive(Debug)]
pub struct CallOutput {
    /// What the program wrote to stdout (at most the limit).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (at most the limit).
    pub stderr: Vec<u8>,
    /// How it ended and what it used.
    pub outcome: ContainerOutcome,
}

/// Runs one call of a deployed container function whose layers are cached.
pub async fn invoke(
    runtime: &ContainerRuntime,
    image: &pb::ContainerImage,
    function_limits: &pb::FunctionLimits,
    call: ContainerCall,
) -> CallOutput {
    let config = image_config(image);
    let layers: Vec<String> = image.layers.iter().map(|l| l.sha256.clone()).collect();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut sink = |s: OutputStream, d: &[u8]| match s {
        OutputStream::Stdout => stdout.extend_from_slice(d),
        OutputStream::Stderr => stderr.extend_from_slice(d),
    };
    let call = ContainerCall {
        limits: limits(function_limits),
        ..call
    };
    let outcome = runtime.run_cached(&config, &layers, call, &mut sink).await;
    CallOutput {
        stdout,
        stderr,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_take_the_functions_with_the_same_defaults_as_wasm() {
        let l = limits(&pb::FunctionLimits {
            memory_mib: 32,
            timeout_ms: 1500,
            cpu_millis: 250,
            pids: 8,
            max_output_bytes: u32::MAX,
            ..Default::default()
        });
        assert_eq!(l.memory_bytes, 32 << 20);
        assert_eq!(l.timeout, Duration::from_millis(1500));
        assert_eq!((l.pids, l.cpu_millis), (8, 250));
        assert_eq!(l.max_output_bytes, u64::from(MAX_OUTPUT_BYTES));
        let d = limits(&pb::FunctionLimits::default());
        assert_eq!(d.pids, u64::from(DEFAULT_PIDS));
        assert_eq!(d.max_output_bytes, 1 << 20);
    }
}
