//! The error every state machine and routing call returns: an AMQP reply code with the text
//! the client will see.
//!
//! The server turns it into channel.close or connection.close (the codec's reply-code table
//! decides which); the cluster layer carries it unchanged inside Raft replies, so every replica
//! answers a failed command with the same code and text.

use serde::{Deserialize, Serialize};
use warren_codec::reply_code;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code} {text}")]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
}

impl AmqpError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
        }
    }

    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(reply_code::NOT_FOUND, text)
    }

    pub fn precondition_failed(text: impl Into<String>) -> Self {
        Self::new(reply_code::PRECONDITION_FAILED, text)
    }

    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(reply_code::ACCESS_REFUSED, text)
    }

    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(reply_code::RESOURCE_LOCKED, text)
    }

    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(reply_code::COMMAND_INVALID, text)
    }

    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(reply_code::NOT_IMPLEMENTED, text)
    }

    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(reply_code::INTERNAL_ERROR, text)
    }

    /// Hard errors close the whole connection; the others close only the channel (spec 1.2).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self.code,
            reply_code::CONNECTION_FORCED
                | reply_code::INVALID_PATH
                | reply_code::FRAME_ERROR
                | reply_code::SYNTAX_ERROR
                | reply_code::COMMAND_INVALID
                | reply_code::CHANNEL_ERROR
                | reply_code::UNEXPECTED_FRAME
                | reply_code::RESOURCE_ERROR
                | reply_code::NOT_ALLOWED
                | reply_code::NOT_IMPLEMENTED
                | reply_code::INTERNAL_ERROR
        )
    }
}

pub type AmqpResult<T> = Result<T, AmqpError>;
