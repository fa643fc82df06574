//! Client authentication: the PLAIN and AMQPLAIN SASL mechanisms, password checks and the
//! loopback-only rule for the default user.
//!
//! The connection driver calls [`Authenticator::authenticate`] with the mechanism and
//! response from connection.start-ok; users come from `config`. Passwords may be given as
//! RabbitMQ-format hashes (base64 of a 4-byte salt followed by SHA-256(salt ‖ password)), so
//! definitions exported from RabbitMQ keep working.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use warren_codec::FieldTable;

use warren_core::meta::UserDef;

use crate::config::UserConfig;

pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

#[derive(Clone, Debug)]
enum Secret {
    Plain(String),
    Salted { salt: [u8; 4], digest: [u8; 32] },
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    secret: Secret,
    loopback_only: bool,
    tags: Vec<String>,
}

/// Who logged in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// From the configuration file: the operator's own user, allowed everything.
    pub configured: bool,
    /// `administrator`, `monitoring`, `management`: what the management API allows.
    pub tags: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Authenticator {
    users: BTreeMap<String, User>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unsupported authentication mechanism '{0}'; use PLAIN or AMQPLAIN")]
    Mechanism(String),
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error(
        "Login was refused using authentication mechanism {0}. For details see the broker logfile."
    )]
    Refused(String),
    #[error("User '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

/// Decodes a RabbitMQ password hash into salt and digest.
pub fn decode_password_hash(hash: &str) -> Result<([u8; 4], [u8; 32]), String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(hash.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    if raw.len() != 36 {
        return Err(format!(
            "expected 36 bytes (4-byte salt + SHA-256), got {}",
            raw.len()
        ));
    }
    let mut salt = [0u8; 4];
    let mut digest = [0u8; 32];
    salt.copy_from_slice(&raw[..4]);
    digest.copy_from_slice(&raw[4..]);
    Ok((salt, digest))
}

/// Produces a RabbitMQ-format hash.
#[cfg(test)]
pub fn hash_password(salt: [u8; 4], password: &str) -> String {
    warren_core::meta::password_hash(salt, password)
}

fn salted_digest(salt: [u8; 4], password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn new(users: &[UserConfig], loopback_users: &[String]) -> Self {
        let users = users
            .iter()
            .map(|u| {
                let secret = match (&u.password, &u.password_hash) {
                    (_, Some(hash)) => {
                        // Config validation already decoded it once; a failure here cannot happen.
                        let (salt, digest) =
                            decode_password_hash(hash).unwrap_or(([0; 4], [0; 32]));
                        Secret::Salted { salt, digest }
                    }
                    (Some(p), None) => Secret::Plain(p.clone()),
                    (None, None) => Secret::Plain(String::new()),
                };
                let user = User {
                    name: u.name.clone(),
                    secret,
                    loopback_only: loopback_users.contains(&u.name),
                    tags: u.tags.clone(),
                };
                (u.name.clone(), user)
            })
            .collect();
        Authenticator { users }
    }

    /// Checks a start-ok response. `peer` is the client's address: loopback-only users are
    /// refused from anywhere else, as RabbitMQ does with guest. Users from the configuration
    /// come first; `stored` looks up the users kept in the cluster's metadata.
    pub fn authenticate(
        &self,
        mechanism: &str,
        response: &[u8],
        peer: IpAddr,
        stored: impl Fn(&str) -> Option<UserDef>,
    ) -> Result<Principal, AuthError> {
        let (name, password) = match mechanism {
            "PLAIN" => parse_plain(response)?,
            "AMQPLAIN" => parse_amqplain(response)?,
            other => return Err(AuthError::Mechanism(other.to_owned())),
        };
        self.check_password(mechanism, name, &password, peer, stored)
    }

    /// Checks a user name and password (from a SASL response, or HTTP basic auth); `how`
    /// names the mechanism in the refusal.
    pub fn check_password(
        &self,
        how: &str,
        name: String,
        password: &str,
        peer: IpAddr,
        stored: impl Fn(&str) -> Option<UserDef>,
    ) -> Result<Principal, AuthError> {
        let refused = || AuthError::Refused(how.to_owned());
        let Some(user) = self.users.get(&name) else {
            let user = stored(&name).ok_or_else(refused)?;
            // A stored user without a password hash cannot log in with a password.
            let (salt, digest) =
                decode_password_hash(&user.password_hash).map_err(|_| refused())?;
            if !constant_time_eq(&salted_digest(salt, password), &digest) {
                return Err(refused());
            }
            return Ok(Principal {
                name,
                configured: false,
                tags: user.tags,
            });
        };
        let ok = match &user.secret {
            Secret::Plain(p) => constant_time_eq(p.as_bytes(), password.as_bytes()),
            Secret::Salted { salt, digest } => {
                constant_time_eq(&salted_digest(*salt, password), digest)
            }
        };
        if !ok {
            return Err(refused());
        }
        if user.loopback_only && !is_loopback(peer) {
            return Err(AuthError::LoopbackOnly(name));
        }
        Ok(Principal {
            name: user.name.clone(),
            configured: true,
            tags: user.tags.clone(),
        })
    }
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// PLAIN: `authzid NUL authcid NUL password` (RFC 4616); the authorization identity is ignored.
fn parse_plain(response: &[u8]) -> Result<(String, String), AuthError> {
    let mut parts = response.split(|b| *b == 0);
    let (Some(_authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("PLAIN"));
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| AuthError::Malformed("PLAIN"));
    Ok((text(user)?, text(pass)?))
}

/// AMQPLAIN: the body of a field table (no length prefix) with LOGIN and PASSWORD.
fn parse_amqplain(response: &[u8]) -> Result<(String, String), AuthError> {
    let malformed = || AuthError::Malformed("AMQPLAIN");
    let len = u32::try_from(response.len()).map_err(|_| malformed())?;
    let mut framed = BytesMut::with_capacity(response.len() + 4);
    framed.put_u32(len);
    framed.put_slice(response);
    let table = FieldTable::decode(&Bytes::from(framed)).map_err(|_| malformed())?;
    let field = |key: &str| {
        table
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(malformed)
    };
    Ok((field("LOGIN")?, field("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::{FieldValue, LongStr, ShortStr};

    fn none(_: &str) -> Option<UserDef> {
        None
    }

    #[test]
    fn stored_users_log_in_with_their_hash_after_configured_ones() {
        let a = users();
        let stored = |name: &str| {
            (name == "app").then(|| UserDef {
                name: "app".into(),
                password_hash: hash_password([1, 2, 3, 4], "pw"),
                tags: vec![],
            })
        };
        let p = a
            .authenticate("PLAIN", b"\0app\0pw", REMOTE, stored)
            .expect("stored user");
        assert!(!p.configured);
        assert!(matches!(
            a.authenticate("PLAIN", b"\0app\0nope", LOCAL, stored),
            Err(AuthError::Refused(_))
        ));
        let p = a
            .authenticate("PLAIN", b"\0guest\0guest", LOCAL, stored)
            .expect("configured user");
        assert!(p.configured);
    }

    fn users() -> Authenticator {
        Authenticator::new(
            &[
                UserConfig {
                    name: "guest".into(),
                    password: Some("guest".into()),
                    password_hash: None,
                    tags: vec![],
                },
                UserConfig {
                    name: "alice".into(),
                    password: None,
                    password_hash: Some(hash_password([1, 2, 3, 4], "s3cret")),
                    tags: vec![],
                },
            ],
            &["guest".to_string()],
        )
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    #[test]
    fn plain_and_hashed_passwords() {
        let a = users();
        assert!(
            a.authenticate("PLAIN", b"\0guest\0guest", LOCAL, none)
                .is_ok()
        );
        assert!(
            a.authenticate("PLAIN", b"\0alice\0s3cret", REMOTE, none)
                .is_ok()
        );
        assert!(matches!(
            a.authenticate("PLAIN", b"\0alice\0wrong", LOCAL, none),
            Err(AuthError::Refused(_))
        ));
        assert!(matches!(
            a.authenticate("PLAIN", b"\0nobody\0x", LOCAL, none),
            Err(AuthError::Refused(_))
        ));
        assert_eq!(
            a.authenticate("PLAIN", b"guest", LOCAL, none).unwrap_err(),
            AuthError::Malformed("PLAIN")
        );
        assert!(matches!(
            a.authenticate("EXTERNAL", b"", LOCAL, none),
            Err(AuthError::Mechanism(_))
        ));
    }

    #[test]
    fn guest_only_from_loopback() {
        let a = users();
        assert_eq!(
            a.authenticate("PLAIN", b"\0guest\0guest", REMOTE, none)
                .unwrap_err(),
            AuthError::LoopbackOnly("guest".into())
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(
            a.authenticate("PLAIN", b"\0guest\0guest", mapped, none)
                .is_ok()
        );
    }

    #[test]
    fn amqplain_table_body() {
        let mut t = FieldTable::new();
        t.insert(
            ShortStr::try_from("LOGIN").unwrap(),
            FieldValue::LongStr(LongStr::from("guest")),
        );
        t.insert(
            ShortStr::try_from("PASSWORD").unwrap(),
            FieldValue::LongStr(LongStr::from("guest")),
        );
        let mut buf = BytesMut::new();
        t.encode(&mut buf);
        let body = &buf[4..];
        assert!(users().authenticate("AMQPLAIN", body, LOCAL, none).is_ok());
        assert!(
            users()
                .authenticate("AMQPLAIN", &body[..5], LOCAL, none)
                .is_err()
        );
    }

    #[test]
    fn rabbitmq_hash_format_round_trips() {
        let h = hash_password([9, 9, 9, 9], "pw");
        let (salt, digest) = decode_password_hash(&h).unwrap();
        assert_eq!(salt, [9, 9, 9, 9]);
        assert_eq!(digest, salted_digest(salt, "pw"));
        assert!(decode_password_hash("AAAA").is_err());
    }
}
