//! `tls_server_name`: one Redis reached at the address of its `url` while
//! TLS (the SNI sent, and the name its certificate must carry) uses
//! another name. redis-rs takes the TLS name from the address's host, and
//! its only hook to part the two, a DNS resolver, is taken by neither its
//! `ConnectionManager` nor its `get_async_pubsub`. So the host becomes the
//! name and [`ResolveTo`] maps it back; [`Named`] keeps the connection
//! itself, and the tenant-change subscription makes its TLS stream here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::Mutex;

use super::conn::{SetupError, certificates, connection_info, connection_lost, pipeline};
use crate::config::{ConfigError, RedisConfig, Secret, invalid};

/// One multiplexed connection, made on first use and again on the round
/// trip after one that lost it (what `ConnectionManager` does for the
/// other single servers).
pub struct Named {
    client: Client,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Named {
    /// For `url`, checked against `name`; `timeout` bounds connecting and
    /// each round trip.
    pub fn new(
        cfg: &RedisConfig,
        name: &str,
        url: &str,
        password: Option<&Secret>,
        timeout: Duration,
    ) -> Result<Named, SetupError> {
        let (client, resolver) = named_client(cfg, name, url, password)?;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_dns_resolver(resolver);
        Ok(Named {
            client,
            config,
            conn: Mutex::new(None),
        })
    }

    pub async fn run(&self, cmds: Vec<Cmd>) -> Vec<RedisResult<Value>> {
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); cmds.len()],
        };
        let results = pipeline(&conn, cmds).await;
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if connection_lost(e)))
        {
            *self.conn.lock().await = None;
        }
        results
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = (self.client)
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// Resolves `name` as `host` (and any other host as itself).
struct ResolveTo {
    name: String,
    host: String,
}

impl redis::io::AsyncDNSResolver for ResolveTo {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        let host = if host == self.name { &self.host } else { host };
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, port)).await?;
            Ok(Box::new(addrs) as Box<dyn Iterator<Item = SocketAddr> + Send>)
        })
    }
}

/// A client for `url` whose host is `name`, and the resolver that sends
/// `name` to `url`'s host.
fn named_client(
    cfg: &RedisConfig,
    name: &str,
    url: &str,
    password: Option<&Secret>,
) -> Result<(Client, ResolveTo), SetupError> {
    let info = connection_info(cfg, url, password)?;
    let ConnectionAddr::TcpTls {
        host,
        port,
        insecure,
        tls_params,
    } = info.addr().clone()
    else {
        return Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "tls_server_name needs rediss://",
        ))
        .into());
    };
    let info = info.set_addr(ConnectionAddr::TcpTls {
        host: name.to_owned(),
        port,
        insecure,
        tls_params,
    });
    let client = match certificates(cfg)? {
        Some(certs) => Client::build_with_tls(info, certs)?,
        None => Client::open(info)?,
    };
    let resolver = ResolveTo {
        name: name.to_owned(),
        host,
    };
    Ok((client, resolver))
}

/// The tenant-change subscription with `tls_server_name`: redis-rs's
/// `get_async_pubsub` takes no resolver, so the TLS stream is made here.
pub async fn named_pubsub(
    cfg: &RedisConfig,
    name: &str,
    url: &str,
    password: Option<&Secret>,
) -> RedisResult<redis::aio::PubSub> {
    let info = connection_info(cfg, url, password)?;
    let ConnectionAddr::TcpTls { host, port, .. } = info.addr() else {
        return Err((
            ErrorKind::InvalidClientConfig,
            "tls_server_name needs rediss://",
        )
            .into());
    };
    let bad = |e: String| RedisError::from((ErrorKind::InvalidClientConfig, "Redis TLS", e));
    let tls = rustls_config(cfg).map_err(|e| bad(e.to_string()))?;
    let server =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| bad(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server, tcp)
        .await?;
    redis::aio::PubSub::new(info.redis_settings(), stream).await
}

/// The rustls settings of `[redis]`: its CA (or the system's roots) and
/// its client certificate.
fn rustls_config(cfg: &RedisConfig) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let roots = crate::tls::root_store("redis.tls_ca_file", cfg.tls_ca_file.as_deref())?;
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
        return Ok(builder.with_no_client_auth());
    };
    let bad = |e: String| invalid("redis.tls_cert_file", e);
    let pem = crate::tls::read_certs("redis.tls_cert_file", cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&crate::tls::read_key("redis.tls_key_file", key)?)
        .map_err(|e| bad(e.to_string()))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(e.to_string()))
}
