//! What can go wrong on the device side, in the three classes a caller acts on differently
//! (the exit code): a local problem, a refusal, an unavailable broker.

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Local(String),
    /// A request the executable-source contract cannot serve (see `executable`).
    #[error("{message}")]
    Contract { code: &'static str, message: String },
    #[error("the broker refused (HTTP {status} {code}): {description}")]
    Refused {
        status: u16,
        code: String,
        description: String,
    },
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Local(_) | ClientError::Contract { .. } => 1,
            ClientError::Refused { .. } => 2,
            ClientError::Unavailable(_) => 3,
        }
    }

    /// The AIP-4117 error code for executable-sourced credentials.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Local(_) => "local_error",
            ClientError::Contract { code, .. } => code,
            ClientError::Refused { code, .. } => code,
            ClientError::Unavailable(_) => "temporarily_unavailable",
        }
    }
}
