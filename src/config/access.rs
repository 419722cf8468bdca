//! `[[access]]`: which Unix users (and groups) may use which tenants, and
//! the admin ops. The patterns are compiled here, at load; a connection
//! then asks [`AccessRules::grant`] once for its peer, and each request for
//! a new tenant is one hash lookup or a few prefix tests against that grant
//! (`access::PeerGrant` remembers the last answer).

use std::collections::HashSet;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// One `[[access]]` table, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Peers whose uid is one of these match (SO_PEERCRED).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peers whose primary gid is one of these match.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Exact tenant names, or prefixes ending in `*`; `"*"` is every tenant.
    pub tenants: Vec<String>,
    /// May use the admin ops (`tenant_*`).
    #[serde(default)]
    pub admin: bool,
}

/// The tenants a peer may use: exact names, prefixes, or all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantSet {
    exact: HashSet<String>,
    prefixes: Vec<String>,
    all: bool,
}

impl TenantSet {
    pub fn all() -> TenantSet {
        TenantSet {
            all: true,
            ..TenantSet::default()
        }
    }

    /// True if every tenant is covered (`"*"`): nothing to look up.
    pub fn is_all(&self) -> bool {
        self.all
    }

    pub fn covers(&self, tenant: &str) -> bool {
        self.all
            || self.exact.contains(tenant)
            || self.prefixes.iter().any(|p| tenant.starts_with(p.as_str()))
    }

    fn add(&mut self, other: &TenantSet) {
        self.all |= other.all;
        self.exact.extend(other.exact.iter().cloned());
        for p in &other.prefixes {
            if !self.prefixes.contains(p) {
                self.prefixes.push(p.clone());
            }
        }
    }
}

/// What a peer may do: the union of the rules that match it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub tenants: TenantSet,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    uids: Vec<u32>,
    gids: Vec<u32>,
    tenants: TenantSet,
    admin: bool,
}

/// Every `[[access]]` table, compiled. Empty: no tables, no rules apply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessRules {
    rules: Vec<Rule>,
}

impl AccessRules {
    /// Validates and compiles the tables; each mistake names its table.
    pub fn compile(tables: &[AccessConfig]) -> Result<AccessRules, ConfigError> {
        let rules = tables
            .iter()
            .enumerate()
            .map(|(i, t)| compile_rule(i, t))
            .collect::<Result<_, _>>()?;
        Ok(AccessRules { rules })
    }

    /// True if any `[[access]]` table is configured.
    pub fn is_configured(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The grant of a peer with `uid` and primary `gid`: `None` if no rule
    /// matches it.
    pub fn grant(&self, uid: u32, gid: u32) -> Option<Grant> {
        let mut grant: Option<Grant> = None;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.uids.contains(&uid) || r.gids.contains(&gid))
        {
            let g = grant.get_or_insert_with(|| Grant {
                tenants: TenantSet::default(),
                admin: false,
            });
            g.tenants.add(&rule.tenants);
            g.admin |= rule.admin;
        }
        grant
    }
}

fn compile_rule(i: usize, t: &AccessConfig) -> Result<Rule, ConfigError> {
    let field = |name: &str| format!("access[{i}].{name}");
    if t.uids.is_empty() && t.gids.is_empty() {
        return Err(invalid(
            format!("access[{i}]"),
            "give `uids` or `gids` (or both): whose access this rule grants",
        ));
    }
    if t.tenants.is_empty() {
        return Err(invalid(
            field("tenants"),
            "give at least one tenant name or pattern (`[\"*\"]` for all)",
        ));
    }
    let mut tenants = TenantSet::default();
    for pattern in &t.tenants {
        match pattern.find('*') {
            None if pattern.is_empty() => {
                return Err(invalid(field("tenants"), "an empty tenant name"));
            }
            None => {
                tenants.exact.insert(pattern.clone());
            }
            Some(at) if at + 1 != pattern.len() => {
                return Err(invalid(
                    field("tenants"),
                    format!("`{pattern}`: `*` may only be the last character (a prefix)"),
                ));
            }
            Some(0) => tenants.all = true,
            Some(at) => tenants.prefixes.push(pattern[..at].to_owned()),
        }
    }
    Ok(Rule {
        uids: t.uids.clone(),
        gids: t.gids.clone(),
        tenants,
        admin: t.admin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<AccessRules, String> {
        #[derive(Deserialize)]
        struct F {
            access: Vec<AccessConfig>,
        }
        let f: F = toml::from_str(text).map_err(|e| e.to_string())?;
        AccessRules::compile(&f.access).map_err(|e| e.to_string())
    }

    #[test]
    fn grants_are_the_union_of_matching_rules() {
        let r = rules(
            r#"
            [[access]]
            uids = [1001]
            tenants = ["acme", "acme-*"]
            [[access]]
            gids = [50]
            tenants = ["shared"]
            admin = true
            [[access]]
            uids = [0]
            tenants = ["*"]
            "#,
        )
        .unwrap();
        let g = r.grant(1001, 1001).unwrap();
        assert!(g.tenants.covers("acme") && g.tenants.covers("acme-1"));
        assert!(!g.tenants.covers("acm") && !g.tenants.covers("other"));
        assert!(!g.tenants.covers("acmex"), "the prefix is `acme-`");
        assert!(!g.admin);
        let g = r.grant(1001, 50).unwrap();
        assert!(g.tenants.covers("shared") && g.tenants.covers("acme-2") && g.admin);
        assert!(r.grant(0, 0).unwrap().tenants.covers("anything"));
        assert_eq!(r.grant(1002, 1002), None);
    }

    #[test]
    fn mistakes_name_their_table() {
        let e = rules("[[access]]\ntenants = ['a']").unwrap_err();
        assert!(e.contains("`access[0]`") && e.contains("uids"), "{e}");
        let e = rules("[[access]]\nuids = [1]\ntenants = []").unwrap_err();
        assert!(e.contains("access[0].tenants"), "{e}");
        let e = rules("[[access]]\nuids=[1]\ntenants=['a']\n[[access]]\nuids=[2]\ntenants=['a*b']")
            .unwrap_err();
        assert!(
            e.contains("access[1].tenants") && e.contains("`a*b`"),
            "{e}"
        );
        assert!(rules("[[access]]\nuids=[1]\ntenants=['**']").is_err());
        assert!(rules("[[access]]\nuids=[1]\ntenants=['']").is_err());
        assert!(
            rules("[[access]]\nuids=[1]")
                .unwrap_err()
                .contains("tenants")
        );
        assert!(
            rules("[[access]]\nuids=[1]\ntenants=['a']\nadmn=true")
                .unwrap_err()
                .contains("unknown field `admn`")
        );
    }
}
