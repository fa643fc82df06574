//! The management HTTP API: the part of RabbitMQ's `/api` that tools and scripts use most,
//! with the same paths and JSON shapes — overview, nodes, vhosts, users, permissions,
//! policies, queues, exchanges and bindings — behind HTTP basic authentication.
//!
//! It is served by `http` next to `/metrics`. Reads come from this node's copy of the
//! metadata (`warren_core::meta`) and its queue counters; changes are metadata commands
//! written through the node (`warren_cluster::Node::meta_write`), so they hold cluster-wide.
//! Users tagged `administrator` may change things; `monitoring` and `management` may read.
//! Users from the configuration file authenticate as in AMQP (`auth`). Connections are
//! gathered from every reachable node (`connections`); definitions export and import live
//! in `definitions`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::{Value, json};
use tracing::debug;
use warren_cluster::ClusterError;
use warren_codec::FieldTable;
use warren_core::json::{table_from_json, table_to_json};
use warren_core::meta::{
    Binding, BindingDecl, Destination, ExchangeDecl, ExchangeDef, MetaCmd, MetaReply, MetaState,
    Permissions, Placement, Policy, QueueDef,
};
use warren_core::queue::QueueCmd;

use crate::auth::Principal;
use crate::broker::{Broker, QueueOptions};
use crate::connections::ServiceRequest;
use crate::rates::NodeFigures;

pub(crate) type Reply = Result<Response, ApiError>;

pub fn router() -> Router<Arc<Broker>> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/nodes", get(nodes))
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/users", get(users))
        .route(
            "/api/users/{user}",
            get(user).put(put_user).delete(delete_user),
        )
        .route("/api/permissions", get(permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(policies_in))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policy).put(put_policy).delete(delete_policy),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).put(put_queue).delete(delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route(
            "/api/queues/{vhost}/{name}/get",
            axum::routing::post(crate::messages_api::get),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            axum::routing::post(crate::messages_api::publish),
        )
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange).put(put_exchange).delete(delete_exchange),
        )
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(bindings_between).post(post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(binding).delete(delete_binding),
        )
        .route("/api/connections", get(connections))
        .route("/api/channels", get(channels))
        .route("/api/vhosts/{vhost}/channels", get(channels_in))
        .route("/api/connections/{name}/channels", get(channels_of))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers_in))
        .route("/api/vhosts/{vhost}/connections", get(connections_in))
        .route(
            "/api/connections/{name}",
            get(connection).delete(close_connection),
        )
        .route(
            "/api/definitions",
            get(crate::definitions::export_all).post(crate::definitions::import_all),
        )
        .route(
            "/api/definitions/{vhost}",
            get(crate::definitions::export_vhost).post(crate::definitions::import_vhost),
        )
}

#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl ApiError {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, what.into())
    }

    /// The cluster could not do it now (no leader, a node unreachable): try again.
    pub(crate) fn unavailable(why: impl Into<String>) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, why.into())
    }

    /// The same error, its text prefixed with what it was about.
    pub(crate) fn context(self, what: &str) -> Self {
        ApiError(self.0, format!("{what}: {}", self.1))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.0,
            Json(json!({"error": error_name(self.0), "reason": self.1})),
        )
            .into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"Warren Management\""),
            );
        }
        response
    }
}

fn error_name(code: StatusCode) -> &'static str {
    match code {
        StatusCode::UNAUTHORIZED => "not_authorised",
        StatusCode::NOT_FOUND => "Object Not Found",
        StatusCode::BAD_REQUEST => "bad_request",
        _ => "error",
    }
}

pub(crate) fn bad(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

fn not_found(what: impl Into<String>) -> ApiError {
    ApiError::not_found(what)
}

/// Checks HTTP basic credentials; changes need the `administrator` tag, reads any
/// management tag.
fn authorise(
    broker: &Broker,
    headers: &HeaderMap,
    peer: SocketAddr,
    write: bool,
) -> Result<Principal, ApiError> {
    let unauthorised = |why: &str| ApiError(StatusCode::UNAUTHORIZED, why.to_owned());
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorised("credentials required"))?;
    let encoded = value
        .strip_prefix("Basic ")
        .ok_or_else(|| unauthorised("basic authentication required"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| unauthorised("malformed credentials"))?;
    let (name, password) = decoded
        .split_once(':')
        .ok_or_else(|| unauthorised("malformed credentials"))?;
    let node = broker.node.clone();
    let principal = broker
        .auth
        .check_password("basic", name.to_owned(), password, peer.ip(), |n| {
            node.meta().user(n).cloned()
        })
        .map_err(|e| unauthorised(&e.to_string()))?;
    let has = |tag: &str| principal.tags.iter().any(|t| t == tag);
    let allowed = if write {
        has("administrator")
    } else {
        has("administrator") || has("monitoring") || has("management")
    };
    if !allowed {
        return Err(unauthorised(&format!(
            "user '{}' has no management tag that allows this",
            principal.name
        )));
    }
    Ok(principal)
}

/// The authorised caller of a request: reads need a management tag, changes
/// `administrator`.
pub(crate) struct Auth(Principal);

impl FromRequestParts<Arc<Broker>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        broker: &Arc<Broker>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no peer address".into()))?;
        let write = parts.method != Method::GET;
        authorise(broker, &parts.headers, peer, write).map(Auth)
    }
}

/// Writes a metadata command; a refusal is 404 or 400, no answer from the cluster 503.
pub(crate) async fn write_reply(broker: &Broker, cmd: MetaCmd) -> Result<MetaReply, ApiError> {
    match broker.node.meta_write(cmd).await {
        Ok(MetaReply::Error(e)) => Err(match e.code {
            404 => not_found(e.text),
            _ => bad(e.text),
        }),
        Ok(reply) => Ok(reply),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

pub(crate) async fn write(broker: &Broker, cmd: MetaCmd) -> Reply {
    write_reply(broker, cmd)
        .await
        .map(|_| StatusCode::NO_CONTENT.into_response())
}

/// How long a request waits for a queue (a purge, a publish, a get): a queue without a
/// leader (a minority, its replicas down) would otherwise hold it for as long as that lasts.
pub(crate) const QUEUE_ANSWER: Duration = Duration::from_secs(15);

/// The HTTP answer to a queue command that failed.
pub(crate) fn queue_failure(e: ClusterError) -> ApiError {
    match e {
        ClusterError::QueueGone(_) | ClusterError::QueueUnavailable(_) => {
            ApiError::not_found(e.to_string())
        }
        other => ApiError::unavailable(other.to_string()),
    }
}

pub(crate) fn ok(v: Value) -> Reply {
    Ok(Json(v).into_response())
}

/// Every reachable node's message figures, added up: the cluster's totals and per queue id.
async fn cluster_figures(broker: &Broker) -> NodeFigures {
    let mut sum = NodeFigures::default();
    for answer in ask_every_node(broker, &ServiceRequest::MessageStats)
        .await
        .0
    {
        let Ok(node) = serde_json::from_value::<NodeFigures>(answer) else {
            continue;
        };
        sum.total.add(&node.total);
        for (queue, figures) in node.queues {
            sum.queues.entry(queue).or_default().add(&figures);
        }
    }
    sum
}

async fn overview(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let figures = cluster_figures(&broker).await;
    let meta = broker.node.meta();
    let handles = broker.node.queue_handles();
    let (mut ready, mut unacked, mut consumers) = (0u64, 0u64, 0u64);
    for h in &handles {
        let s = h.stats();
        ready += s.ready;
        unacked += s.unacked;
        consumers += s.consumers;
    }
    let metrics = &broker.metrics;
    ok(json!({
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "management_version": env!("CARGO_PKG_VERSION"),
        "node": node_name(broker.node.id()),
        "object_totals": {
            "connections": metrics.connections.load(std::sync::atomic::Ordering::Relaxed),
            "channels": metrics.channels.load(std::sync::atomic::Ordering::Relaxed),
            "exchanges": meta.exchanges().count(),
            "queues": meta.queues().count(),
            "consumers": consumers,
        },
        "message_stats": figures.total.to_json(),
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
    }))
}

async fn whoami(State(_broker): State<Arc<Broker>>, Auth(principal): Auth) -> Reply {
    ok(json!({"name": principal.name, "tags": principal.tags.join(",")}))
}

async fn nodes(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let down = broker.node.down_nodes();
    let list: Vec<Value> = broker
        .node
        .members()
        .into_iter()
        .map(|(id, addr)| {
            json!({"name": node_name(id), "cluster_address": addr, "running": !down.contains(&id)})
        })
        .collect();
    ok(Value::Array(list))
}

pub(crate) fn node_name(id: u64) -> String {
    format!("warren@{id}")
}

async fn vhosts(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let meta = broker.node.meta();
    ok(Value::Array(
        meta.vhost_names().map(|v| json!({"name": v})).collect(),
    ))
}

async fn vhost(State(broker): State<Arc<Broker>>, _auth: Auth, Path(name): Path<String>) -> Reply {
    if broker.node.meta().vhost_exists(&name) {
        ok(json!({"name": name}))
    } else {
        Err(not_found(format!("no vhost '{name}'")))
    }
}

async fn put_vhost(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Reply {
    write(&broker, MetaCmd::AddVhost { name }).await
}

async fn delete_vhost(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Reply {
    write(&broker, MetaCmd::DeleteVhost { name }).await
}

fn user_json(name: &str, tags: &[String]) -> Value {
    json!({"name": name, "tags": tags.join(",")})
}

async fn users(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let meta = broker.node.meta();
    let mut list: Vec<Value> = broker
        .config
        .users
        .iter()
        .map(|u| user_json(&u.name, &u.tags))
        .collect();
    list.extend(meta.users().map(|u| user_json(&u.name, &u.tags)));
    ok(Value::Array(list))
}

async fn user(State(broker): State<Arc<Broker>>, _auth: Auth, Path(name): Path<String>) -> Reply {
    if let Some(u) = broker.config.users.iter().find(|u| u.name == name) {
        return ok(user_json(&u.name, &u.tags));
    }
    match broker.node.meta().user(&name) {
        Some(u) => ok(user_json(&u.name, &u.tags)),
        None => Err(not_found(format!("no user '{name}'"))),
    }
}

/// Tags as RabbitMQ takes them: a comma-separated string or a list.
pub(crate) fn tags_of(body: &Value) -> Vec<String> {
    match body.get("tags") {
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

async fn put_user(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Reply {
    if broker.config.users.iter().any(|u| u.name == name) {
        return Err(bad(format!(
            "user '{name}' comes from the configuration file and cannot be changed here"
        )));
    }
    let password_hash = match (body.get("password"), body.get("password_hash")) {
        (Some(Value::String(p)), _) => warren_core::meta::password_hash(rand::random(), p),
        (None, Some(Value::String(h))) => {
            crate::auth::decode_password_hash(h).map_err(|e| bad(format!("password_hash: {e}")))?;
            h.clone()
        }
        _ => return Err(bad("a password or password_hash is required")),
    };
    write(
        &broker,
        MetaCmd::PutUser {
            name,
            password_hash,
            tags: tags_of(&body),
        },
    )
    .await
}

async fn delete_user(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Reply {
    write(&broker, MetaCmd::DeleteUser { name }).await
}

pub(crate) fn permission_json(user: &str, vhost: &str, p: &Permissions) -> Value {
    json!({"user": user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read})
}

async fn permissions(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let meta = broker.node.meta();
    ok(Value::Array(
        meta.all_permissions()
            .map(|(u, v, p)| permission_json(u, v, p))
            .collect(),
    ))
}

async fn permission(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, user)): Path<(String, String)>,
) -> Reply {
    match broker.node.meta().permissions(&user, &vhost) {
        Some(p) => ok(permission_json(&user, &vhost, p)),
        None => Err(not_found(format!(
            "no permissions of '{user}' in vhost '{vhost}'"
        ))),
    }
}

/// Permissions as the API (and a definitions file) gives them: three regular expressions,
/// each checked before anything is written.
pub(crate) fn permissions_from_json(body: &Value) -> Result<Permissions, ApiError> {
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("'{k}' (a regular expression) is required")))
    };
    let permissions = Permissions {
        configure: field("configure")?,
        write: field("write")?,
        read: field("read")?,
    };
    for (what, expr) in [
        ("configure", &permissions.configure),
        ("write", &permissions.write),
        ("read", &permissions.read),
    ] {
        if !expr.is_empty() {
            regex::Regex::new(expr).map_err(|e| bad(format!("invalid {what} permission: {e}")))?;
        }
    }
    Ok(permissions)
}

async fn put_permission(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, user)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Reply {
    let permissions = permissions_from_json(&body)?;
    write(
        &broker,
        MetaCmd::SetPermissions {
            user,
            vhost,
            permissions,
        },
    )
    .await
}

async fn delete_permission(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, user)): Path<(String, String)>,
) -> Reply {
    write(&broker, MetaCmd::ClearPermissions { user, vhost }).await
}

pub(crate) fn policy_json(vhost: &str, p: &Policy) -> Value {
    json!({
        "vhost": vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to,
        "priority": p.priority,
        "definition": table_to_json(&p.definition),
    })
}

async fn policies(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    let meta = broker.node.meta();
    ok(Value::Array(
        meta.policies().map(|(v, p)| policy_json(v, p)).collect(),
    ))
}

async fn policies_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    let meta = broker.node.meta();
    ok(Value::Array(
        meta.policies()
            .filter(|(v, _)| *v == vhost)
            .map(|(v, p)| policy_json(v, p))
            .collect(),
    ))
}

async fn policy(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    let meta = broker.node.meta();
    meta.policies()
        .find(|(v, p)| *v == vhost && p.name == name)
        .map(|(v, p)| policy_json(v, p))
        .map_or_else(
            || Err(not_found(format!("no policy '{name}' in vhost '{vhost}'"))),
            ok,
        )
}

/// A policy as the API (and a definitions file) gives it; the metadata checks the rest.
pub(crate) fn policy_from_json(name: String, body: &Value) -> Result<Policy, ApiError> {
    let pattern = body
        .get("pattern")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'pattern' is required"))?
        .to_owned();
    let definition = table_from_json(body.get("definition").unwrap_or(&Value::Null))
        .map_err(|e| bad(format!("definition: {e}")))?;
    Ok(Policy {
        name,
        pattern,
        apply_to: body
            .get("apply-to")
            .and_then(Value::as_str)
            .unwrap_or("all")
            .to_owned(),
        priority: body.get("priority").and_then(Value::as_i64).unwrap_or(0),
        definition,
    })
}

async fn put_policy(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Reply {
    let policy = policy_from_json(name, &body)?;
    write(&broker, MetaCmd::SetPolicy { vhost, policy }).await
}

async fn delete_policy(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    write(&broker, MetaCmd::ClearPolicy { vhost, name }).await
}

fn queue_json(
    broker: &Broker,
    meta: &MetaState,
    vhost: &str,
    q: &QueueDef,
    figures: &NodeFigures,
) -> Value {
    let stats = broker
        .node
        .queue(vhost, &q.name)
        .map(|h| h.stats())
        .unwrap_or_default();
    let (kind, node, members) = match &q.placement {
        Placement::Replicated { replicas, .. } => (
            "quorum",
            replicas.first().map(|n| node_name(*n)),
            replicas.iter().map(|n| node_name(*n)).collect::<Vec<_>>(),
        ),
        Placement::Local { run } => (
            "classic",
            Some(node_name(run.node)),
            vec![node_name(run.node)],
        ),
    };
    json!({
        "name": q.name,
        "vhost": vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.arguments),
        "type": kind,
        "node": node,
        "members": members,
        "state": "running",
        "messages": stats.ready + stats.unacked,
        "messages_ready": stats.ready,
        "messages_unacknowledged": stats.unacked,
        "consumers": stats.consumers,
        "policy": meta.policy_for(vhost, &q.name).map(|p| p.name.clone()),
        "message_stats": figures.queues.get(&q.id).copied().unwrap_or_default().to_json(),
    })
}

async fn queue_list(broker: &Broker, only: Option<&str>) -> Value {
    let figures = cluster_figures(broker).await;
    let meta = broker.node.meta();
    Value::Array(
        meta.queues()
            .filter(|(v, _)| only.is_none_or(|o| o == *v))
            .map(|(v, q)| queue_json(broker, &meta, v, q, &figures))
            .collect(),
    )
}

async fn queues(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    ok(queue_list(&broker, None).await)
}

async fn queues_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    ok(queue_list(&broker, Some(&vhost)).await)
}

async fn queue(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    let def = broker.node.meta().queue(&vhost, &name).cloned();
    let figures = cluster_figures(&broker).await;
    match def {
        Some(q) => ok(queue_json(
            &broker,
            &broker.node.meta(),
            &vhost,
            &q,
            &figures,
        )),
        None => Err(not_found(format!("no queue '{name}' in vhost '{vhost}'"))),
    }
}

async fn delete_queue(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    if broker.node.meta().queue(&vhost, &name).is_none() {
        return Err(not_found(format!("no queue '{name}' in vhost '{vhost}'")));
    }
    write(
        &broker,
        MetaCmd::DeleteQueue {
            vhost,
            name,
            by: None,
        },
    )
    .await
}

fn exchange_list(broker: &Broker, only: Option<&str>) -> Value {
    let meta = broker.node.meta();
    Value::Array(
        meta.exchanges()
            .filter(|(v, _)| only.is_none_or(|o| o == *v))
            .map(|(v, e)| exchange_json(v, e))
            .collect(),
    )
}

async fn exchanges(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    ok(exchange_list(&broker, None))
}

async fn exchanges_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    ok(exchange_list(&broker, Some(&vhost)))
}

pub(crate) fn binding_json(vhost: &str, b: &Binding) -> Value {
    let (destination, kind) = match &b.destination {
        Destination::Queue(q) => (q.as_str(), "queue"),
        Destination::Exchange(e) => (e.as_str(), "exchange"),
    };
    json!({
        "source": b.source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": kind,
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key(&b.routing_key, &b.arguments),
    })
}

fn binding_list(broker: &Broker, only: Option<&str>) -> Value {
    let meta = broker.node.meta();
    Value::Array(
        meta.bindings()
            .filter(|(v, _)| only.is_none_or(|o| o == *v))
            .map(|(v, b)| binding_json(v, b))
            .collect(),
    )
}

async fn bindings(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    ok(binding_list(&broker, None))
}

async fn bindings_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    ok(binding_list(&broker, Some(&vhost)))
}

/// A request body as JSON; an empty body is an empty object (RabbitMQ's defaults apply).
pub(crate) fn json_body(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("body is not JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(bad("body must be a JSON object"))
    }
}

pub(crate) fn flag(body: &Value, key: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(other) => Err(bad(format!("'{key}' must be true or false, not {other}"))),
    }
}

pub(crate) fn arguments_of(body: &Value) -> Result<FieldTable, ApiError> {
    match body.get("arguments") {
        None | Some(Value::Null) => Ok(FieldTable::new()),
        Some(v) => table_from_json(v).map_err(|e| bad(format!("arguments: {e}"))),
    }
}

/// Declares a queue (RabbitMQ's `PUT /api/queues/{vhost}/{name}`): 201 when created, 204
/// when an equivalent queue was there already, 400 when one with other settings is.
async fn put_queue(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    if name.is_empty() || name.starts_with("amq.") {
        return Err(bad(format!("queue name '{name}' is reserved")));
    }
    let options = QueueOptions {
        durable: flag(&body, "durable", true)?,
        auto_delete: flag(&body, "auto_delete", false)?,
        exclusive_owner: None,
    };
    let cmd = broker
        .queue_declaration(&vhost, &name, options, arguments_of(&body)?)
        .map_err(|e| bad(e.text))?;
    let created = match write_reply(&broker, cmd).await? {
        MetaReply::QueueDeclared { created, .. } => created,
        _ => false,
    };
    // Submitted with the declaration's answer; its own answer is not waited for.
    drop(broker.touch_on_declare(&vhost, &name));
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
    .into_response())
}

/// Purges a queue (`DELETE /api/queues/{vhost}/{name}/contents`).
async fn purge_queue(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    let handle = broker
        .node
        .queue(&vhost, &name)
        .ok_or_else(|| not_found(format!("no queue '{name}' in vhost '{vhost}'")))?;
    match tokio::time::timeout(QUEUE_ANSWER, handle.call(QueueCmd::Purge, None)).await {
        Ok(Ok(_)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(e)) => Err(queue_failure(e)),
        Err(_) => Err(ApiError::unavailable(format!(
            "queue '{name}' did not answer within {QUEUE_ANSWER:?} (no leader?)"
        ))),
    }
}

/// The bindings whose destination is the queue, the default exchange's implicit one first,
/// as RabbitMQ lists them.
async fn queue_bindings(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    let meta = broker.node.meta();
    if meta.queue(&vhost, &name).is_none() {
        return Err(not_found(format!("no queue '{name}' in vhost '{vhost}'")));
    }
    let implicit = Binding {
        source: String::new(),
        destination: Destination::Queue(name.clone()),
        routing_key: name.clone(),
        arguments: FieldTable::new(),
    };
    let mut list = vec![binding_json(&vhost, &implicit)];
    list.extend(
        meta.bindings()
            .filter(|(v, b)| *v == vhost && b.destination == Destination::Queue(name.clone()))
            .map(|(v, b)| binding_json(v, b)),
    );
    ok(Value::Array(list))
}

pub(crate) fn exchange_json(vhost: &str, e: &ExchangeDef) -> Value {
    json!({
        "name": e.name,
        "vhost": vhost,
        "type": e.kind.as_str(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": table_to_json(&e.arguments),
    })
}

async fn exchange(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    let meta = broker.node.meta();
    match meta.exchange(&vhost, &name) {
        Some(e) => ok(exchange_json(&vhost, e)),
        None => Err(not_found(format!(
            "no exchange '{name}' in vhost '{vhost}'"
        ))),
    }
}

/// The declaration of an exchange from a management request body (`type` is required).
pub(crate) fn exchange_declaration(
    broker: &Broker,
    vhost: &str,
    name: &str,
    body: &Value,
) -> Result<MetaCmd, ApiError> {
    let kind = body
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'type' is required"))?;
    Ok(MetaCmd::DeclareExchange(ExchangeDecl {
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        kind: kind.to_owned(),
        durable: flag(body, "durable", true)?,
        auto_delete: flag(body, "auto_delete", false)?,
        internal: flag(body, "internal", false)?,
        arguments: arguments_of(body)?,
        declared_by: broker.node.run(),
    }))
}

/// Declares an exchange (`PUT /api/exchanges/{vhost}/{name}`): 201 when created, 204 when an
/// equivalent one was there.
async fn put_exchange(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    let existed = broker.node.meta().exchange(&vhost, &name).is_some();
    write(
        &broker,
        exchange_declaration(&broker, &vhost, &name, &body)?,
    )
    .await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    }
    .into_response())
}

async fn delete_exchange(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
) -> Reply {
    if broker.node.meta().exchange(&vhost, &name).is_none() {
        return Err(not_found(format!(
            "no exchange '{name}' in vhost '{vhost}'"
        )));
    }
    write(
        &broker,
        MetaCmd::DeleteExchange {
            vhost,
            name,
            if_unused: false,
        },
    )
    .await
}

/// What identifies a binding in the API's paths, among the bindings between the same
/// source and destination: the routing key (`~` when empty), and with arguments a digest of
/// them after a `~`.
pub(crate) fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    use sha2::Digest;
    // `~` separates the parts, so the routing key's own `%` and `~` are escaped (as
    // RabbitMQ does): the empty key (`~`) and a key `~` (`%7E`) stay apart.
    let routing_key = routing_key.replace('%', "%25").replace('~', "%7E");
    if arguments.is_empty() {
        return if routing_key.is_empty() {
            "~".to_owned()
        } else {
            routing_key
        };
    }
    // serde_json's objects are sorted maps, so equal tables give equal text.
    let digest = sha2::Sha256::digest(table_to_json(arguments).to_string().as_bytes());
    format!(
        "{routing_key}~{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..6])
    )
}

fn binding_destination(kind: &str, name: String) -> Result<Destination, ApiError> {
    match kind {
        "q" => Ok(Destination::Queue(name)),
        "e" => Ok(Destination::Exchange(name)),
        other => Err(not_found(format!(
            "'{other}': a binding's destination is 'q' (queue) or 'e' (exchange)"
        ))),
    }
}

fn bindings_from_to(
    broker: &Broker,
    vhost: &str,
    source: &str,
    destination: &Destination,
) -> Vec<Binding> {
    broker
        .node
        .meta()
        .bindings()
        .filter(|(v, b)| *v == vhost && b.source == source && b.destination == *destination)
        .map(|(_, b)| b.clone())
        .collect()
}

async fn bindings_between(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
) -> Reply {
    let destination = binding_destination(&kind, destination)?;
    ok(Value::Array(
        bindings_from_to(&broker, &vhost, &source, &destination)
            .iter()
            .map(|b| binding_json(&vhost, b))
            .collect(),
    ))
}

/// Binds (`POST /api/bindings/{vhost}/e/{source}/q|e/{destination}`): 201 with the new
/// binding's path in `Location`.
async fn post_binding(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    let destination_name = destination.clone();
    let destination = binding_destination(&kind, destination)?;
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let arguments = arguments_of(&body)?;
    let props = properties_key(&routing_key, &arguments);
    write(
        &broker,
        MetaCmd::Bind(BindingDecl {
            vhost,
            source,
            destination,
            routing_key,
            arguments,
            by: None,
        }),
    )
    .await?;
    let mut response = StatusCode::CREATED.into_response();
    // Relative to the request's path, whose last segment is the destination.
    let location = format!(
        "{}/{}",
        percent_encode(&destination_name),
        percent_encode(&props)
    );
    if let Ok(location) = header::HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Percent-encodes what is not unreserved in a path segment.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn find_binding(
    broker: &Broker,
    vhost: &str,
    source: &str,
    destination: &Destination,
    props: &str,
) -> Result<Binding, ApiError> {
    bindings_from_to(broker, vhost, source, destination)
        .into_iter()
        .find(|b| properties_key(&b.routing_key, &b.arguments) == props)
        .ok_or_else(|| not_found(format!("no binding '{props}' from '{source}'")))
}

async fn binding(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> Reply {
    let destination = binding_destination(&kind, destination)?;
    let b = find_binding(&broker, &vhost, &source, &destination, &props)?;
    ok(binding_json(&vhost, &b))
}

async fn delete_binding(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> Reply {
    let destination = binding_destination(&kind, destination)?;
    let b = find_binding(&broker, &vhost, &source, &destination, &props)?;
    write(
        &broker,
        MetaCmd::Unbind(BindingDecl {
            vhost,
            source: b.source,
            destination: b.destination,
            routing_key: b.routing_key,
            arguments: b.arguments,
            by: None,
        }),
    )
    .await
}

/// How long the API waits for another node's answer about its connections.
const PEER_ANSWER: Duration = Duration::from_secs(2);

/// Asks every running member (this node directly) and returns the answers that came, and
/// how many nodes did not answer.
async fn ask_every_node(broker: &Broker, request: &ServiceRequest) -> (Vec<Value>, usize) {
    let Ok(payload) = serde_json::to_vec(request) else {
        return (Vec::new(), 0);
    };
    let down = broker.node.down_nodes();
    let asks = broker
        .node
        .members()
        .into_keys()
        .filter(|n| !down.contains(n))
        .map(|n| {
            let payload = payload.clone();
            async move {
                let ask = broker.node.ask_service(n, payload, PEER_ANSWER);
                match tokio::time::timeout(PEER_ANSWER, ask).await {
                    Ok(Ok(bytes)) => serde_json::from_slice::<Value>(&bytes).ok(),
                    Ok(Err(e)) => {
                        debug!(node = n, error = %e, "no answer from a node");
                        None
                    }
                    Err(_) => {
                        debug!(node = n, "no answer from a node in time");
                        None
                    }
                }
            }
        });
    let answers: Vec<Option<Value>> = futures::future::join_all(asks).await;
    let missing = answers.iter().filter(|a| a.is_none()).count();
    (answers.into_iter().flatten().collect(), missing)
}

/// The client connections of every reachable node, as RabbitMQ lists its cluster's.
async fn cluster_connections(broker: &Broker, only: Option<&str>) -> Vec<Value> {
    cluster_list(broker, ServiceRequest::ListConnections)
        .await
        .into_iter()
        .filter(|c| only.is_none_or(|v| c["vhost"] == v))
        .collect()
}

/// The items of every reachable node's answer to a listing request.
async fn cluster_list(broker: &Broker, request: ServiceRequest) -> Vec<Value> {
    ask_every_node(broker, &request)
        .await
        .0
        .into_iter()
        .filter_map(|answer| match answer {
            Value::Array(list) => Some(list),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The items of a cluster listing that `keep` accepts, as the API's answer.
async fn cluster_list_where(
    broker: &Broker,
    request: ServiceRequest,
    keep: impl Fn(&Value) -> bool,
) -> Reply {
    let list = cluster_list(broker, request).await;
    ok(Value::Array(list.into_iter().filter(|v| keep(v)).collect()))
}

async fn channels(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    cluster_list_where(&broker, ServiceRequest::ListChannels, |_| true).await
}

async fn channels_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    cluster_list_where(&broker, ServiceRequest::ListChannels, |c| {
        c["vhost"] == vhost.as_str()
    })
    .await
}

async fn channels_of(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Reply {
    cluster_list_where(&broker, ServiceRequest::ListChannels, |c| {
        c["connection_details"]["name"] == name.as_str()
    })
    .await
}

async fn consumers(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    cluster_list_where(&broker, ServiceRequest::ListConsumers, |_| true).await
}

async fn consumers_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    cluster_list_where(&broker, ServiceRequest::ListConsumers, |c| {
        c["queue"]["vhost"] == vhost.as_str()
    })
    .await
}

async fn connections(State(broker): State<Arc<Broker>>, _auth: Auth) -> Reply {
    ok(Value::Array(cluster_connections(&broker, None).await))
}

async fn connections_in(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(vhost): Path<String>,
) -> Reply {
    ok(Value::Array(
        cluster_connections(&broker, Some(&vhost)).await,
    ))
}

async fn connection(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path(name): Path<String>,
) -> Reply {
    cluster_connections(&broker, None)
        .await
        .into_iter()
        .find(|c| c["name"] == name.as_str())
        .map_or_else(|| Err(not_found(format!("no connection '{name}'"))), ok)
}

/// Closes a client connection with 320 CONNECTION_FORCED; the `X-Reason` header, if any,
/// is the text the client gets, as in RabbitMQ.
async fn close_connection(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply {
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin")
        .to_owned();
    let request = ServiceRequest::CloseConnection {
        name: name.clone(),
        reason,
    };
    let (answers, missing) = ask_every_node(&broker, &request).await;
    if answers.contains(&Value::Bool(true)) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else if missing > 0 {
        Err(ApiError::unavailable(format!(
            "connection '{name}' not found, and {missing} node(s) did not answer"
        )))
    } else {
        Err(not_found(format!("no connection '{name}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::{FieldValue, ShortStr};

    #[test]
    fn properties_keys_tell_bindings_apart() {
        let none = FieldTable::new();
        let mut args = FieldTable::new();
        args.insert(ShortStr::from_static("x-match"), FieldValue::Bool(true));
        let keys = [
            properties_key("", &none),
            properties_key("~", &none),
            properties_key("a~b", &none),
            properties_key("a", &args),
            properties_key("a", &none),
            properties_key("100%", &none),
        ];
        assert_eq!(keys[..3], ["~", "%7E", "a%7Eb"]);
        assert_eq!(keys[5], "100%25");
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        assert_eq!(keys[3], properties_key("a", &args.clone()), "stable");
    }
}
