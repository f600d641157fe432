//! StellarCloud's load tools: the million-node placement simulator and, as the control plane
//! and workers arrive, cluster load generators and benchmarks. See the crate README.

pub mod alloc;
pub mod baselines;
#[cfg(target_os = "linux")]
pub mod containerbench;
pub mod edgebench;
pub mod invokebench;
pub mod jobsim;
pub mod procs;
pub mod raftbench;
pub mod sim;
pub mod simworkers;
pub mod transcodebench;
pub mod trustbench;
pub mod trustsim;
pub mod wasmbench;
pub mod workload;
pub mod world;
