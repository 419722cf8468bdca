//! `[admin]`: who may use the admin ops.

use serde::Deserialize;

/// `[admin]`: who may use the admin ops (`tenant_*`) on the socket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix user ids allowed, checked against the peer's credentials
    /// (SO_PEERCRED). Default: the user quotad runs as, and root.
    pub allowed_uids: Vec<u32>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        AdminConfig {
            allowed_uids: if me == 0 { vec![0] } else { vec![me, 0] },
        }
    }
}
