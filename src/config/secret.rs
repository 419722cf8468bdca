//! Passwords kept out of the config file: each can be written inline, read
//! from a file (e.g. a systemd credential) or from an environment variable.
//! A [`Secret`] never prints: its `Debug` is `***`, and URLs are shown with
//! [`mask_url`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// A password. `Debug` shows `***`, so a config dump cannot leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Where one secret comes from: at most one of the three.
#[derive(Debug, Clone, Copy)]
pub struct SecretSource<'a> {
    /// The config field of the inline value, e.g. `redis.password`; the
    /// others are named `<field>_file` and `<field>_env`.
    pub field: &'a str,
    pub inline: Option<&'a Secret>,
    pub file: Option<&'a Path>,
    pub env: Option<&'a str>,
}

impl SecretSource<'_> {
    pub fn is_given(&self) -> bool {
        self.inline.is_some() || self.file.is_some() || self.env.is_some()
    }

    /// Refuses more than one way of giving the secret.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let given = [
            self.inline.is_some(),
            self.file.is_some(),
            self.env.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            let f = self.field;
            return Err(invalid(
                f,
                format!("give only one of `{f}`, `{f}_file` and `{f}_env`"),
            ));
        }
        Ok(())
    }

    /// The secret as it is now (a file or variable is read again on each
    /// call). Errors name the file or variable, never the content.
    pub fn read(&self) -> Result<Option<Secret>, ConfigError> {
        let f = self.field;
        if let Some(s) = self.inline {
            return Ok(Some(s.clone()));
        }
        let (value, from) = if let Some(path) = self.file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    format!("{f}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            (text, format!("{f}_file"))
        } else if let Some(var) = self.env {
            let text = std::env::var(var).map_err(|e| {
                invalid(
                    format!("{f}_env"),
                    format!("environment variable {var}: {e}"),
                )
            })?;
            (text, format!("{f}_env"))
        } else {
            return Ok(None);
        };
        // A file written with `echo` ends in a newline that is not part of it.
        let value = value.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(invalid(from, "the password is empty"));
        }
        Ok(Some(Secret(value.to_owned())))
    }
}

/// `path` relative to `dir` (the config file's directory), if relative.
pub fn relative_to(dir: &Path, path: &mut Option<PathBuf>) {
    if let Some(p) = path.as_mut().filter(|p| p.is_relative()) {
        *p = dir.join(&*p);
    }
}

/// A URL with the password of its user info replaced by `***`
/// (`rediss://user:***@host`); any other URL unchanged.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &url[scheme_end + at..]
        ),
        // `redis://secret@host`: redis-rs takes a lone user info as the
        // password (`AUTH secret`).
        None => format!("{}***{}", &url[..scheme_end], &url[scheme_end + at..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            mask_url("rediss://u:pw@h:6380/0"),
            "rediss://u:***@h:6380/0"
        );
        assert_eq!(mask_url("redis://:pw@h"), "redis://:***@h");
        assert_eq!(mask_url("redis://pw@h"), "redis://***@h");
        assert_eq!(mask_url("redis://h:1/x@y"), "redis://h:1/x@y");
        assert_eq!(
            mask_url("redis+unix:///tmp/r.sock"),
            "redis+unix:///tmp/r.sock"
        );
        assert_eq!(mask_url("p://a:b:c@d@h"), "p://a:***@h");
    }

    #[test]
    fn a_secret_reads_from_one_place_and_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let src = SecretSource {
            field: "redis.password",
            inline: None,
            file: Some(&file),
            env: None,
        };
        let s = src.read().unwrap().unwrap();
        assert_eq!(s.expose(), "s3cret");
        assert_eq!(format!("{s:?}"), "***");
        std::fs::write(&file, "\n").unwrap();
        assert!(src.read().unwrap_err().to_string().contains("empty"));
        let both = SecretSource {
            inline: Some(&s),
            ..src
        };
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("only one")
        );
        let missing = SecretSource {
            file: Some(Path::new("/nonexistent/pw")),
            ..src
        };
        let e = missing.read().unwrap_err().to_string();
        assert!(
            e.contains("redis.password_file") && e.contains("/nonexistent/pw"),
            "{e}"
        );
    }
}
