//! `[metrics]`: the Prometheus endpoint.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// `[metrics]`: serve Prometheus metrics over HTTP at `/metrics`. Without
/// the table, no endpoint is opened.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port to listen on, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.port() == 0 {
            return Err(invalid(
                "metrics.listen",
                "needs a port (Prometheus must know where to scrape), e.g. 127.0.0.1:9464",
            ));
        }
        Ok(())
    }
}
