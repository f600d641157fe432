//! StellarCloud's wire and storage formats: the `Control`, `Agent` and `Raft` gRPC services
//! and the replicated-state messages, generated from `proto/stellar/v1/*.proto`.
//!
//! One crate so the scheduler, the worker, the CLI and the load tools agree on every byte.

/// Version 1 of the API and of the replicated state encoding.
pub mod v1 {
    #![allow(missing_docs, clippy::all, unused_qualifications)]
    tonic::include_proto!("stellar.v1");
}

pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod limits;
pub mod module_check;
