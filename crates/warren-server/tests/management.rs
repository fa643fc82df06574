//! The management HTTP API against a real two-node cluster: basic authentication and tags,
//! the overview, vhosts, users, permissions, policies and queues with RabbitMQ's paths and
//! JSON shapes; a change through one node is visible through the other, and a user created
//! over HTTP logs in over AMQP.

mod support;

use futures::StreamExt;
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

/// Percent-encodes a path segment (connection names hold spaces and `>`).
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[test]
fn any_node_lists_the_clusters_connections_and_closes_one() {
    let Some(cluster) = support::cluster::cluster("management_connections", 2) else {
        return;
    };
    run(async {
        let (conn, _ch) = support::open(&cluster.url(1)).await;
        let (_ch2, ch3) = (support::channel(&conn).await, support::channel(&conn).await);
        let q = support::temp_queue(&ch3, "mgmt-consumed").await;
        ch3.basic_qos(7, lapin::options::BasicQosOptions::default())
            .await
            .expect("basic.qos");
        let _consumer = ch3
            .basic_consume(
                q.as_str().into(),
                "watcher".into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let (status, list) = call(&cluster, 1, "GET", "/api/connections", None);
        assert_eq!(status, 200, "{list}");
        let ours: Vec<&Value> = list
            .as_array()
            .expect("a list")
            .iter()
            .filter(|c| c["user"] == "guest" && c["vhost"] == "/")
            .collect();
        assert_eq!(ours.len(), 1, "{list}");
        let c = ours[0];
        assert_eq!(c["channels"], Value::from(3), "{c}");
        assert_eq!(c["protocol"], Value::from("AMQP 0-9-1"));
        assert_eq!(c["ssl"], Value::from(false));
        assert!(
            c["client_properties"]["product"].is_string(),
            "the client's own properties: {c}"
        );
        let name = c["name"].as_str().expect("a name").to_owned();
        assert!(name.contains(" -> "), "{name}");
        // Its channels and its consumer, as RabbitMQ lists them, from the other node.
        let (status, channels) = call(&cluster, 2, "GET", "/api/channels", None);
        assert_eq!(status, 200, "{channels}");
        let numbers: Vec<&Value> = channels
            .as_array()
            .expect("a list")
            .iter()
            .filter(|c| c["connection_details"]["name"] == name.as_str())
            .map(|c| &c["number"])
            .collect();
        assert_eq!(numbers, [1, 2, 3], "{channels}");
        let of_conn = format!("/api/connections/{}/channels", segment(&name));
        let (_, same) = call(&cluster, 2, "GET", &of_conn, None);
        assert_eq!(same.as_array().map(Vec::len), Some(3), "{same}");
        let (_, consumers) = call(&cluster, 2, "GET", "/api/consumers/%2F", None);
        let watcher = consumers
            .as_array()
            .and_then(|l| l.iter().find(|c| c["consumer_tag"] == "watcher"))
            .unwrap_or_else(|| panic!("the consumer is listed: {consumers}"));
        assert_eq!(watcher["queue"]["name"], Value::from(q.as_str()));
        assert_eq!(watcher["prefetch_count"], Value::from(7));
        assert_eq!(watcher["ack_required"], Value::from(true));
        assert_eq!(watcher["channel_details"]["number"], Value::from(3));
        // Any node lists the whole cluster's connections, each with the node it is on.
        let (_, other) = call(&cluster, 2, "GET", "/api/connections", None);
        assert_eq!(other, list, "node 2 sees node 1's connection");
        assert_eq!(c["node"], Value::from("warren@1"));
        let path = format!("/api/connections/{}", segment(&name));
        let (status, one) = call(&cluster, 2, "GET", &path, None);
        assert_eq!((status, &one["name"]), (200, &Value::from(name.as_str())));

        // An operator closes it: the client hears 320 with the reason given.
        let mut events = conn.events_listener();
        // Closed through the other node.
        let (status, _, body) = support::http_request_with_headers(
            cluster.http_addr(2),
            "DELETE",
            &path,
            ADMIN,
            None,
            &[("X-Reason", "maintenance window")],
        );
        assert_eq!(status, 204, "{body}");
        let err = support::within("the forced close", async {
            loop {
                match events.next().await {
                    Some(lapin::Event::Error(e)) => return e,
                    Some(_) => {}
                    None => panic!("the connection's events ended without an error"),
                }
            }
        })
        .await;
        assert_eq!(support::reply_code(&err), Some(320), "{err}");
        assert!(err.to_string().contains("maintenance window"), "{err}");
        support::eventually(
            "the closed connection leaves the list",
            std::time::Duration::from_secs(10),
            || async { call(&cluster, 1, "GET", &path, None).0 == 404 },
        )
        .await;
        assert_eq!(call(&cluster, 2, "DELETE", &path, None).0, 404);
    });
}

#[test]
fn topology_made_over_http_survives_export_and_import() {
    let Some(cluster) = support::cluster::cluster("management_definitions", 2) else {
        return;
    };
    run(async {
        let q = support::unique("defs-q");
        let x = support::unique("defs-x");
        let queue_path = format!("/api/queues/%2F/{q}");
        let exchange_path = format!("/api/exchanges/%2F/{x}");
        // Queue and exchange declared over HTTP: created, then already there.
        let queue_body = r#"{"durable": true, "arguments": {"x-max-length": 100}}"#;
        assert_eq!(
            call(&cluster, 1, "PUT", &queue_path, Some(queue_body)).0,
            201
        );
        assert_eq!(
            call(&cluster, 2, "PUT", &queue_path, Some(queue_body)).0,
            204
        );
        let (status, body) = call(
            &cluster,
            1,
            "PUT",
            &queue_path,
            Some(r#"{"arguments": {"x-max-length": 5}}"#),
        );
        assert_eq!(status, 400, "other arguments are refused: {body}");
        let (status, body) = call(
            &cluster,
            1,
            "PUT",
            "/api/queues/%2F/bad-ttl",
            Some(r#"{"arguments": {"x-message-ttl": -1}}"#),
        );
        assert_eq!(status, 400, "{body}");
        let (status, body) = call(&cluster, 1, "PUT", &exchange_path, Some("{}"));
        assert_eq!(status, 400, "an exchange needs a type: {body}");
        let exchange_body = r#"{"type": "topic", "durable": true}"#;
        assert_eq!(
            call(&cluster, 1, "PUT", &exchange_path, Some(exchange_body)).0,
            201
        );
        let (_, exchange) = call(&cluster, 2, "GET", &exchange_path, None);
        assert_eq!(exchange["type"], Value::from("topic"), "{exchange}");

        // A binding, found again by the key in its Location.
        let bindings = format!("/api/bindings/%2F/e/{x}/q/{q}");
        let (status, head, body) = support::http_request(
            cluster.http_addr(1),
            "POST",
            &bindings,
            ADMIN,
            Some(r#"{"routing_key": "orders.*", "arguments": {}}"#),
        );
        assert_eq!(status, 201, "{body}");
        let location = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_owned())
            })
            .expect("a Location header");
        // Resolved as a URL reference against the POST's path, whose last segment goes.
        let base = bindings.rsplit_once('/').expect("a path").0;
        let (status, binding) = call(&cluster, 2, "GET", &format!("{base}/{location}"), None);
        assert_eq!(status, 200, "{binding}");
        assert_eq!(binding["routing_key"], Value::from("orders.*"));
        let (_, of_queue) = call(&cluster, 2, "GET", &format!("{queue_path}/bindings"), None);
        assert_eq!(
            of_queue.as_array().map(Vec::len),
            Some(2),
            "the default exchange's and ours: {of_queue}"
        );

        // Messages routed through it; a purge over HTTP empties the queue.
        let (conn, ch) = support::open(&cluster.url(2)).await;
        support::publish_confirmed(&ch, &x, "orders.new", b"one").await;
        assert_eq!(
            call(
                &cluster,
                1,
                "DELETE",
                &format!("{queue_path}/contents"),
                None
            )
            .0,
            204
        );
        assert!(support::get_body(&ch, &q).await.is_none(), "purged");

        // A user and a policy, then the whole export; everything goes, and comes back from it.
        let (status, _) = call(
            &cluster,
            1,
            "PUT",
            "/api/users/importer",
            Some(r#"{"password": "pw", "tags": "management"}"#),
        );
        assert_eq!(status, 204);
        let (status, _) = call(
            &cluster,
            1,
            "PUT",
            "/api/permissions/%2F/importer",
            Some(r#"{"configure": "", "write": "", "read": ".*"}"#),
        );
        assert_eq!(status, 204);
        let (status, _) = call(
            &cluster,
            1,
            "PUT",
            "/api/policies/%2F/short",
            Some(
                r#"{"pattern": "defs-q-", "definition": {"message-ttl": 60000}, "apply-to": "queues"}"#,
            ),
        );
        assert_eq!(status, 204);
        let (status, defs) = call(&cluster, 1, "GET", "/api/definitions", None);
        assert_eq!(status, 200, "{defs}");
        for section in [
            "vhosts",
            "users",
            "permissions",
            "policies",
            "queues",
            "exchanges",
            "bindings",
        ] {
            assert!(defs[section].is_array(), "{section} in {defs}");
        }
        assert!(
            !defs["exchanges"]
                .as_array()
                .expect("a list")
                .iter()
                .any(|e| e["name"]
                    .as_str()
                    .is_some_and(|n| n.is_empty() || n.starts_with("amq."))),
            "built-in exchanges are not exported"
        );
        let user = defs["users"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["name"] == "importer"))
            .expect("the user is exported");
        assert_eq!(user["hashing_algorithm"], "rabbit_password_hashing_sha256");
        let _ = conn.close(200, "bye".into()).await;

        assert_eq!(call(&cluster, 1, "DELETE", &queue_path, None).0, 204);
        assert_eq!(call(&cluster, 1, "DELETE", &exchange_path, None).0, 204);
        assert_eq!(
            call(&cluster, 1, "DELETE", "/api/users/importer", None).0,
            204
        );
        assert_eq!(
            call(&cluster, 1, "DELETE", "/api/policies/%2F/short", None).0,
            204
        );
        assert_eq!(call(&cluster, 2, "GET", &exchange_path, None).0, 404);

        let text = defs.to_string();
        let (status, body) = call(&cluster, 2, "POST", "/api/definitions", Some(&text));
        assert_eq!(status, 204, "{body}");
        // Importing the same file again changes nothing and succeeds.
        assert_eq!(
            call(&cluster, 1, "POST", "/api/definitions", Some(&text)).0,
            204
        );
        let (_, queue) = call(&cluster, 1, "GET", &queue_path, None);
        assert_eq!(
            queue["arguments"]["x-max-length"],
            Value::from(100),
            "{queue}"
        );
        assert_eq!(queue["policy"], Value::from("short"), "{queue}");
        // The imported user logs in with the exported hash; the imported binding routes.
        let url = support::with_credentials(&cluster.url(1), "importer", "pw");
        let importer = support::connect(&url).await;
        let _ = importer.close(200, "bye".into()).await;
        let (conn, ch) = support::open(&cluster.url(1)).await;
        support::publish_confirmed(&ch, &x, "orders.old", b"two").await;
        assert_eq!(
            support::get_body(&ch, &q).await.as_deref(),
            Some(&b"two"[..])
        );

        // A file that conflicts with what is there names the item.
        let conflicting = format!(
            r#"{{"queues": [{{"name": "{q}", "vhost": "/", "durable": true, "arguments": {{"x-max-length": 7}}}}]}}"#
        );
        let (status, body) = call(&cluster, 1, "POST", "/api/definitions", Some(&conflicting));
        assert_eq!(status, 400, "{body}");
        assert!(
            body["reason"].as_str().is_some_and(|r| r.contains(&q)),
            "{body}"
        );
        let _ = conn.close(200, "bye".into()).await;
    });
}

#[test]
fn operators_publish_and_fetch_messages_over_http() {
    let Some(cluster) = support::cluster::cluster("management_messages", 2) else {
        return;
    };
    run(async {
        let q = support::unique("http-msgs");
        let queue_path = format!("/api/queues/%2F/{q}");
        assert_eq!(call(&cluster, 1, "PUT", &queue_path, Some("{}")).0, 201);
        let publish = "/api/exchanges/%2F/amq.default/publish";
        // amq.default is the API's name for the default exchange; published through node 2.
        let body = format!(
            r#"{{"routing_key": "{q}", "payload": "hello", "payload_encoding": "string",
                "properties": {{"content_type": "text/plain", "headers": {{"tenant": "acme"}}}}}}"#
        );
        let (status, routed) = call(&cluster, 2, "POST", publish, Some(&body));
        assert_eq!(
            (status, &routed["routed"]),
            (200, &Value::from(true)),
            "{routed}"
        );
        let binary = format!(
            r#"{{"routing_key": "{q}", "payload": "AAEC/w==", "payload_encoding": "base64"}}"#
        );
        assert_eq!(
            call(&cluster, 1, "POST", publish, Some(&binary)).1["routed"],
            true
        );
        let (_, nowhere) = call(
            &cluster,
            1,
            "POST",
            publish,
            Some(r#"{"routing_key": "no-such-queue", "payload": "x"}"#),
        );
        assert_eq!(nowhere["routed"], Value::from(false));
        let (status, _) = call(
            &cluster,
            1,
            "POST",
            "/api/exchanges/%2F/no-such-exchange/publish",
            Some(r#"{"routing_key": "k", "payload": "x"}"#),
        );
        assert_eq!(status, 404);

        // Looked at and put back: both messages, in order, with their properties.
        let get = format!("{queue_path}/get");
        let (status, peek) = call(
            &cluster,
            2,
            "POST",
            &get,
            Some(r#"{"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"}"#),
        );
        assert_eq!(status, 200, "{peek}");
        let peek = peek.as_array().expect("a list").clone();
        assert_eq!(peek.len(), 2, "{peek:?}");
        assert_eq!(peek[0]["payload"], Value::from("hello"));
        assert_eq!(peek[0]["payload_encoding"], Value::from("string"));
        assert_eq!(
            peek[0]["properties"]["headers"]["tenant"],
            Value::from("acme")
        );
        assert_eq!(peek[0]["message_count"], Value::from(1));
        assert_eq!(peek[1]["payload"], Value::from("AAEC/w=="));
        assert_eq!(peek[1]["payload_encoding"], Value::from("base64"));
        assert_eq!(peek[1]["payload_bytes"], Value::from(4));

        // Taken for good: the first once more (now redelivered), then the queue holds one.
        let (_, taken) = call(
            &cluster,
            1,
            "POST",
            &get,
            Some(r#"{"count": 1, "ackmode": "ack_requeue_false"}"#),
        );
        assert_eq!(taken[0]["payload"], Value::from("hello"), "{taken}");
        assert_eq!(taken[0]["redelivered"], Value::from(true), "{taken}");
        let (conn, ch) = support::open(&cluster.url(1)).await;
        assert_eq!(
            support::get_body(&ch, &q).await.as_deref(),
            Some(&[0u8, 1, 2, 255][..])
        );
        assert!(support::get_body(&ch, &q).await.is_none());
        let (status, _) = call(&cluster, 1, "POST", &get, Some(r#"{"count": 1}"#));
        assert_eq!(status, 400, "ackmode is required");

        // The queue's message figures add up what went through both nodes: 2 publishes,
        // 3 fetched over HTTP and 1 by basic.get, 1 acknowledged (sampled every 5 s).
        support::eventually(
            "the queue's message_stats",
            std::time::Duration::from_secs(20),
            || async {
                let (_, queue) = call(&cluster, 2, "GET", &queue_path, None);
                let stats = &queue["message_stats"];
                stats["publish"] == 2 && stats["deliver_get"] == 4 && stats["ack"] == 1
            },
        )
        .await;
        let (_, overview) = call(&cluster, 1, "GET", "/api/overview", None);
        assert!(
            overview["message_stats"]["publish"].as_u64() >= Some(2),
            "{overview}"
        );
        assert!(overview["message_stats"]["publish_details"]["rate"].is_number());
        let _ = conn.close(200, "bye".into()).await;
    });
}
