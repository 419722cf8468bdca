//! The one place where failures become wire error codes.
//!
//! Every error a client can see is an [`Error`]; its [`Error::code`] is the
//! `code` string of protocol version 1 and its `Display` is the `message`.

/// An error answered to a client, one variant per wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A missing or mistyped field, an empty or oversized tenant or key, a
    /// cost no rule can ever allow, or a frame that is not a MessagePack map.
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("unknown policy `{0}`")]
    UnknownPolicy(String),
    /// A frame or a value over its configured maximum.
    #[error("{0}")]
    TooLarge(String),
    /// A bounded queue is full; the client should back off and retry.
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("quotad is shutting down")]
    ShuttingDown,
    /// An admin op could not reach the tenants' source or Redis: an
    /// outage, not a bug; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The wire `code` of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::UnknownOp(_) => "unknown_op",
            Error::UnknownPolicy(_) => "unknown_policy",
            Error::TooLarge(_) => "too_large",
            Error::Overloaded(_) => "overloaded",
            Error::Forbidden(_) => "forbidden",
            Error::ShuttingDown => "shutting_down",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Error::BadRequest(msg.into())
    }

    /// Peer-supplied names are echoed shortened: an error reply stays small.
    pub fn unknown_op(op: &str) -> Self {
        Error::UnknownOp(truncate(op, 64))
    }

    pub fn unknown_policy(name: &str) -> Self {
        Error::UnknownPolicy(truncate(name, 64))
    }
}

/// Shortens a peer-supplied string before it goes into an error message.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}
