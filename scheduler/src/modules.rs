//! The replicated module store: content-addressed module bytes, kept while the current
//! version of some live function refers to them, with a byte quota per tenant and one for the
//! cluster. Every replica holds all of it in memory, so what one tenant stores is bounded,
//! and what nobody runs any more is freed (and leaves the next snapshot).
//!
//! ```text
//!  deploy(tenant, sha, bytes) ─ check: cluster total, tenant quota (distinct modules it
//!                               refers to) ─▶ insert ─▶ reference(tenant, sha)
//!  new version / delete ──────▶ release(tenant, old sha) ─ last reference? ─▶ bytes freed
//! ```
//!
//! Part of the deterministic state machine: no clock, no I/O; ordered maps only.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::ApplyError;

/// Total module bytes the replicated state keeps (every replica holds all of them in memory).
pub const MAX_MODULES_TOTAL_BYTES: u64 = 1 << 30;
/// Module bytes one tenant's live functions may refer to (each distinct module counted once).
pub const MAX_TENANT_MODULE_BYTES: u64 = 128 << 20;

/// A module's content address.
pub type Sha = [u8; 32];

/// Content-addressed module bytes with their references (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ModuleStore {
    bytes: BTreeMap<Sha, Arc<[u8]>>,
    total: u64,
    /// Live function versions referring to each module.
    refs: BTreeMap<Sha, u32>,
    /// The same, per tenant (a module shared by two tenants counts against both).
    tenant_refs: BTreeMap<(String, Sha), u32>,
    /// Bytes of the distinct modules each tenant refers to.
    tenant_bytes: BTreeMap<String, u64>,
}

fn hex(sha: &Sha) -> String {
    hex::encode(sha)
}

impl ModuleStore {
    /// A stored module.
    pub fn get(&self, sha: &Sha) -> Option<Arc<[u8]>> {
        self.bytes.get(sha).cloned()
    }

    /// Whether a module is stored.
    pub fn contains(&self, sha: &Sha) -> bool {
        self.bytes.contains_key(sha)
    }

    /// Bytes stored in all.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes of the modules `tenant`'s live functions refer to.
    pub fn tenant_bytes(&self, tenant: &str) -> u64 {
        self.tenant_bytes.get(tenant).copied().unwrap_or(0)
    }

    /// Stored modules in content-address order (snapshots).
    pub fn iter(&self) -> impl Iterator<Item = (&Sha, &Arc<[u8]>)> {
        self.bytes.iter()
    }

    fn size(&self, sha: &Sha) -> u64 {
        self.bytes.get(sha).map_or(0, |b| b.len() as u64)
    }

    /// Whether `tenant` may make one of its functions refer to module `sha` (`len` bytes)
    /// instead of `replacing`: refused when the cluster's store or the tenant's quota would
    /// be exceeded. Changes nothing.
    pub fn check_reference(
        &self,
        tenant: &str,
        sha: &Sha,
        len: u64,
        replacing: Option<&Sha>,
    ) -> Result<(), ApplyError> {
        if !self.contains(sha) && self.total.saturating_add(len) > MAX_MODULES_TOTAL_BYTES {
            return Err(ApplyError::Limit(format!(
                "the cluster's module store is full ({} of {MAX_MODULES_TOTAL_BYTES} bytes); ask the operator, or delete unused functions",
                self.total
            )));
        }
        let mine = |s: &Sha| {
            self.tenant_refs
                .get(&(tenant.to_string(), *s))
                .copied()
                .unwrap_or(0)
        };
        if mine(sha) > 0 {
            return Ok(());
        }
        let mut after = self.tenant_bytes(tenant).saturating_add(len);
        if let Some(old) = replacing
            && old != sha
            && mine(old) == 1
        {
            after = after.saturating_sub(self.size(old));
        }
        if after > MAX_TENANT_MODULE_BYTES {
            return Err(ApplyError::Limit(format!(
                "tenant `{tenant}` would store {after} bytes of modules; its quota is {MAX_TENANT_MODULE_BYTES} (each distinct module of its live functions counted once): delete functions it no longer runs"
            )));
        }
        Ok(())
    }

    /// Stores `bytes` under `sha` if absent (the caller verified the hash).
    pub fn insert(&mut self, sha: Sha, bytes: Vec<u8>) {
        if !self.bytes.contains_key(&sha) {
            self.total += bytes.len() as u64;
            self.bytes.insert(sha, Arc::from(bytes));
        }
    }

    /// One more live function version of `tenant` refers to `sha`.
    pub fn reference(&mut self, tenant: &str, sha: &Sha) {
        *self.refs.entry(*sha).or_default() += 1;
        let n = self
            .tenant_refs
            .entry((tenant.to_string(), *sha))
            .or_default();
        *n += 1;
        if *n == 1 {
            let size = self.size(sha);
            *self.tenant_bytes.entry(tenant.to_string()).or_default() += size;
        }
    }

    /// One live function version of `tenant` no longer refers to `sha`; the module's bytes
    /// are freed with its last reference.
    pub fn release(&mut self, tenant: &str, sha: &Sha) {
        let size = self.size(sha);
        let key = (tenant.to_string(), *sha);
        if let Some(n) = self.tenant_refs.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.tenant_refs.remove(&key);
                if let Some(b) = self.tenant_bytes.get_mut(tenant) {
                    *b = b.saturating_sub(size);
                    if *b == 0 {
                        self.tenant_bytes.remove(tenant);
                    }
                }
            }
        }
        if let Some(n) = self.refs.get_mut(sha) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(sha);
                if self.bytes.remove(sha).is_some() {
                    self.total -= size;
                    tracing::debug!(module = %hex(sha), bytes = size, "module freed: no live function refers to it");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_live_while_referred_to_and_count_per_tenant() {
        let mut s = ModuleStore::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        s.insert(a, vec![0; 100]);
        s.reference("acme", &a);
        s.reference("acme", &a); // a second function, same module: counted once
        s.reference("globex", &a);
        assert_eq!(
            (s.tenant_bytes("acme"), s.tenant_bytes("globex")),
            (100, 100)
        );
        assert_eq!(s.total_bytes(), 100);
        s.release("acme", &a);
        assert_eq!(s.tenant_bytes("acme"), 100);
        s.release("acme", &a);
        assert_eq!(s.tenant_bytes("acme"), 0);
        assert!(s.contains(&a), "globex still runs it");
        s.release("globex", &a);
        assert!(!s.contains(&a));
        assert_eq!(s.total_bytes(), 0);
        // Quotas: a module over the tenant's quota is refused; replacing its own frees room.
        s.insert(b, vec![0; (MAX_TENANT_MODULE_BYTES - 10) as usize]);
        s.reference("acme", &b);
        assert!(s.check_reference("acme", &a, 20, None).is_err());
        assert!(s.check_reference("acme", &a, 20, Some(&b)).is_ok());
        assert!(s.check_reference("globex", &a, 20, None).is_ok());
        // What a tenant already refers to costs nothing more.
        assert!(s.check_reference("acme", &b, 1 << 40, None).is_ok());
    }
}
