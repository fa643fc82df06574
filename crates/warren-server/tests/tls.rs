//! The amqps listener: a client that trusts the test CA connects over TLS, publishes with
//! confirms and gets its message back; a plaintext client on the TLS port fails cleanly and
//! the broker keeps serving; a missing certificate stops start-up with a message naming the
//! setting. Certificates are made at test time; no key material is kept in the repository.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use support::{Broker, run, unique, within};

/// A CA and a server certificate for 127.0.0.1 signed by it; returns the CA's PEM.
fn make_certs(dir: &Path) -> String {
    make_certs_with_client(dir).0
}

/// As `make_certs`, plus a client certificate signed by the same CA: returns the CA's PEM and
/// the client's certificate and key PEMs.
fn make_certs_with_client(dir: &Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "warren test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write certificate");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write key");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
    let client_key = rcgen::KeyPair::generate().expect("client key");
    let mut client_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("client params");
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "warren test client");
    let client = client_params
        .signed_by(&client_key, &ca, &ca_key)
        .expect("client certificate");
    (ca.pem(), client.pem(), client_key.serialize_pem())
}

/// A broker with amqps on a free loopback port, its certificate and key from `certs` (as
/// `make_certs` writes them), requiring client certificates signed by `ca.pem` there when
/// `client_ca`.
fn tls_broker(certs: &Path, client_ca: bool) -> Broker {
    let path = |f: &str| certs.join(f).to_str().expect("utf-8 path").to_owned();
    let mut args = vec![
        "--tls-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--tls-cert".to_owned(),
        path("server.pem"),
        "--tls-key".to_owned(),
        path("server.key"),
    ];
    if client_ca {
        args.extend(["--tls-ca".to_owned(), path("ca.pem")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Broker::start_with_args(&args)
}

fn amqps_addr(b: &Broker) -> SocketAddr {
    b.stdout_text()
        .lines()
        .find_map(|l| l.strip_prefix("warren: listening amqps "))
        .unwrap_or_else(|| panic!("no amqps listener in:\n{}", b.stdout_text()))
        .trim()
        .parse()
        .expect("amqps address")
}

async fn connect_tls(addr: SocketAddr, ca_pem: &str) -> lapin::Result<Connection> {
    connect_tls_as(addr, ca_pem, None).await
}

/// Connects over TLS, presenting `identity` (certificate PEM, key PEM) when given.
async fn connect_tls_as(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime().expect("runtime");
    Connection::connect_with_config(
        &format!("amqps://guest:guest@{addr}/%2f"),
        ConnectionProperties::default(),
        OwnedTLSConfig {
            identity: identity.map(|(pem, key)| OwnedIdentity::PKCS8 {
                pem: pem.as_bytes().to_vec(),
                key: key.as_bytes().to_vec(),
            }),
            cert_chain: Some(ca_pem.to_owned()),
        },
        runtime,
    )
    .await
}

#[test]
fn clients_publish_and_consume_over_tls() {
    if support::external_amqp().is_some() {
        return;
    }
    let certs = tempfile::tempdir().expect("temp dir");
    let ca = make_certs(certs.path());
    let b = tls_broker(certs.path(), false);
    let addr = amqps_addr(&b);
    run(async {
        let conn = within("TLS connect", connect_tls(addr, &ca))
            .await
            .expect("amqps connection");
        let ch = conn.create_channel().await.expect("channel");
        let q = unique("tls");
        ch.queue_declare(q.as_str().into(), Default::default(), FieldTable::default())
            .await
            .expect("declare");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let body = vec![7u8; 200_000];
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert!(within("confirm", confirm).await.expect("confirm").is_ack());
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("the message");
        assert_eq!(got.delivery.data, body, "a body spanning many TLS records");

        // Plain AMQP on the TLS port: the handshake fails, nothing else is affected.
        let plain = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(
                &format!("amqp://guest:guest@{addr}/%2f"),
                ConnectionProperties::default(),
            ),
        )
        .await;
        assert!(!matches!(plain, Ok(Ok(_))), "a plaintext client got in");
        // A client that does not trust the broker's CA is refused by its own TLS check.
        let other_ca = make_certs(tempfile::tempdir().expect("temp dir").path());
        assert!(connect_tls(addr, &other_ca).await.is_err());

        let ch2 = conn.create_channel().await.expect("still serving");
        ch2.queue_declare(
            unique("tls-after").as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare after the failed handshakes");
        let _ = conn.close(200, "bye".into()).await;
    });
}

#[test]
fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in() {
    if support::external_amqp().is_some() {
        return;
    }
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, client_cert, client_key) = make_certs_with_client(certs.path());
    let b = tls_broker(certs.path(), true);
    let addr = amqps_addr(&b);
    run(async {
        let conn = within(
            "TLS connect with a client certificate",
            connect_tls_as(addr, &ca, Some((&client_cert, &client_key))),
        )
        .await
        .expect("a client with a certificate the CA signed gets in");
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            unique("tls-client").as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");

        // No certificate: the handshake fails.
        let anonymous = tokio::time::timeout(Duration::from_secs(10), connect_tls(addr, &ca)).await;
        assert!(
            !matches!(anonymous, Ok(Ok(_))),
            "a client without a certificate got in"
        );
        // A certificate from another CA: refused too.
        let other = tempfile::tempdir().expect("temp dir");
        let (_, other_cert, other_key) = make_certs_with_client(other.path());
        let stranger = tokio::time::timeout(
            Duration::from_secs(10),
            connect_tls_as(addr, &ca, Some((&other_cert, &other_key))),
        )
        .await;
        assert!(
            !matches!(stranger, Ok(Ok(_))),
            "a client with a certificate of another CA got in"
        );
        // The first client is unaffected.
        conn.create_channel().await.expect("still serving");
        let _ = conn.close(200, "bye".into()).await;
    });
}

#[test]
fn a_missing_certificate_stops_start_up_naming_the_setting() {
    if support::external_amqp().is_some() {
        return;
    }
    let mut b = Broker::launch_in(
        &tempfile::tempdir().expect("temp dir").path().join("data"),
        &[
            "--cluster-listen".to_owned(),
            "off".to_owned(),
            "--tls-cert".to_owned(),
            "/nonexistent/server.pem".to_owned(),
            "--tls-key".to_owned(),
            "/nonexistent/server.key".to_owned(),
        ],
    );
    let status = b.wait_for_exit();
    assert!(!status.success());
    let stderr = b.stderr_text();
    assert!(
        stderr.contains("amqp.tls_cert_file"),
        "start-up error should name the setting:\n{stderr}"
    );
}
