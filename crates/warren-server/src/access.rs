//! What a connection's user may do in its virtual host: RabbitMQ's configure, write and read
//! permissions, each a regular expression over resource names.
//!
//! `connection` builds a `VhostAccess` at connection.open from the user's permissions in the
//! metadata (`warren_core::meta::Permissions`) and asks it before each operation; users from
//! the configuration file are the operator's own and may do anything. As in RabbitMQ an
//! expression matches anywhere in the name (anchor it with `^...$` to match all of it), an
//! empty one allows nothing, and the default exchange is named `amq.default`.

use regex::Regex;
use warren_core::AmqpError;
use warren_core::meta::Permissions;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VhostAccess {
    /// None: anything goes (a user from the configuration file).
    rules: Option<[Option<Regex>; 3]>,
}

impl VhostAccess {
    pub fn unrestricted() -> Self {
        VhostAccess { rules: None }
    }

    /// Compiles a user's permissions; an invalid expression allows nothing (and is reported).
    pub fn from_permissions(p: &Permissions) -> Result<Self, String> {
        let compile = |what: &str, expr: &str| -> Result<Option<Regex>, String> {
            if expr.is_empty() {
                return Ok(None);
            }
            Regex::new(expr)
                .map(Some)
                .map_err(|e| format!("invalid {what} permission '{expr}': {e}"))
        };
        Ok(VhostAccess {
            rules: Some([
                compile("configure", &p.configure)?,
                compile("write", &p.write)?,
                compile("read", &p.read)?,
            ]),
        })
    }

    pub fn is_unrestricted(&self) -> bool {
        self.rules.is_none()
    }

    pub fn allows(&self, access: Access, name: &str) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let name = if name.is_empty() { "amq.default" } else { name };
        let rule = match access {
            Access::Configure => &rules[0],
            Access::Write => &rules[1],
            Access::Read => &rules[2],
        };
        rule.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// The 403 RabbitMQ answers, naming what was refused.
pub fn refused(access: Access, kind: &str, name: &str, vhost: &str, user: &str) -> AmqpError {
    let name = if name.is_empty() { "amq.default" } else { name };
    AmqpError::access_refused(format!(
        "{} access to {kind} '{name}' in vhost '{vhost}' refused for user '{user}'",
        access.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(configure: &str, write: &str, read: &str) -> VhostAccess {
        VhostAccess::from_permissions(&Permissions {
            configure: configure.into(),
            write: write.into(),
            read: read.into(),
        })
        .expect("valid")
    }

    #[test]
    fn expressions_match_anywhere_and_empty_allows_nothing() {
        let a = perms("^app-", ".*", "");
        assert!(a.allows(Access::Configure, "app-orders"));
        assert!(!a.allows(Access::Configure, "orders"));
        assert!(a.allows(Access::Write, "anything"));
        assert!(!a.allows(Access::Read, "app-orders"));
        let b = perms("orders", "", "");
        assert!(b.allows(Access::Configure, "my-orders-queue"), "unanchored");
    }

    #[test]
    fn the_default_exchange_is_amq_default() {
        let a = perms("", "^amq\\.default$", "");
        assert!(a.allows(Access::Write, ""));
        assert!(!a.allows(Access::Write, "amq.topic"));
    }

    #[test]
    fn unrestricted_allows_all_and_bad_expressions_are_reported() {
        assert!(VhostAccess::unrestricted().allows(Access::Read, "x"));
        let err = VhostAccess::from_permissions(&Permissions {
            configure: "(".into(),
            write: String::new(),
            read: String::new(),
        })
        .unwrap_err();
        assert!(err.contains("configure"), "{err}");
    }
}
