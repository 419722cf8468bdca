//! Who may use what on the socket, by the peer's credentials (SO_PEERCRED).
//!
//! A connection is admitted once, at connect, and keeps its [`PeerGrant`]:
//! each request then costs one atomic load (has a reload changed the
//! rules?) and a string compare with the last tenant it asked about (a
//! hash lookup or prefix test only for another tenant). A SIGHUP that
//! changes the rules bumps the generation, and each connection recomputes
//! its grant at its next request; one no longer admitted is closed.
//!
//! Without `[[access]]` tables every peer may use every tenant, and the
//! admin ops are for `admin.allowed_uids`, as before the tables existed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{AccessRules, Config, Grant, TenantSet};
use crate::error::{Error, truncate};
use crate::stats::Stats;

/// A refusal is logged at most this often per peer uid; all are counted.
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct Access {
    current: ArcSwap<Rules>,
    /// Mirrors `current.generation`, so a request checks it with one load.
    generation: AtomicU64,
    /// When each peer uid's refusal was last logged.
    logged: Mutex<HashMap<Option<u32>, Instant>>,
    stats: Arc<Stats>,
}

/// One generation of the rules.
struct Rules {
    generation: u64,
    rules: Arc<AccessRules>,
    admin_uids: Vec<u32>,
}

/// The connected process's credentials (`None`: unreadable).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What one connection may do, as of one generation of the rules.
#[derive(Debug)]
pub struct PeerGrant {
    peer: Peer,
    generation: u64,
    grant: Grant,
    /// Decided by `[[access]]` tables (else by `admin.allowed_uids`).
    ruled: bool,
    /// The last tenant asked about, and the answer: a connection mostly
    /// sends one tenant's requests, so most cost one string compare instead
    /// of a hash and a prefix scan. A refresh (new rules) replaces the
    /// whole grant, this included.
    last: Option<(String, bool)>,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`.
    pub fn of(stream: &tokio::net::UnixStream) -> Peer {
        let cred = stream.peer_cred().ok();
        Peer {
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
        }
    }
}

impl PeerGrant {
    pub fn covers(&mut self, tenant: &str) -> bool {
        if self.grant.tenants.is_all() {
            return true;
        }
        if let Some((last, covered)) = &self.last
            && last == tenant
        {
            return *covered;
        }
        let covered = self.grant.tenants.covers(tenant);
        let (last, answer) = self.last.get_or_insert_with(|| (String::new(), false));
        last.clear();
        last.push_str(tenant);
        *answer = covered;
        covered
    }

    pub fn admin(&self) -> bool {
        self.grant.admin
    }
}

impl Access {
    pub fn new(config: &Config, stats: Arc<Stats>) -> Access {
        Access {
            current: ArcSwap::from_pointee(Rules::of(config, 0)),
            generation: AtomicU64::new(0),
            logged: Mutex::default(),
            stats,
        }
    }

    /// A reload's rules; open connections pick them up at their next request.
    pub fn reload(&self, config: &Config) {
        let generation = self.current.load().generation + 1;
        self.current.store(Arc::new(Rules::of(config, generation)));
        self.generation.store(generation, Ordering::Release);
    }

    /// Admits `peer` at connect, or refuses it (counted and logged).
    pub fn admit(&self, peer: Peer) -> Result<PeerGrant, Error> {
        self.current
            .load()
            .grant(peer)
            .ok_or_else(|| self.refuse_peer(peer))
    }

    /// Brings `grant` up to the current rules, if a reload changed them;
    /// an error if they no longer admit the peer.
    pub fn refresh(&self, grant: &mut PeerGrant) -> Result<(), Error> {
        if self.generation.load(Ordering::Acquire) == grant.generation {
            return Ok(());
        }
        *grant = self.admit(grant.peer)?;
        Ok(())
    }

    /// The refusal of a request for a tenant `grant` does not cover.
    pub fn refuse_tenant(&self, grant: &PeerGrant, tenant: &str) -> Error {
        Stats::add(&self.stats.counters.forbidden_tenant, 1);
        let why = format!(
            "tenant `{}` is not granted to {} by any `[[access]]` rule",
            truncate(tenant, 64),
            who(grant.peer)
        );
        self.log(grant.peer, &why);
        Error::Forbidden(why)
    }

    /// The refusal of admin op `op` to a peer without the admin grant.
    pub fn refuse_admin(&self, grant: &PeerGrant, op: &str) -> Error {
        Stats::add(&self.stats.counters.forbidden_admin, 1);
        let why = if grant.ruled {
            format!(
                "`{op}` needs an `[[access]]` rule with `admin = true` for {}",
                who(grant.peer)
            )
        } else {
            format!("`{op}` is for the users in `admin.allowed_uids` only")
        };
        self.log(grant.peer, &why);
        Error::Forbidden(why)
    }

    fn refuse_peer(&self, peer: Peer) -> Error {
        Stats::add(&self.stats.counters.forbidden_connect, 1);
        let why = format!("no `[[access]]` rule admits {}", who(peer));
        self.log(peer, &why);
        Error::Forbidden(why)
    }

    /// Logs a refusal unless this uid's last one was logged under a
    /// minute ago.
    fn log(&self, peer: Peer, why: &str) {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap();
        if logged
            .get(&peer.uid)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return;
        }
        // Uids not refused within the last minute need no entry.
        if logged.len() >= 1024 {
            logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        }
        logged.insert(peer.uid, now);
        drop(logged);
        tracing::warn!(
            "access: forbidden: {why} (refusals are counted in `stats` as forbidden_*; this uid's are logged at most once a minute)"
        );
    }
}

impl Rules {
    fn of(config: &Config, generation: u64) -> Rules {
        Rules {
            generation,
            rules: config.access.clone(),
            admin_uids: config.admin.allowed_uids.clone(),
        }
    }

    fn grant(&self, peer: Peer) -> Option<PeerGrant> {
        let ruled = self.rules.is_configured();
        let grant = if ruled {
            self.rules.grant(peer.uid?, peer.gid?)?
        } else {
            Grant {
                tenants: TenantSet::all(),
                admin: peer.uid.is_some_and(|uid| self.admin_uids.contains(&uid)),
            }
        };
        Some(PeerGrant {
            peer,
            generation: self.generation,
            grant,
            ruled,
            last: None,
        })
    }
}

fn who(peer: Peer) -> String {
    match (peer.uid, peer.gid) {
        (Some(uid), Some(gid)) => format!("uid {uid} (gid {gid})"),
        _ => "a peer whose credentials could not be read".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessConfig;

    /// A connection's grant answers a repeated tenant from its last answer
    /// (the slow lookup only for a different tenant), and the answers are
    /// the rules' answers whatever the order.
    #[test]
    fn a_grant_remembers_its_last_tenant() {
        let rules = AccessRules::compile(&[AccessConfig {
            uids: vec![7],
            gids: vec![],
            tenants: vec!["acme".into(), "p-*".into()],
            admin: false,
        }])
        .unwrap();
        let mut g = PeerGrant {
            peer: Peer {
                uid: Some(7),
                gid: Some(7),
            },
            generation: 0,
            grant: rules.grant(7, 7).unwrap(),
            ruled: true,
            last: None,
        };
        for (tenant, want) in [
            ("acme", true),
            ("acme", true),
            ("other", false),
            ("other", false),
            ("p-1", true),
            ("acme", true),
            ("acm", false),
        ] {
            assert_eq!(g.covers(tenant), want, "{tenant}");
            assert_eq!(g.last, Some((tenant.to_owned(), want)), "remembered");
        }
        // Every tenant covered: nothing to remember.
        g.grant.tenants = TenantSet::all();
        g.last = None;
        assert!(g.covers("x") && g.last.is_none());
    }
}
