//! Definitions export and import, in RabbitMQ's JSON format (`GET`/`POST /api/definitions`
//! and `/api/definitions/{vhost}`): the vhosts, users, permissions, policies, exchanges,
//! queues and bindings of the cluster, so a topology moves between brokers, RabbitMQ
//! included, and goes back after a rebuild.
//!
//! Served by `management` (same authentication); reads this node's copy of the metadata and
//! imports by writing ordinary metadata commands through the node, one at a time in
//! dependency order, so an import is as safe as the same declarations made by a client.
//! What RabbitMQ's file carries and Warren has no use for (runtime parameters such as
//! shovels and federation, global parameters, topic permissions) is ignored.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use warren_core::meta::{BindingDecl, Destination, MetaCmd, MetaState};

use crate::broker::{Broker, QueueOptions};
use crate::management::{
    ApiError, Auth, Reply, arguments_of, bad, binding_json, exchange_declaration, exchange_json,
    flag, json_body, ok, permission_json, permissions_from_json, policy_from_json, policy_json,
    tags_of, write,
};

/// What a definitions file names RabbitMQ's password hashing; the only one Warren stores.
const HASHING: &str = "rabbit_password_hashing_sha256";

/// The exchanges every vhost has from its creation; they are never exported.
fn is_builtin_exchange(name: &str) -> bool {
    name.is_empty() || name.starts_with("amq.")
}

/// The definitions of the whole cluster (`vhost` None) or of one vhost, as RabbitMQ writes
/// them. Exclusive queues belong to a connection and are left out, as RabbitMQ does.
fn export(meta: &MetaState, vhost: Option<&str>) -> Value {
    let within = |v: &str| vhost.is_none_or(|only| only == v);
    let queues: Vec<Value> = meta
        .queues()
        .filter(|(v, q)| within(v) && q.exclusive_owner.is_none())
        .map(|(v, q)| {
            json!({
                "name": q.name,
                "vhost": v,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": warren_core::json::table_to_json(&q.arguments),
            })
        })
        .collect();
    let exchanges: Vec<Value> = meta
        .exchanges()
        .filter(|(v, e)| within(v) && !is_builtin_exchange(&e.name))
        .map(|(v, e)| exchange_json(v, e))
        .collect();
    let bindings: Vec<Value> = meta
        .bindings()
        .filter(|(v, _)| within(v))
        .map(|(v, b)| {
            let mut j = binding_json(v, b);
            if let Some(o) = j.as_object_mut() {
                o.remove("properties_key");
            }
            j
        })
        .collect();
    let policies: Vec<Value> = meta
        .policies()
        .filter(|(v, _)| within(v))
        .map(|(v, p)| policy_json(v, p))
        .collect();
    let mut out = json!({
        "rabbit_version": "3.10.8",
        "rabbitmq_version": "3.10.8",
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    if vhost.is_none() {
        let o = out.as_object_mut().expect("built as an object");
        o.insert(
            "vhosts".into(),
            meta.vhost_names().map(|v| json!({"name": v})).collect(),
        );
        // Users from the configuration file live there, not in the cluster: not exported.
        o.insert(
            "users".into(),
            meta.users()
                .map(|u| {
                    json!({
                        "name": u.name,
                        "password_hash": u.password_hash,
                        "hashing_algorithm": HASHING,
                        "tags": u.tags.join(","),
                    })
                })
                .collect(),
        );
        o.insert(
            "permissions".into(),
            meta.all_permissions()
                .map(|(u, v, p)| permission_json(u, v, p))
                .collect(),
        );
        o.insert("parameters".into(), json!([]));
        o.insert("global_parameters".into(), json!([]));
        o.insert("topic_permissions".into(), json!([]));
    }
    out
}

pub(crate) async fn export_all(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let meta = broker.node.meta();
    ok(export(&meta, None))
}

pub(crate) async fn export_vhost(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    let meta = broker.node.meta();
    if !meta.vhost_exists(&vhost) {
        return Err(ApiError::not_found(format!("no vhost '{vhost}'")));
    }
    ok(export(&meta, Some(&vhost)))
}

pub(crate) async fn import_all(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    import(&broker, &body, None).await
}

pub(crate) async fn import_vhost(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    if !broker.node.meta().vhost_exists(&vhost) {
        return Err(ApiError::not_found(format!("no vhost '{vhost}'")));
    }
    import(&broker, &body, Some(&vhost)).await
}

/// The items of one section of a definitions file (absent means none).
fn section<'a>(body: &'a Value, name: &str) -> Result<&'a [Value], ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(bad(format!("'{name}' must be a list"))),
    }
}

fn text<'a>(item: &'a Value, key: &str, what: &str) -> Result<&'a str, ApiError> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{what}: '{key}' is required")))
}

/// Which vhost an item goes to: the one in the path for a vhost import, else its own.
fn vhost_of<'a>(item: &'a Value, only: Option<&'a str>, what: &str) -> Result<&'a str, ApiError> {
    match only {
        Some(v) => Ok(v),
        None => text(item, "vhost", what),
    }
}

/// Writes one metadata command of an import; a refusal names the item it was for.
async fn apply(broker: &Broker, cmd: MetaCmd, what: &str) -> Result<(), ApiError> {
    write(broker, cmd)
        .await
        .map(drop)
        .map_err(|e| e.context(what))
}

/// Imports in dependency order: vhosts, users, permissions, policies, exchanges, queues,
/// bindings. Items already there with the same settings are left as they are; an item that
/// conflicts stops the import with 400 naming it (what came before it stays imported, as in
/// RabbitMQ).
async fn import(broker: &Broker, body: &Value, only: Option<&str>) -> Reply {
    if only.is_none() {
        for item in section(body, "vhosts")? {
            let name = text(item, "name", "vhost")?;
            let what = format!("vhost '{name}'");
            apply(
                broker,
                MetaCmd::AddVhost {
                    name: name.to_owned(),
                },
                &what,
            )
            .await?;
        }
        for item in section(body, "users")? {
            let name = text(item, "name", "user")?;
            if broker.config.users.iter().any(|u| u.name == name) {
                // The configuration file's users win over imported ones.
                continue;
            }
            let what = format!("user '{name}'");
            let algorithm = item
                .get("hashing_algorithm")
                .and_then(Value::as_str)
                .unwrap_or(HASHING);
            if algorithm != HASHING {
                return Err(bad(format!(
                    "{what}: hashing algorithm '{algorithm}' is not supported (only {HASHING})"
                )));
            }
            let password_hash = item
                .get("password_hash")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if !password_hash.is_empty() {
                crate::auth::decode_password_hash(&password_hash)
                    .map_err(|e| bad(format!("{what}: password_hash: {e}")))?;
            }
            let cmd = MetaCmd::PutUser {
                name: name.to_owned(),
                password_hash,
                tags: tags_of(item),
            };
            apply(broker, cmd, &what).await?;
        }
        for item in section(body, "permissions")? {
            let user = text(item, "user", "permission")?;
            let vhost = text(item, "vhost", "permission")?;
            let what = format!("permissions of '{user}' in vhost '{vhost}'");
            let permissions = permissions_from_json(item).map_err(|e| e.context(&what))?;
            let cmd = MetaCmd::SetPermissions {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                permissions,
            };
            apply(broker, cmd, &what).await?;
        }
    }
    for item in section(body, "policies")? {
        let name = text(item, "name", "policy")?;
        let vhost = vhost_of(item, only, "policy")?;
        let what = format!("policy '{name}' in vhost '{vhost}'");
        let policy = policy_from_json(name.to_owned(), item).map_err(|e| e.context(&what))?;
        let cmd = MetaCmd::SetPolicy {
            vhost: vhost.to_owned(),
            policy,
        };
        apply(broker, cmd, &what).await?;
    }
    for item in section(body, "exchanges")? {
        let name = text(item, "name", "exchange")?;
        if is_builtin_exchange(name) {
            continue;
        }
        let vhost = vhost_of(item, only, "exchange")?;
        let what = format!("exchange '{name}' in vhost '{vhost}'");
        let cmd = exchange_declaration(broker, vhost, name, item).map_err(|e| e.context(&what))?;
        apply(broker, cmd, &what).await?;
    }
    for item in section(body, "queues")? {
        let name = text(item, "name", "queue")?;
        let vhost = vhost_of(item, only, "queue")?;
        let what = format!("queue '{name}' in vhost '{vhost}'");
        let options = QueueOptions {
            durable: flag(item, "durable", true).map_err(|e| e.context(&what))?,
            auto_delete: flag(item, "auto_delete", false).map_err(|e| e.context(&what))?,
            exclusive_owner: None,
        };
        let arguments = arguments_of(item).map_err(|e| e.context(&what))?;
        let cmd = broker
            .queue_declaration(vhost, name, options, arguments)
            .map_err(|e| bad(format!("{what}: {}", e.text)))?;
        apply(broker, cmd, &what).await?;
    }
    for item in section(body, "bindings")? {
        let source = text(item, "source", "binding")?;
        let destination = text(item, "destination", "binding")?;
        let vhost = vhost_of(item, only, "binding")?;
        let what = format!("binding of '{source}' to '{destination}' in vhost '{vhost}'");
        let destination = match item.get("destination_type").and_then(Value::as_str) {
            Some("queue") | None => Destination::Queue(destination.to_owned()),
            Some("exchange") => Destination::Exchange(destination.to_owned()),
            Some(other) => {
                return Err(bad(format!("{what}: unknown destination_type '{other}'")));
            }
        };
        let cmd = MetaCmd::Bind(BindingDecl {
            vhost: vhost.to_owned(),
            source: source.to_owned(),
            destination,
            routing_key: item
                .get("routing_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            arguments: arguments_of(item).map_err(|e| e.context(&what))?,
            by: None,
        });
        apply(broker, cmd, &what).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
