//! StellarCloud's control plane: a Raft-replicated state machine (tikv's raft-rs on
//! raft-engine storage) that places functions on home nodes with stellar-placement and serves
//! the `Control`, `Edge` and `Raft` gRPC services. Workers and invocations are the gateways'
//! (stellar-gateway); this crate sees gateways only.
//!
//! ```text
//!  Control (service) ──▶ replica thread ──▶ Replica (replica) ──▶ RawNode + DiskStorage
//!   │ auth: bearer token ─▶ tenant              │ apply ──▶ StateMachine (state) ─▶ changes
//!  Edge (edge) ─ Watch ◀── changes (ring)       └ leader ──▶ LeaderState (placement)
//!              ─ Session ─▶ liveness (gateway reports → transitions)
//! ```

pub mod auth;
pub mod blob_backend;
pub mod blob_transfer;
pub mod blobs;
pub mod changes;
pub mod edge;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod job_driver;
pub mod job_status;
pub mod leader;
pub mod liveness;
pub mod logger;
pub mod modules;
pub mod object_blobs;
pub mod pricing;
pub mod replica;
pub mod replica_thread;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod transport;
pub mod usage_audit;

pub use error::{ApplyError, Error, Result};
pub use replica::{Output, Query, Replica, ReplicaConfig, Reply, Request};
pub use state::StateMachine;
