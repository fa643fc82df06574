//! Tests of the metadata state machine: the declare/bind/delete rules with their reply codes,
//! routing through every exchange type, clean-up of what dead connections and node runs owned,
//! and a property test that a snapshot restored mid-way routes exactly like the original.

use super::*;
use crate::ids::{ConnectionRef, NodeRun};
use proptest::prelude::*;
use warren_codec::{FieldValue, LongStr, ShortStr};

const RUN: NodeRun = NodeRun {
    node: 1,
    incarnation: 1,
};

fn conn(n: u64) -> ConnectionRef {
    ConnectionRef { run: RUN, conn: n }
}

fn exchange(name: &str, kind: &str) -> MetaCmd {
    MetaCmd::DeclareExchange(ExchangeDecl {
        vhost: "/".into(),
        name: name.into(),
        kind: kind.into(),
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::new(),
        declared_by: RUN,
    })
}

fn queue(name: &str) -> QueueDecl {
    QueueDecl {
        vhost: "/".into(),
        name: name.into(),
        durable: true,
        exclusive_owner: None,
        auto_delete: false,
        arguments: FieldTable::new(),
        declared_by: RUN,
        replicas: vec![1],
    }
}

fn bind(source: &str, queue: &str, key: &str) -> MetaCmd {
    MetaCmd::Bind(BindingDecl {
        vhost: "/".into(),
        source: source.into(),
        destination: Destination::Queue(queue.into()),
        routing_key: key.into(),
        arguments: FieldTable::new(),
        by: None,
    })
}

fn ok(state: &mut MetaState, cmd: MetaCmd) -> Vec<MetaEffect> {
    let (reply, fx) = state.apply(cmd);
    assert!(!matches!(reply, MetaReply::Error(_)), "{reply:?}");
    fx
}

fn code(state: &mut MetaState, cmd: MetaCmd) -> u16 {
    match state.apply(cmd).0 {
        MetaReply::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn route(state: &MetaState, ex: &str, key: &str) -> Vec<String> {
    state
        .route("/", ex, key, None)
        .unwrap()
        .queues
        .into_iter()
        .collect()
}

#[test]
fn exchange_declare_rules() {
    let mut s = MetaState::new();
    ok(&mut s, exchange("logs", "fanout"));
    ok(&mut s, exchange("logs", "fanout"));
    assert_eq!(code(&mut s, exchange("logs", "direct")), 406);
    assert_eq!(code(&mut s, exchange("amq.custom", "direct")), 403);
    assert_eq!(code(&mut s, exchange("", "direct")), 403);
    assert_eq!(code(&mut s, exchange("x", "nonsense")), 503);
    // Redeclaring a predeclared exchange with its own settings is fine.
    ok(&mut s, exchange("amq.topic", "topic"));
    let mut transient = exchange("logs", "fanout");
    if let MetaCmd::DeclareExchange(d) = &mut transient {
        d.durable = false;
    }
    assert_eq!(code(&mut s, transient), 406);
}

#[test]
fn queue_declare_rules() {
    let mut s = MetaState::new();
    let fx = ok(&mut s, MetaCmd::DeclareQueue(queue("q")));
    assert!(matches!(&fx[..], [MetaEffect::QueueCreated { .. }]));
    // Redeclare: no new effect, same group.
    let fx = ok(&mut s, MetaCmd::DeclareQueue(queue("q")));
    assert!(fx.is_empty());
    let mut transient = queue("q");
    transient.durable = false;
    assert_eq!(code(&mut s, MetaCmd::DeclareQueue(transient)), 406);
    let mut ttl = queue("q");
    ttl.arguments.insert(
        ShortStr::try_from("x-message-ttl").unwrap(),
        FieldValue::I32(1000),
    );
    assert_eq!(code(&mut s, MetaCmd::DeclareQueue(ttl)), 406);
    // Unknown arguments are not compared, as in RabbitMQ.
    let mut other = queue("q");
    other
        .arguments
        .insert(ShortStr::try_from("x-custom").unwrap(), FieldValue::I32(1));
    ok(&mut s, MetaCmd::DeclareQueue(other));
    assert_eq!(code(&mut s, MetaCmd::DeclareQueue(queue("amq.q"))), 403);
    ok(&mut s, MetaCmd::DeclareQueue(queue("amq.gen-abc")));

    let mut excl = queue("mine");
    excl.exclusive_owner = Some(conn(1));
    ok(&mut s, MetaCmd::DeclareQueue(excl.clone()));
    excl.exclusive_owner = Some(conn(2));
    assert_eq!(code(&mut s, MetaCmd::DeclareQueue(excl)), 405);
    assert_eq!(
        s.check_queue_access("/", "mine", Some(conn(2)))
            .unwrap_err()
            .code,
        405
    );
    assert!(s.check_queue_access("/", "mine", Some(conn(1))).is_ok());
    assert_eq!(
        s.check_queue_access("/", "none", None).unwrap_err().code,
        404
    );
}

#[test]
fn placement_and_groups() {
    let mut s = MetaState::new();
    ok(&mut s, MetaCmd::DeclareQueue(queue("a")));
    ok(&mut s, MetaCmd::DeclareQueue(queue("b")));
    let mut t = queue("t");
    t.durable = false;
    ok(&mut s, MetaCmd::DeclareQueue(t));
    let (ga, gb) = (
        s.queue("/", "a").unwrap().group(),
        s.queue("/", "b").unwrap().group(),
    );
    assert!(ga.is_some() && gb.is_some() && ga != gb);
    assert_ne!(ga, Some(crate::ids::METADATA_GROUP));
    assert_eq!(
        s.queue("/", "t").unwrap().placement,
        Placement::Local { run: RUN }
    );
}

#[test]
fn routing_through_every_exchange_type() {
    let mut s = MetaState::new();
    for q in ["q1", "q2", "q3"] {
        ok(&mut s, MetaCmd::DeclareQueue(queue(q)));
    }
    ok(&mut s, exchange("d", "direct"));
    ok(&mut s, exchange("f", "fanout"));
    ok(&mut s, exchange("t", "topic"));
    ok(&mut s, bind("d", "q1", "k"));
    ok(&mut s, bind("d", "q2", "k"));
    ok(&mut s, bind("d", "q3", "other"));
    ok(&mut s, bind("f", "q1", "ignored"));
    ok(&mut s, bind("f", "q3", ""));
    ok(&mut s, bind("t", "q1", "*.orange.*"));
    ok(&mut s, bind("t", "q2", "lazy.#"));
    ok(&mut s, bind("t", "q2", "*.*.rabbit"));
    assert_eq!(route(&s, "", "q2"), vec!["q2"]);
    assert!(route(&s, "", "nope").is_empty());
    assert_eq!(route(&s, "d", "k"), vec!["q1", "q2"]);
    assert_eq!(route(&s, "f", "anything"), vec!["q1", "q3"]);
    assert_eq!(route(&s, "t", "quick.orange.rabbit"), vec!["q1", "q2"]);
    assert_eq!(route(&s, "t", "lazy.pink.rabbit"), vec!["q2"]);
    assert!(route(&s, "t", "quick.brown.fox").is_empty());
    assert_eq!(s.route("/", "missing", "", None).unwrap_err().code, 404);
    // Binding twice is idempotent; unbinding removes it.
    ok(&mut s, bind("d", "q1", "k"));
    assert_eq!(s.bindings().filter(|(_, b)| b.source == "d").count(), 3);
    let MetaCmd::Bind(decl) = bind("d", "q1", "k") else {
        unreachable!()
    };
    ok(&mut s, MetaCmd::Unbind(decl));
    assert_eq!(route(&s, "d", "k"), vec!["q2"]);
}

#[test]
fn headers_exchange_routes_on_table() {
    let mut s = MetaState::new();
    ok(&mut s, MetaCmd::DeclareQueue(queue("q")));
    let mut args = FieldTable::new();
    args.insert(
        ShortStr::try_from("x-match").unwrap(),
        FieldValue::LongStr(LongStr::from("any")),
    );
    args.insert(
        ShortStr::try_from("kind").unwrap(),
        FieldValue::LongStr(LongStr::from("pdf")),
    );
    ok(
        &mut s,
        MetaCmd::Bind(BindingDecl {
            vhost: "/".into(),
            source: "amq.headers".into(),
            destination: Destination::Queue("q".into()),
            routing_key: String::new(),
            arguments: args,
            by: None,
        }),
    );
    let mut headers = FieldTable::new();
    headers.insert(
        ShortStr::try_from("kind").unwrap(),
        FieldValue::LongStr(LongStr::from("pdf")),
    );
    let hit = s.route("/", "amq.headers", "", Some(&headers)).unwrap();
    assert_eq!(hit.queues.len(), 1);
    let miss = s.route("/", "amq.headers", "", None).unwrap();
    assert!(miss.queues.is_empty());
    let mut bad = FieldTable::new();
    bad.insert(
        ShortStr::try_from("x-match").unwrap(),
        FieldValue::LongStr(LongStr::from("most")),
    );
    let cmd = MetaCmd::Bind(BindingDecl {
        vhost: "/".into(),
        source: "amq.headers".into(),
        destination: Destination::Queue("q".into()),
        routing_key: String::new(),
        arguments: bad,
        by: None,
    });
    assert_eq!(code(&mut s, cmd), 406);
}

#[test]
fn exchange_to_exchange_with_cycles_and_alternate() {
    let mut s = MetaState::new();
    ok(&mut s, MetaCmd::DeclareQueue(queue("q")));
    ok(&mut s, MetaCmd::DeclareQueue(queue("unrouted")));
    ok(&mut s, exchange("a", "fanout"));
    ok(&mut s, exchange("b", "fanout"));
    let e2e = |src: &str, dst: &str| {
        MetaCmd::Bind(BindingDecl {
            vhost: "/".into(),
            source: src.into(),
            destination: Destination::Exchange(dst.into()),
            routing_key: String::new(),
            arguments: FieldTable::new(),
            by: None,
        })
    };
    ok(&mut s, e2e("a", "b"));
    ok(&mut s, e2e("b", "a"));
    ok(&mut s, bind("b", "q", ""));
    assert_eq!(route(&s, "a", "x"), vec!["q"]);
    assert_eq!(code(&mut s, e2e("a", "missing")), 404);
    assert_eq!(code(&mut s, e2e("", "a")), 403);

    let mut alt_args = FieldTable::new();
    alt_args.insert(
        ShortStr::try_from("alternate-exchange").unwrap(),
        FieldValue::LongStr(LongStr::from("ae")),
    );
    ok(&mut s, exchange("ae", "fanout"));
    ok(&mut s, bind("ae", "unrouted", ""));
    ok(
        &mut s,
        MetaCmd::DeclareExchange(ExchangeDecl {
            vhost: "/".into(),
            name: "main".into(),
            kind: "direct".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: alt_args,
            declared_by: RUN,
        }),
    );
    ok(&mut s, bind("main", "q", "known"));
    assert_eq!(route(&s, "main", "known"), vec!["q"]);
    assert_eq!(route(&s, "main", "unknown"), vec!["unrouted"]);

    ok(
        &mut s,
        MetaCmd::DeclareExchange(ExchangeDecl {
            vhost: "/".into(),
            name: "hidden".into(),
            kind: "fanout".into(),
            durable: true,
            auto_delete: false,
            internal: true,
            arguments: FieldTable::new(),
            declared_by: RUN,
        }),
    );
    assert_eq!(s.route("/", "hidden", "", None).unwrap_err().code, 403);
}

#[test]
fn deletes_cascade_to_bindings_and_auto_delete_exchanges() {
    let mut s = MetaState::new();
    ok(&mut s, MetaCmd::DeclareQueue(queue("q")));
    ok(
        &mut s,
        MetaCmd::DeclareExchange(ExchangeDecl {
            vhost: "/".into(),
            name: "auto".into(),
            kind: "direct".into(),
            durable: true,
            auto_delete: true,
            internal: false,
            arguments: FieldTable::new(),
            declared_by: RUN,
        }),
    );
    ok(&mut s, exchange("busy", "direct"));
    ok(&mut s, bind("auto", "q", "k"));
    ok(&mut s, bind("busy", "q", "k"));
    assert_eq!(
        code(
            &mut s,
            MetaCmd::DeleteExchange {
                vhost: "/".into(),
                name: "busy".into(),
                if_unused: true,
            }
        ),
        406
    );
    let fx = ok(
        &mut s,
        MetaCmd::DeleteQueue {
            vhost: "/".into(),
            name: "q".into(),
            by: None,
        },
    );
    assert!(matches!(&fx[..], [MetaEffect::QueueDeleted { .. }]));
    assert!(
        s.exchange("/", "auto").is_none(),
        "auto-delete exchange goes"
    );
    assert!(s.exchange("/", "busy").is_some());
    assert_eq!(s.bindings().count(), 0);
    // Deleting what does not exist is not an error.
    ok(
        &mut s,
        MetaCmd::DeleteQueue {
            vhost: "/".into(),
            name: "q".into(),
            by: None,
        },
    );
    ok(
        &mut s,
        MetaCmd::DeleteExchange {
            vhost: "/".into(),
            name: "nope".into(),
            if_unused: false,
        },
    );
    assert_eq!(
        code(
            &mut s,
            MetaCmd::DeleteExchange {
                vhost: "/".into(),
                name: "amq.direct".into(),
                if_unused: false,
            }
        ),
        403
    );
}

#[test]
fn dead_connections_and_node_runs_are_cleaned_up() {
    let mut s = MetaState::new();
    let mut excl = queue("excl");
    excl.exclusive_owner = Some(conn(7));
    ok(&mut s, MetaCmd::DeclareQueue(excl));
    let mut transient = queue("transient");
    transient.durable = false;
    ok(&mut s, MetaCmd::DeclareQueue(transient));
    ok(&mut s, MetaCmd::DeclareQueue(queue("durable")));
    let mut tx = exchange("tx", "fanout");
    if let MetaCmd::DeclareExchange(d) = &mut tx {
        d.durable = false;
    }
    ok(&mut s, tx);
    ok(&mut s, bind("tx", "durable", ""));

    let fx = ok(&mut s, MetaCmd::ConnectionClosed { conn: conn(7) });
    assert_eq!(fx.len(), 1);
    assert!(s.queue("/", "excl").is_none());

    let fx = ok(
        &mut s,
        MetaCmd::NodeRestarted {
            run: NodeRun {
                node: 1,
                incarnation: 2,
            },
        },
    );
    assert_eq!(fx.len(), 1, "only the transient queue is a queue effect");
    assert!(s.queue("/", "transient").is_none());
    assert!(s.queue("/", "durable").is_some());
    assert!(s.exchange("/", "tx").is_none());
    assert_eq!(s.bindings().count(), 0);
}

// ---- snapshot equivalence ----

fn arb_cmd() -> impl Strategy<Value = MetaCmd> {
    use proptest::sample::select;
    let names = select(vec!["a".to_string(), "b".into(), "c".into()]);
    let qnames = select(vec!["q1".to_string(), "q2".into(), "q3".into()]);
    let keys = select(vec![
        String::new(),
        "k".into(),
        "x.y".into(),
        "#".into(),
        "*.y".into(),
    ]);
    prop_oneof![
        (
            names.clone(),
            select(vec!["direct", "fanout", "topic"]),
            any::<bool>()
        )
            .prop_map(|(n, k, auto)| {
                let mut cmd = exchange(&n, k);
                if let MetaCmd::DeclareExchange(d) = &mut cmd {
                    d.auto_delete = auto;
                }
                cmd
            }),
        qnames
            .clone()
            .prop_map(|q| MetaCmd::DeclareQueue(queue(&q))),
        (names.clone(), qnames.clone(), keys.clone()).prop_map(|(e, q, k)| bind(&e, &q, &k)),
        (names.clone(), qnames.clone(), keys).prop_map(|(e, q, k)| match bind(&e, &q, &k) {
            MetaCmd::Bind(d) => MetaCmd::Unbind(d),
            other => other,
        }),
        qnames.prop_map(|q| MetaCmd::DeleteQueue {
            vhost: "/".into(),
            name: q,
            by: None
        }),
        (names, any::<bool>()).prop_map(|(n, if_unused)| MetaCmd::DeleteExchange {
            vhost: "/".into(),
            name: n,
            if_unused
        }),
    ]
}

fn all_routes(s: &MetaState) -> Vec<(String, String, Vec<String>)> {
    let mut out = vec![];
    for ex in ["a", "b", "c"] {
        for key in ["", "k", "x.y", "z.y", "q"] {
            if let Ok(r) = s.route("/", ex, key, None) {
                out.push((ex.into(), key.into(), r.queues.into_iter().collect()));
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn snapshot_restore_routes_like_the_original(
        before in proptest::collection::vec(arb_cmd(), 0..30),
        after in proptest::collection::vec(arb_cmd(), 0..30),
    ) {
        let mut live = MetaState::new();
        for c in before {
            live.apply(c);
        }
        let bytes = postcard::to_allocvec(&live).unwrap();
        let mut restored: MetaState = postcard::from_bytes(&bytes).unwrap();
        restored.rebuild_indexes();
        prop_assert_eq!(all_routes(&live), all_routes(&restored));
        for c in after {
            let (r1, f1) = live.apply(c.clone());
            let (r2, f2) = restored.apply(c);
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(f1, f2);
        }
        prop_assert_eq!(all_routes(&live), all_routes(&restored));
        prop_assert_eq!(postcard::to_allocvec(&live).unwrap(), postcard::to_allocvec(&restored).unwrap());
        // No binding points at something that no longer exists.
        for (_, b) in live.bindings() {
            prop_assert!(live.exchange("/", &b.source).is_some());
            match &b.destination {
                Destination::Queue(q) => prop_assert!(live.queue("/", q).is_some()),
                Destination::Exchange(e) => prop_assert!(live.exchange("/", e).is_some()),
            }
        }
    }
}

#[test]
fn replica_sets_change_and_are_counted() {
    let mut s = MetaState::new();
    let mut q = queue("q");
    q.replicas = vec![1, 2, 3];
    ok(&mut s, MetaCmd::DeclareQueue(q));
    let mut r = queue("r");
    r.replicas = vec![2, 3, 4];
    ok(&mut s, MetaCmd::DeclareQueue(r));
    assert_eq!(s.replica_counts()[&2], (2, 1));
    assert_eq!(s.replica_counts()[&1], (1, 1));
    let set = |replicas: Vec<u64>| MetaCmd::SetReplicas {
        vhost: "/".into(),
        name: "q".into(),
        replicas,
    };
    let fx = ok(&mut s, set(vec![4, 2, 2, 3]));
    assert!(
        matches!(&fx[..], [MetaEffect::ReplicasChanged { queue, .. }]
        if queue.placement == Placement::Replicated { group: 1, replicas: vec![4, 2, 3] })
    );
    assert!(
        ok(&mut s, set(vec![4, 2, 3])).is_empty(),
        "no change, no effect"
    );
    assert_eq!(code(&mut s, set(vec![])), 406);
    let mut t = queue("t");
    t.durable = false;
    ok(&mut s, MetaCmd::DeclareQueue(t));
    let not_replicated = MetaCmd::SetReplicas {
        vhost: "/".into(),
        name: "t".into(),
        replicas: vec![1],
    };
    assert_eq!(code(&mut s, not_replicated), 406);
}

#[test]
fn a_down_node_takes_its_exclusive_queues_with_it() {
    let mut s = MetaState::new();
    let mut excl = queue("excl");
    excl.exclusive_owner = Some(conn(1));
    ok(&mut s, MetaCmd::DeclareQueue(excl));
    let mut transient = queue("transient");
    transient.durable = false;
    ok(&mut s, MetaCmd::DeclareQueue(transient));
    let fx = ok(&mut s, MetaCmd::NodeDown { node: RUN.node });
    assert_eq!(fx.len(), 1);
    assert!(s.queue("/", "excl").is_none());
    assert!(
        s.queue("/", "transient").is_some(),
        "transient queues wait for their node"
    );
    assert!(ok(&mut s, MetaCmd::NodeDown { node: 2 }).is_empty());
}

#[test]
fn vhosts_users_and_permissions() {
    let mut m = MetaState::new();
    assert_eq!(
        m.apply(MetaCmd::AddVhost {
            name: "prod".into()
        })
        .0,
        MetaReply::Done
    );
    assert!(m.vhost_exists("prod"));
    assert!(
        m.exchange("prod", "amq.topic").is_some(),
        "standard exchanges"
    );
    m.apply(MetaCmd::PutUser {
        name: "app".into(),
        password_hash: "h".into(),
        tags: vec!["monitoring".into()],
    });
    assert_eq!(
        m.user("app").map(|u| u.tags.clone()),
        Some(vec!["monitoring".into()])
    );
    let perms = Permissions {
        configure: "^app-.*".into(),
        write: ".*".into(),
        read: "".into(),
    };
    assert!(matches!(
        m.apply(MetaCmd::SetPermissions {
            user: "app".into(),
            vhost: "nowhere".into(),
            permissions: perms.clone(),
        })
        .0,
        MetaReply::Error(_)
    ));
    m.apply(MetaCmd::SetPermissions {
        user: "app".into(),
        vhost: "prod".into(),
        permissions: perms.clone(),
    });
    assert_eq!(m.permissions("app", "prod"), Some(&perms));
    // Deleting the vhost deletes its queues and the permissions in it.
    let (reply, _) = m.apply(MetaCmd::DeclareQueue(QueueDecl {
        vhost: "prod".into(),
        ..queue("q")
    }));
    assert!(matches!(reply, MetaReply::QueueDeclared { .. }));
    let (_, effects) = m.apply(MetaCmd::DeleteVhost {
        name: "prod".into(),
    });
    assert!(
        matches!(&effects[..], [MetaEffect::QueueDeleted { .. }]),
        "{effects:?}"
    );
    assert!(!m.vhost_exists("prod"));
    assert_eq!(m.permissions("app", "prod"), None);
    m.apply(MetaCmd::DeleteUser { name: "app".into() });
    assert!(m.user("app").is_none());
}

fn policy(
    name: &str,
    pattern: &str,
    priority: i64,
    pairs: &[(&'static str, FieldValue)],
) -> Policy {
    let mut definition = FieldTable::new();
    for (k, v) in pairs {
        definition.insert(ShortStr::from_static(k), v.clone());
    }
    Policy {
        name: name.into(),
        pattern: pattern.into(),
        apply_to: "queues".into(),
        priority,
        definition,
    }
}

#[test]
fn policies_apply_by_pattern_and_priority_under_queue_arguments() {
    let mut m = MetaState::new();
    let mut own = queue("orders-eu");
    own.arguments
        .insert(ShortStr::from_static("x-max-length"), FieldValue::I64(5));
    m.apply(MetaCmd::DeclareQueue(own));
    m.apply(MetaCmd::DeclareQueue(queue("audit")));
    let (reply, effects) = m.apply(MetaCmd::SetPolicy {
        vhost: "/".into(),
        policy: policy(
            "ttl",
            "^orders",
            1,
            &[
                ("message-ttl", FieldValue::I64(1000)),
                ("max-length", FieldValue::I64(100)),
            ],
        ),
    });
    assert_eq!(reply, MetaReply::Done);
    let args_of = |effects: &[MetaEffect], q: &str| {
        effects.iter().find_map(|e| match e {
            MetaEffect::QueueArguments {
                name, arguments, ..
            } if name == q => Some(arguments.clone()),
            _ => None,
        })
    };
    let version_of = |effects: &[MetaEffect]| {
        effects.iter().find_map(|e| match e {
            MetaEffect::QueueArguments { version, .. } => Some(*version),
            _ => None,
        })
    };
    let first_version = version_of(&effects).expect("a version");
    assert_eq!(first_version, m.policy_version());
    let orders = args_of(&effects, "orders-eu").expect("announced");
    assert_eq!(orders.get("x-message-ttl"), Some(&FieldValue::I64(1000)));
    assert_eq!(
        orders.get("x-max-length"),
        Some(&FieldValue::I64(5)),
        "the queue's own argument wins"
    );
    let audit = args_of(&effects, "audit").expect("announced too");
    assert_eq!(audit.get("x-message-ttl"), None);

    // A higher-priority policy replaces the lower one for the queues it matches.
    let (_, effects) = m.apply(MetaCmd::SetPolicy {
        vhost: "/".into(),
        policy: policy("short", "eu$", 5, &[("message-ttl", FieldValue::I64(10))]),
    });
    let orders = args_of(&effects, "orders-eu").expect("announced");
    assert_eq!(orders.get("x-message-ttl"), Some(&FieldValue::I64(10)));
    assert_eq!(
        m.policy_for("/", "orders-eu").map(|p| p.name.as_str()),
        Some("short")
    );

    // New queues get the policy's arguments announced when declared.
    let (_, effects) = m.apply(MetaCmd::DeclareQueue(queue("orders-us")));
    assert_eq!(
        args_of(&effects, "orders-us").and_then(|a| a.get("x-message-ttl").cloned()),
        Some(FieldValue::I64(1000))
    );

    // Clearing it announces the arguments without it.
    let (_, effects) = m.apply(MetaCmd::ClearPolicy {
        vhost: "/".into(),
        name: "short".into(),
    });
    let orders = args_of(&effects, "orders-eu").expect("announced");
    assert_eq!(orders.get("x-message-ttl"), Some(&FieldValue::I64(1000)));
    // Every change is announced under a later version than the ones before it.
    let last_version = version_of(&effects).expect("a version");
    assert!(
        last_version > first_version + 2,
        "{first_version} then {last_version}"
    );
    assert_eq!(last_version, m.policy_version());
}

#[test]
fn invalid_policies_are_refused() {
    let mut m = MetaState::new();
    for bad in [
        policy("p", "(", 0, &[]),
        policy("p", ".*", 0, &[("max-priority", FieldValue::I64(5))]),
        policy("p", ".*", 0, &[("message-ttl", FieldValue::I64(-1))]),
        policy(
            "p",
            ".*",
            0,
            &[("overflow", FieldValue::LongStr(LongStr::from("drop-tail")))],
        ),
    ] {
        let (reply, _) = m.apply(MetaCmd::SetPolicy {
            vhost: "/".into(),
            policy: bad.clone(),
        });
        assert!(matches!(reply, MetaReply::Error(_)), "{bad:?} accepted");
    }
}

#[test]
fn the_first_decision_of_a_transaction_stands_until_it_is_forgotten() {
    let mut state = MetaState::new();
    let tx = crate::ids::TxId {
        channel: crate::ids::ChannelRef {
            conn: conn(1),
            channel: 1,
            opened: 1,
        },
        commit: 1,
    };
    let decide = |state: &mut MetaState, commit| state.apply(MetaCmd::TxDecide { tx, commit }).0;
    assert_eq!(state.tx_decision(&tx), None);
    assert_eq!(
        decide(&mut state, true),
        MetaReply::TxDecided { commit: true }
    );
    // A recovering queue that asks for an abort afterwards learns of the commit.
    assert_eq!(
        decide(&mut state, false),
        MetaReply::TxDecided { commit: true }
    );
    assert_eq!(state.tx_decision(&tx), Some(true));
    // The decision travels with a snapshot.
    let restored: MetaState =
        postcard::from_bytes(&postcard::to_allocvec(&state).expect("encode")).expect("decode");
    assert_eq!(restored.tx_decision(&tx), Some(true));
    assert_eq!(state.apply(MetaCmd::TxForget { tx }).0, MetaReply::Done);
    assert_eq!(state.tx_decision(&tx), None);
    assert_eq!(
        decide(&mut state, false),
        MetaReply::TxDecided { commit: false }
    );
}
