//! The node model: what a home node declares and what placement filters and scores on.

use std::fmt;
use std::str::FromStr;

use crate::vivaldi::Coordinate;

/// Stable identity of a home node (the control plane derives it from the worker's public key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// CPU architecture, because containers are arch-specific while wasm is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Arch {
    /// PCs and mini-PCs.
    X86_64 = 0,
    /// Modern set-top boxes, NAS, single-board computers.
    Aarch64 = 1,
    /// Older 32-bit ARM boxes.
    Armv7 = 2,
}

impl Arch {
    /// Every architecture, in declaration order.
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::Armv7];

    /// The name used in specs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the model's enumerated values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`; expected one of: {expected}")]
pub struct ParseNameError {
    /// What kind of name was being parsed.
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted names, comma-separated.
    pub expected: &'static str,
}

impl FromStr for Arch {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "armv7" | "arm" => Ok(Arch::Armv7),
            _ => Err(ParseNameError {
                what: "arch",
                value: s.to_owned(),
                expected: "x86_64, aarch64, armv7",
            }),
        }
    }
}

/// A set of architectures a workload accepts; empty never matches, `ANY` matches all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArchSet(u8);

impl ArchSet {
    /// Every architecture (what a wasm function accepts).
    pub const ANY: ArchSet = ArchSet(0b111);

    /// Exactly one architecture (what a container image built for it accepts).
    pub fn only(arch: Arch) -> Self {
        ArchSet(1 << arch as u8)
    }

    /// This set plus `arch`.
    pub fn with(self, arch: Arch) -> Self {
        ArchSet(self.0 | 1 << arch as u8)
    }

    /// Whether `arch` is accepted.
    pub fn contains(self, arch: Arch) -> bool {
        self.0 & (1 << arch as u8) != 0
    }
}

impl Default for ArchSet {
    fn default() -> Self {
        ArchSet::ANY
    }
}

/// A sandbox kind a worker can run, because not every box can run containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Runtime {
    /// WebAssembly (wasmtime + WASI).
    Wasm = 0,
    /// Linux container (namespaces + cgroups).
    Container = 1,
}

impl Runtime {
    /// The name used in specs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Container => "container",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Runtime {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wasm" => Ok(Runtime::Wasm),
            "container" => Ok(Runtime::Container),
            _ => Err(ParseNameError {
                what: "runtime",
                value: s.to_owned(),
                expected: "wasm, container",
            }),
        }
    }
}

/// The runtimes a node offers, as a bit set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuntimeSet(u8);

impl RuntimeSet {
    /// No runtime at all (such a node can never be chosen).
    pub const NONE: RuntimeSet = RuntimeSet(0);
    /// Only WebAssembly.
    pub const WASM: RuntimeSet = RuntimeSet(1);
    /// WebAssembly and containers.
    pub const WASM_AND_CONTAINER: RuntimeSet = RuntimeSet(0b11);

    /// This set plus `runtime`.
    pub fn with(self, runtime: Runtime) -> Self {
        RuntimeSet(self.0 | 1 << runtime as u8)
    }

    /// Whether `runtime` is offered.
    pub fn contains(self, runtime: Runtime) -> bool {
        self.0 & (1 << runtime as u8) != 0
    }
}

/// Lifecycle state of a node; only `Ready` nodes take new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NodeState {
    /// Heartbeating and accepting work.
    Ready = 0,
    /// Finishing its work, taking no new work (owner is reclaiming the box).
    Draining = 1,
    /// Missed its heartbeats.
    Down = 2,
    /// Failed usage verification or misbehaved; kept out until cleared.
    Quarantined = 3,
}

impl NodeState {
    pub(crate) fn from_u8(v: u8) -> Option<NodeState> {
        match v {
            0 => Some(NodeState::Ready),
            1 => Some(NodeState::Draining),
            2 => Some(NodeState::Down),
            3 => Some(NodeState::Quarantined),
            _ => None,
        }
    }

    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
            NodeState::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Integer resource amounts, so reservations add and subtract exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk in MiB.
    pub disk_mib: u32,
}

impl Resources {
    /// Builds an amount from its three parts.
    pub const fn new(cpu_millis: u32, memory_mib: u32, disk_mib: u32) -> Self {
        Resources {
            cpu_millis,
            memory_mib,
            disk_mib,
        }
    }

    /// Whether `self` fits into `free` on every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millis <= free.cpu_millis
            && self.memory_mib <= free.memory_mib
            && self.disk_mib <= free.disk_mib
    }

    /// `self` minus `other`, or `None` if any dimension would go negative.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millis: self.cpu_millis.checked_sub(other.cpu_millis)?,
            memory_mib: self.memory_mib.checked_sub(other.memory_mib)?,
            disk_mib: self.disk_mib.checked_sub(other.disk_mib)?,
        })
    }

    /// `self` plus `other`, each dimension capped at `cap`.
    pub fn add_capped(&self, other: &Resources, cap: &Resources) -> Resources {
        Resources {
            cpu_millis: self
                .cpu_millis
                .saturating_add(other.cpu_millis)
                .min(cap.cpu_millis),
            memory_mib: self
                .memory_mib
                .saturating_add(other.memory_mib)
                .min(cap.memory_mib),
            disk_mib: self
                .disk_mib
                .saturating_add(other.disk_mib)
                .min(cap.disk_mib),
        }
    }
}

/// The home link's bandwidth; residential uplinks are the scarce direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bandwidth {
    /// Upload rate in kbit/s.
    pub uplink_kbps: u32,
    /// Download rate in kbit/s.
    pub downlink_kbps: u32,
}

/// Everything a node declares when it joins the table.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSpec {
    /// Stable identity.
    pub id: NodeId,
    /// Region name, e.g. `cn-east`.
    pub region: String,
    /// Zone name within the region, e.g. `shanghai`.
    pub zone: String,
    /// CPU architecture.
    pub arch: Arch,
    /// Sandboxes the worker offers.
    pub runtimes: RuntimeSet,
    /// Total capacity the owner lends.
    pub capacity: Resources,
    /// Capacity free right now (at most `capacity`).
    pub free: Resources,
    /// Home link bandwidth.
    pub bandwidth: Bandwidth,
    /// Reputation in [0, 1] from verified usage and uptime history.
    pub reputation: f32,
    /// Free-form `key=value` labels (ISP, storage kind, ...).
    pub labels: Vec<(String, String)>,
    /// Current Vivaldi coordinate estimate.
    pub coordinate: Coordinate,
    /// Lifecycle state.
    pub state: NodeState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_set_membership() {
        let s = ArchSet::only(Arch::Aarch64);
        assert!(s.contains(Arch::Aarch64));
        assert!(!s.contains(Arch::X86_64));
        assert!(s.with(Arch::X86_64).contains(Arch::X86_64));
        assert!(Arch::ALL.iter().all(|a| ArchSet::ANY.contains(*a)));
    }

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for a in Arch::ALL {
            assert_eq!(a.as_str().parse::<Arch>().unwrap(), a);
        }
        let err = "sparc".parse::<Arch>().unwrap_err();
        assert!(err.to_string().contains("sparc"));
        assert_eq!("container".parse::<Runtime>().unwrap(), Runtime::Container);
        assert!("vm".parse::<Runtime>().is_err());
    }

    #[test]
    fn resources_arithmetic_never_wraps() {
        let cap = Resources::new(1000, 512, 10);
        let used = Resources::new(600, 100, 0);
        let free = cap.checked_sub(&used).unwrap();
        assert_eq!(free, Resources::new(400, 412, 10));
        assert!(free.checked_sub(&cap).is_none());
        assert_eq!(free.add_capped(&cap, &cap), cap);
        assert!(used.fits_in(&cap));
        assert!(!cap.fits_in(&used));
    }
}
