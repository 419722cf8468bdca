//! Every Redis key name (and the one pub/sub channel) quotad uses, built
//! here and nowhere else: the Lua scripts receive theirs as KEYS.
//!
//! Every key a tenant's request can touch carries `{<tenant>}` as its hash
//! tag, so one tenant's keys share one Cluster slot and no tenant or key
//! string can reach outside its own namespace. Rule state lives under
//! `<prefix>:{<tenant>}:`; cache entries, their locks and their tags under
//! `<prefix>:<c|f|r|g>:{<tenant>}:`, so that every entry, and nothing else,
//! starts with [`Keys::entry_prefix`]: the near cache's tracking connection
//! hears of changes to entries by that prefix (`CLIENT TRACKING BCAST`), and
//! a prefix that also matched rule state would bring it a message per check. Tenants' records (the `redis`
//! quota source) and the quota cache live under `<prefix>:tenant:{<tenant>}`
//! and `<prefix>:tenant_quota_cache:{<tenant>}`, their own slot per tenant.
//!
//! Tenant and key strings are percent-encoded: every byte outside a small
//! safe set (so `:`, `{`, `}`, `%`, spaces, control and non-ASCII bytes)
//! becomes `%XX`. The encoding is injective and the components in between
//! (prefix, policy and rule names) are validated identifiers, so two
//! different (tenant, policy, rule, key) tuples never share a key, and a
//! brace in a tenant string can never move the hash tag.

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "qd";

/// Builds the Redis key names for one configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// `<prefix>:{<tenant>}:l:<policy>:<rule>:<key>`: one rule's state.
    pub fn rule(&self, tenant: &str, policy: &str, rule: &str, key: &str) -> String {
        self.per_rule(tenant, "l", policy, rule, key)
    }

    /// `<prefix>:{<tenant>}:n:<policy>:<rule>:<key>`: the leases of one
    /// concurrency rule (a sorted set, where other rules keep a string:
    /// its own letter, so a rule that changes kind on a reload never meets
    /// a key of the wrong type).
    pub fn leases(&self, tenant: &str, policy: &str, rule: &str, key: &str) -> String {
        self.per_rule(tenant, "n", policy, rule, key)
    }

    /// `<prefix>:{<tenant>}:<letter>:<policy>:<rule>:<key>`.
    fn per_rule(&self, tenant: &str, letter: &str, policy: &str, rule: &str, key: &str) -> String {
        let mut out = String::with_capacity(
            self.prefix.len() + tenant.len() + policy.len() + rule.len() + key.len() + 12,
        );
        self.write_per_rule(&mut out, tenant, letter, policy, rule, key);
        out
    }

    /// Appends [`Keys::rule`]'s name to `out`, for a caller that packs
    /// many names in one buffer.
    pub fn write_rule(&self, out: &mut String, tenant: &str, policy: &str, rule: &str, key: &str) {
        self.write_per_rule(out, tenant, "l", policy, rule, key);
    }

    /// Appends [`Keys::leases`]' name to `out`.
    pub fn write_leases(
        &self,
        out: &mut String,
        tenant: &str,
        policy: &str,
        rule: &str,
        key: &str,
    ) {
        self.write_per_rule(out, tenant, "n", policy, rule, key);
    }

    fn write_per_rule(
        &self,
        out: &mut String,
        tenant: &str,
        letter: &str,
        policy: &str,
        rule: &str,
        key: &str,
    ) {
        self.write_start(out, tenant, letter);
        out.push_str(policy);
        out.push(':');
        out.push_str(rule);
        out.push(':');
        encode_into(out, key);
    }

    /// `<prefix>:c:{<tenant>}:<key>`: a cache entry.
    pub fn entry(&self, tenant: &str, key: &str) -> String {
        self.cache_named("c", tenant, key)
    }

    /// `<prefix>:c:{`: what every cache entry's name, and no other key's,
    /// starts with (a prefix is an identifier: no `:` or braces in it).
    pub fn entry_prefix(&self) -> String {
        format!("{}:c:{{", self.prefix)
    }

    /// `<prefix>:f:{<tenant>}:<key>`: the fill lock of a cache entry.
    pub fn fill_lock(&self, tenant: &str, key: &str) -> String {
        self.cache_named("f", tenant, key)
    }

    /// `<prefix>:r:{<tenant>}:<key>`: the refresh lock of a cache entry.
    pub fn refresh_lock(&self, tenant: &str, key: &str) -> String {
        self.cache_named("r", tenant, key)
    }

    /// `<prefix>:<kind>:{<tenant>}:<name>`.
    fn cache_named(&self, kind: &str, tenant: &str, name: &str) -> String {
        let mut out =
            String::with_capacity(self.prefix.len() + kind.len() + tenant.len() + name.len() + 6);
        out.push_str(&self.prefix);
        out.push(':');
        out.push_str(kind);
        out.push_str(":{");
        encode_into(&mut out, tenant);
        out.push_str("}:");
        encode_into(&mut out, name);
        out
    }

    /// `<prefix>:g:{<tenant>}:<tag>`: the entries carrying a tag. With the
    /// entries, not under `<prefix>:{<tenant>}:t:` where quotad kept them
    /// before the near cache: a tag set then held entry names of the
    /// older layout only, which older quotads still read during a rolling
    /// upgrade (and their scripts fail on a name of another layout).
    pub fn tag(&self, tenant: &str, tag: &str) -> String {
        self.cache_named("g", tenant, tag)
    }

    /// `<prefix>:tenant:{<tenant>}`: a tenant's record (`redis` source).
    pub fn tenant_record(&self, tenant: &str) -> String {
        self.tenant_scoped("tenant", tenant)
    }

    /// `<prefix>:tenant_quota_cache:{<tenant>}`: a tenant's record in the
    /// Redis level of the quota cache.
    pub fn tenant_quota_cache(&self, tenant: &str) -> String {
        self.tenant_scoped("tenant_quota_cache", tenant)
    }

    /// `<prefix>:tenants`: the set of tenants with a record.
    pub fn tenant_index(&self) -> String {
        format!("{}:tenants", self.prefix)
    }

    /// `<prefix>:tenant-changes`: the channel announcing record changes.
    pub fn tenant_changes(&self) -> String {
        format!("{}:tenant-changes", self.prefix)
    }

    /// The parts of a cache entry's name that name its fill and refresh
    /// locks instead: the script, which finds entries through a tag at run
    /// time, swaps the first `entry` for `fill` or `refresh` to reach their
    /// locks (the first `{` of a name is its hash tag's: a prefix has none).
    pub fn lock_markers() -> LockMarkers {
        LockMarkers {
            entry: ":c:{",
            fill: ":f:{",
            refresh: ":r:{",
        }
    }

    fn tenant_scoped(&self, kind: &str, tenant: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + kind.len() + tenant.len() + 4);
        out.push_str(&self.prefix);
        out.push(':');
        out.push_str(kind);
        out.push_str(":{");
        encode_into(&mut out, tenant);
        out.push('}');
        out
    }

    /// Appends `<prefix>:{<tenant>}:<kind>:`.
    fn write_start(&self, out: &mut String, tenant: &str, kind: &str) {
        out.push_str(&self.prefix);
        out.push_str(":{");
        encode_into(out, tenant);
        out.push_str("}:");
        out.push_str(kind);
        out.push(':');
    }
}

/// See [`Keys::lock_markers`].
#[derive(Debug, Clone, Copy)]
pub struct LockMarkers {
    pub entry: &'static str,
    pub fill: &'static str,
    pub refresh: &'static str,
}

/// A tenant, key or tag string as it appears inside key names.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(&mut out, s);
    out
}

/// The Redis Cluster slot of every key of `tenant` (CRC16 of its hash tag,
/// the encoded tenant, computed without building it).
pub fn slot(tenant: &str) -> u16 {
    let mut crc = 0;
    for &b in tenant.as_bytes() {
        if is_safe(b) {
            crc = crc16_byte(crc, b);
        } else {
            let [hi, lo] = hex(b);
            crc = crc16_byte(crc16_byte(crc16_byte(crc, b'%'), hi), lo);
        }
    }
    crc % 16384
}

/// Upper-case hex digits of a byte.
fn hex(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]]
}

fn is_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~@+=/!,;".contains(&b)
}

fn encode_into(out: &mut String, s: &str) {
    // The common case, a string with nothing to encode, in one copy.
    if s.bytes().all(is_safe) {
        return out.push_str(s);
    }
    for &b in s.as_bytes() {
        if is_safe(b) {
            out.push(b as char);
        } else {
            let [hi, lo] = hex(b);
            out.extend(['%', hi as char, lo as char]);
        }
    }
}

/// One byte of CRC16-CCITT (XMODEM), the checksum Redis Cluster uses.
fn crc16_byte(mut crc: u16, b: u8) -> u16 {
    crc ^= (b as u16) << 8;
    for _ in 0..8 {
        crc = if crc & 0x8000 != 0 {
            (crc << 1) ^ 0x1021
        } else {
            crc << 1
        };
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis_cluster_spec() {
        // The reference value from the Redis Cluster specification.
        assert_eq!(
            b"123456789".iter().fold(0, |c, &b| crc16_byte(c, b)),
            0x31C3
        );
        assert_eq!(slot("foo"), 12182);
    }

    #[test]
    fn lock_markers_turn_an_entry_name_into_its_locks_names() {
        for prefix in ["qd", "c", "a-c"] {
            let k = Keys::new(prefix);
            let m = Keys::lock_markers();
            let entry = k.entry("a}:c:{b", "x:c:{y");
            assert_eq!(
                entry.replacen(m.entry, m.fill, 1),
                k.fill_lock("a}:c:{b", "x:c:{y")
            );
            assert_eq!(
                entry.replacen(m.entry, m.refresh, 1),
                k.refresh_lock("a}:c:{b", "x:c:{y")
            );
        }
        let k = Keys::new("qd");
        assert_eq!(k.tenant_record("a:b"), "qd:tenant:{a%3Ab}");
    }

    #[test]
    fn hostile_strings_stay_inside_their_namespace() {
        let k = Keys::new("qd");
        assert_eq!(
            k.rule("acme", "api", "burst", "u:1"),
            "qd:{acme}:l:api:burst:u%3A1"
        );
        let evil = k.rule("a}:l:api:burst:x{", "api", "burst", "k");
        assert_eq!(evil, "qd:{a%7D%3Al%3Aapi%3Aburst%3Ax%7B}:l:api:burst:k");
        // The hash tag is exactly the encoded tenant, whatever it contains.
        let tag = &evil[evil.find('{').unwrap() + 1..evil.find('}').unwrap()];
        assert!(!tag.contains(['{', '}', ':']));
        // Different tuples, different keys (a `%` is itself encoded).
        assert_ne!(k.rule("a%3A", "p", "r", "k"), k.rule("a:", "p", "r", "k"));
        assert_ne!(k.rule("é", "p", "r", "k"), k.rule("%C3%A9", "p", "r", "k"));
    }

    #[test]
    fn only_entries_start_with_the_entry_prefix() {
        for prefix in ["qd", "c", "t"] {
            let k = Keys::new(prefix);
            let p = k.entry_prefix();
            assert!(k.entry("t", "k").starts_with(&p));
            assert!(k.entry("{c:", "}:c:{").starts_with(&p));
            for other in [
                k.rule("c", "c", "c", "c"),
                k.leases("t", "p", "r", "k"),
                k.fill_lock("t", "k"),
                k.refresh_lock("t", "k"),
                k.tag("t", "k"),
                k.tenant_record("t"),
                k.tenant_quota_cache("t"),
                k.tenant_index(),
                k.tenant_changes(),
            ] {
                assert!(!other.starts_with(&p), "{other} starts with {p}");
            }
        }
    }
}
