//! StellarCloud's control plane: a Raft-replicated state machine (tikv's raft-rs on
//! raft-engine storage) that places functions on home nodes with stellar-placement and serves
//! the `Control`, `Agent` and `Raft` gRPC services.
//!
//! ```text
//!  gRPC (service) ──▶ driver thread (node) ──▶ Replica (replica) ──▶ RawNode + DiskStorage
//!   │ auth: bearer token ─▶ tenant               │ apply ──▶ StateMachine (state)
//!   │                                            └ leader ──▶ LeaderState (placement, liveness)
//!  HTTP (http) ─┴▶ Gateway (gateway) ──▶ WorkerHub (workers) ◀── workers' Agent streams
//!                      └ usage records ──▶ UsageWriter (usage) ──▶ Raft
//! ```

pub mod allocation_states;
pub mod auth;
pub mod batching;
pub mod client;
pub mod clock;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod leader;
pub mod logger;
pub mod modules;
pub mod node;
pub mod pricing;
pub mod replica;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod transport;
pub mod usage;
pub mod workers;

pub use error::{ApplyError, Error, Result};
pub use replica::{Output, Query, Replica, ReplicaConfig, Reply, Request};
pub use state::StateMachine;
