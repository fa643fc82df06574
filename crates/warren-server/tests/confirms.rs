//! Publisher confirms: every publish on a confirm channel is acked exactly once (checked
//! tag by tag on a raw socket, where `multiple` acks are visible), unroutable messages are
//! still acked, and a mandatory message's basic.return arrives before its ack.

mod support;

use std::collections::BTreeSet;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use support::raw::{self, RawConn, method};
use support::{run, unique, within};

#[test]
fn every_publish_is_acked() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "confirms").await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        assert!(ch.status().confirm());
        let mut pending = Vec::new();
        for i in 0..500u32 {
            let props = if i % 2 == 0 {
                BasicProperties::default().with_delivery_mode(2)
            } else {
                BasicProperties::default()
            };
            pending.push(
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    props,
                )
                .await
                .expect("publish"),
            );
        }
        for (i, p) in pending.into_iter().enumerate() {
            let c = within("publisher confirm", p).await.expect("confirm");
            assert_eq!(c, Confirmation::Ack(None), "publish {i}");
        }
        assert!(
            ch.wait_for_confirms()
                .await
                .expect("wait_for_confirms")
                .is_empty()
        );
        assert_eq!(support::ready_count(&ch, &q).await, 500);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn confirm_select_is_idempotent() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("second confirm.select");
        let p = ch
            .basic_publish(
                "amq.direct".into(),
                unique("nobody").as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        // Unroutable, not mandatory: dropped, and still acked.
        assert_eq!(
            within("confirm", p).await.expect("confirm"),
            Confirmation::Ack(None)
        );
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn unroutable_publishes_are_acked_and_mandatory_ones_returned_first() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        for mandatory in [false, true, false, true] {
            let p = ch
                .basic_publish(
                    x.as_str().into(),
                    "no.binding".into(),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    b"nowhere",
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
            match within("confirm", p).await.expect("confirm") {
                Confirmation::Ack(None) if !mandatory => {}
                // lapin attaches a basic.return to the confirm only if it came first.
                Confirmation::Ack(Some(ret)) if mandatory => {
                    assert_eq!(ret.reply_code, support::code::NO_ROUTE);
                    assert_eq!(ret.delivery.data, b"nowhere");
                }
                other => panic!("mandatory={mandatory}: unexpected {other:?}"),
            }
        }
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// Settles the tags an ack or nack covers; fails on a tag settled twice or never published.
fn settle(tag: u64, multiple: bool, unsettled: &mut BTreeSet<u64>, published: u64) {
    assert!(
        tag >= 1 && tag <= published,
        "ack for tag {tag}, but only {published} published"
    );
    if multiple {
        let covered: Vec<u64> = unsettled.range(..=tag).copied().collect();
        assert!(
            !covered.is_empty(),
            "multiple ack up to {tag} settles nothing new"
        );
        for t in covered {
            unsettled.remove(&t);
        }
    } else {
        assert!(unsettled.remove(&tag), "tag {tag} acked twice");
    }
}

#[test]
fn raw_confirm_tags_cover_every_publish_exactly_once() {
    const N: u64 = 2000;
    let b = support::broker();
    let mut c = RawConn::open(b.addr());
    c.open_channel(1);
    let q = unique("rawconfirm");
    c.declare_queue(1, &q);
    c.confirm_select(1);
    for i in 0..N {
        c.publish(1, "", &q, format!("m{i}").as_bytes());
    }
    let mut unsettled: BTreeSet<u64> = (1..=N).collect();
    let (mut acks, mut multiples) = (0, 0);
    for _ in 0..N * 2 {
        if unsettled.is_empty() {
            break;
        }
        let f = c.expect_method("basic.ack");
        assert!(
            !f.is(method::BASIC_NACK),
            "broker nacked: {}",
            raw::describe(&f)
        );
        assert!(
            f.is(method::BASIC_ACK) && f.channel == 1,
            "expected basic.ack, got {}",
            raw::describe(&f)
        );
        let mut a = f.args();
        let tag = a.longlong();
        let multiple = a.octet() & 1 == 1;
        acks += 1;
        if multiple {
            multiples += 1;
        }
        settle(tag, multiple, &mut unsettled, N);
    }
    assert!(unsettled.is_empty(), "never confirmed: {unsettled:?}");
    eprintln!("{N} publishes confirmed by {acks} acks ({multiples} with multiple)");
    // Delivery tags keep counting on the same channel.
    c.publish(1, "", &q, b"one more");
    let f = c.expect_method("basic.ack");
    assert!(f.is(method::BASIC_ACK), "{}", raw::describe(&f));
    assert_eq!(f.args().longlong(), N + 1);

    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, N as u32 + 1);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
    c.shutdown();
}

#[test]
fn raw_return_precedes_ack() {
    let b = support::broker();
    let mut c = RawConn::open(b.addr());
    c.open_channel(1);
    c.confirm_select(1);
    let x = "amq.direct";
    let rk = unique("nobody");
    let publish = |c: &mut RawConn, mandatory: bool| {
        let mut out = raw::frame(
            raw::FRAME_METHOD,
            1,
            &raw::method_payload(
                method::BASIC_PUBLISH,
                &raw::Args::new()
                    .short(0)
                    .shortstr(x)
                    .shortstr(&rk)
                    .bits(&[mandatory, false])
                    .0,
            ),
        );
        out.extend(raw::frame(raw::FRAME_HEADER, 1, &raw::content_header(3)));
        out.extend(raw::frame(raw::FRAME_BODY, 1, b"abc"));
        c.send(&out);
    };
    publish(&mut c, true);
    publish(&mut c, false);
    publish(&mut c, true);

    // Expected: return(1) ack(1) ack(2) return(3) ack(3), with acks possibly merged by
    // `multiple`; what matters is that each return comes before the ack covering it.
    let mut returns = 0u64;
    let mut acked_up_to = 0u64;
    for _ in 0..50 {
        if acked_up_to == 3 {
            break;
        }
        let f = c.expect_method("basic.return or basic.ack");
        if f.is(method::BASIC_RETURN) {
            let mut a = f.args();
            assert_eq!(a.short(), support::code::NO_ROUTE);
            returns += 1;
            // The return for publish 1 or 3 precedes the ack for it.
            let tag = if returns == 1 { 1 } else { 3 };
            assert!(
                acked_up_to < tag,
                "basic.return for publish {tag} came after its ack"
            );
            let h = c.expect_frame("content header");
            assert_eq!(h.kind, raw::FRAME_HEADER);
            let body = c.expect_frame("content body");
            assert_eq!(
                (body.kind, body.payload.as_slice()),
                (raw::FRAME_BODY, &b"abc"[..])
            );
        } else if f.is(method::BASIC_ACK) {
            let mut a = f.args();
            let tag = a.longlong();
            let multiple = a.octet() & 1 == 1;
            assert!(tag > acked_up_to, "ack {tag} out of order");
            assert!(multiple || tag == acked_up_to + 1, "ack {tag} skipped tags");
            acked_up_to = tag;
        } else {
            panic!("unexpected {}", raw::describe(&f));
        }
    }
    assert_eq!(acked_up_to, 3);
    assert_eq!(returns, 2);
    c.shutdown();
}
