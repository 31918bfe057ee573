//! The engine's errors: what a caller of [`super::EngineHandle`] can be told.
//! No HTTP types here; the server maps these in `server/error.rs`.

/// Errors reported to a request's caller.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid; `param` names the offending field.
    #[error("{message}")]
    Invalid {
        /// Field name (OpenAI `param`).
        param: Option<String>,
        /// Human-readable message.
        message: String,
    },
    /// The engine's queue is full; retry later.
    #[error("the engine is overloaded: request queue full")]
    Overloaded,
    /// The engine is shutting down or stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// An actor died for good: the engine serves nothing more.
    #[error("the engine has stopped: {0}")]
    Dead(String),
    /// The request failed inside the engine (its micro-batch failed); others go on.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Thread or pool creation failed.
    #[error("starting engine: {0}")]
    Spawn(String),
    /// The fault-injection plan does not parse.
    #[error("starting engine: {0}")]
    Fault(#[from] super::fault::FaultParseError),
}
