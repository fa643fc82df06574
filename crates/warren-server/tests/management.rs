//! The management HTTP API against a real two-node cluster: basic authentication and tags,
//! the overview, vhosts, users, permissions, policies and queues with RabbitMQ's paths and
//! JSON shapes; a change through one node is visible through the other, and a user created
//! over HTTP logs in over AMQP.

mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use support::run;

const ADMIN: Option<(&str, &str)> = Some(("guest", "guest"));

fn call(
    cluster: &support::cluster::Cluster,
    node: usize,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, _, text) =
        support::http_request(cluster.http_addr(node), method, path, ADMIN, body);
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
    };
    (status, value)
}

#[test]
fn the_management_api_reads_and_changes_the_cluster() {
    let Some(cluster) = support::cluster::cluster("management_api", 2) else {
        return;
    };
    run(async {
        // Credentials are required and checked.
        let (status, head, _) =
            support::http_request(cluster.http_addr(1), "GET", "/api/overview", None, None);
        assert_eq!(status, 401);
        assert!(
            head.to_ascii_lowercase().contains("www-authenticate"),
            "{head}"
        );
        let (status, _, _) = support::http_request(
            cluster.http_addr(1),
            "GET",
            "/api/overview",
            Some(("guest", "wrong")),
            None,
        );
        assert_eq!(status, 401);

        let (conn, ch) = support::open(&cluster.url(1)).await;
        let q = support::unique("mgmt");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        let _ = conn.close(200, "bye".into()).await;

        let (status, overview) = call(&cluster, 1, "GET", "/api/overview", None);
        assert_eq!(status, 200, "{overview}");
        assert!(
            overview["object_totals"]["queues"].as_u64() >= Some(1),
            "{overview}"
        );
        let (_, nodes) = call(&cluster, 1, "GET", "/api/nodes", None);
        assert_eq!(nodes.as_array().map(Vec::len), Some(2), "{nodes}");

        // The queue, as RabbitMQ describes a quorum queue; through the other node too.
        let path = format!("/api/queues/%2F/{q}");
        let (status, queue) = call(&cluster, 2, "GET", &path, None);
        assert_eq!(status, 200, "{queue}");
        assert_eq!(queue["name"], Value::from(q.as_str()));
        assert_eq!(queue["vhost"], Value::from("/"));
        assert_eq!(queue["type"], Value::from("quorum"));
        assert_eq!(queue["durable"], Value::from(true));
        let (_, all) = call(&cluster, 2, "GET", "/api/queues", None);
        assert!(
            all.as_array()
                .is_some_and(|a| a.iter().any(|x| x["name"] == q.as_str()))
        );
        let (status, _) = call(&cluster, 1, "GET", "/api/queues/%2F/no-such-queue", None);
        assert_eq!(status, 404);

        // A vhost, a user and its permissions, created through node 1.
        let (status, body) = call(&cluster, 1, "PUT", "/api/vhosts/shop", None);
        assert_eq!(status, 204, "{body}");
        let (status, body) = call(
            &cluster,
            1,
            "PUT",
            "/api/users/clerk",
            Some(r#"{"password": "pw", "tags": "monitoring"}"#),
        );
        assert_eq!(status, 204, "{body}");
        let (status, body) = call(
            &cluster,
            1,
            "PUT",
            "/api/permissions/shop/clerk",
            Some(r#"{"configure": ".*", "write": ".*", "read": ".*"}"#),
        );
        assert_eq!(status, 204, "{body}");
        let (status, body) = call(
            &cluster,
            1,
            "PUT",
            "/api/permissions/shop/clerk",
            Some(r#"{"configure": "(", "write": "", "read": ""}"#),
        );
        assert_eq!(status, 400, "a broken expression is refused: {body}");
        let (_, vhosts) = call(&cluster, 2, "GET", "/api/vhosts", None);
        assert!(
            vhosts
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v["name"] == "shop"))
        );
        let (_, perms) = call(&cluster, 2, "GET", "/api/permissions/shop/clerk", None);
        assert_eq!(perms["configure"], Value::from(".*"), "{perms}");

        // The user logs in over AMQP; as `monitoring` it may read the API but not change it.
        let url = support::with_credentials(&cluster.url(2), "clerk", "pw");
        let url = format!("{}/shop", url.rsplit_once('/').expect("vhost").0);
        let clerk = support::connect(&url).await;
        let _ = clerk.close(200, "bye".into()).await;
        let clerk_auth = Some(("clerk", "pw"));
        let (status, _, _) =
            support::http_request(cluster.http_addr(2), "GET", "/api/whoami", clerk_auth, None);
        assert_eq!(status, 200);
        let (status, _, _) = support::http_request(
            cluster.http_addr(2),
            "PUT",
            "/api/vhosts/x",
            clerk_auth,
            None,
        );
        assert_eq!(status, 401, "monitoring cannot change things");

        // A policy; then clean-up through the API.
        let (status, body) = call(
            &cluster,
            2,
            "PUT",
            "/api/policies/shop/ttl",
            Some(
                r#"{"pattern": "^orders", "definition": {"message-ttl": 60000}, "priority": 1, "apply-to": "queues"}"#,
            ),
        );
        assert_eq!(status, 204, "{body}");
        let (_, policy) = call(&cluster, 1, "GET", "/api/policies/shop/ttl", None);
        assert_eq!(
            policy["definition"]["message-ttl"],
            Value::from(60000),
            "{policy}"
        );
        let (status, body) = call(
            &cluster,
            2,
            "PUT",
            "/api/policies/shop/bad",
            Some(r#"{"pattern": ".*", "definition": {"max-priority": 3}}"#),
        );
        assert_eq!(status, 400, "{body}");
        assert_eq!(call(&cluster, 1, "DELETE", &path, None).0, 204);
        assert_eq!(call(&cluster, 1, "GET", &path, None).0, 404);
        assert_eq!(call(&cluster, 1, "DELETE", "/api/users/clerk", None).0, 204);
        assert_eq!(call(&cluster, 1, "DELETE", "/api/vhosts/shop", None).0, 204);
    });
}
