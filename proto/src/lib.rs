//! StellarCloud's wire and storage formats: the `Control`, `Agent`, `Edge` and `Raft` gRPC
//! services and the replicated-state messages, generated from `proto/stellar/v1/*.proto`,
//! with the leader-following client and the conventions every role shares.
//!
//! One crate so the control plane, the gateways, the workers, the CLI and the load tools
//! agree on every byte.

/// Version 1 of the API and of the replicated state encoding.
pub mod v1 {
    #![allow(missing_docs, clippy::all, unused_qualifications)]
    tonic::include_proto!("stellar.v1");
}

/// The API's descriptors (`FileDescriptorSet`, with every comment): what gRPC reflection
/// serves and what the check that every element is documented reads.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stellar_descriptors.bin"));

pub mod client;
pub mod clock;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod job_spec;
pub mod limits;
pub mod merkle;
pub mod module_check;
pub mod receipts;
pub mod text;
pub mod tokens;
pub mod transcode;
pub mod wire;
