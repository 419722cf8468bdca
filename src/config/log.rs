//! `[log]`: how the daemon's log is written.

use serde::Deserialize;

/// `[log]`: the log's format (its level is `RUST_LOG`, default `info`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// One line per event: for people, or one JSON object for collectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}
