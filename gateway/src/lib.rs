//! StellarCloud's edge: a stateless gateway that holds home nodes' worker streams and serves
//! invocations, so a million live workers never touch the Raft leader. Any number of them run
//! side by side; each follows the control plane's committed changes (`Edge.Watch`) and tells
//! the leader only what changed among its workers (`Edge.Session`).
//!
//! ```text
//!  client ─Control/HTTP─▶ control / http ─▶ router ─▶ hub ─Invocation─▶ worker (agent)
//!                           │ the rest ─▶ replicas     └ none here ─▶ the gateway holding one
//!  worker ─Agent.Attach──▶ agent ─ joined/down/draining ─▶ session ─▶ leader (soft state)
//!                                ─ usage ─▶ usage writer ─▶ leader (Raft) ─▶ UsageAck
//!  replicas ─Edge.Watch──▶ watcher ─▶ view (functions, allocations, nodes, tokens)
//!                                       └▶ reconcile: assignments to the affected workers
//! ```

pub mod agent;
pub mod allocation_states;
pub mod auth;
pub mod balance;
pub mod batching;
pub mod blob_relay;
pub mod challenge;
pub mod checks;
pub mod control;
pub mod coordinates;
pub mod error;
#[cfg(feature = "harness")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod hub;
pub mod modules;
pub mod receipts;
pub mod router;
pub mod server;
pub mod session;
pub mod task_relay;
pub mod usage;
pub mod view;
pub mod watcher;

pub use error::{Error, GatewayError};
pub use server::{GatewayConfig, serve};
