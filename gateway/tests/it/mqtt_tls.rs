//! MQTT over TLS against a real Mosquitto started for the test with two TLS listeners: one
//! with username/password, one that requires a client certificate. Certificates are made at
//! test time with the `openssl` command line tool.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edge_config::MqttTls;
use gateway::mqtt::{MqttEndpoint, TlsSetupError, tls_connector};
use gateway::runtime::{Gateway, RuntimeError};
use model::ReadingBatch;
use rumqttc::{AsyncClient, ConnectionError, Event, Packet, QoS};
use rust_decimal::Decimal;

const USER: &str = "gw-uplink";
const PASSWORD: &str = "s3cret-uplink";

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line tool is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and, signed by it, a certificate with `ext` extensions; files `{name}.pem`/`.key`.
fn issue(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let subj = format!("/CN={cn}");
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
    run(dir, &req);
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    run(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extfile,
        ],
    );
}

fn make_ca(dir: &Path, name: &str) {
    let (key, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    run(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto process with a password listener and a client-certificate listener.
struct TlsBroker {
    child: Child,
    dir: PathBuf,
    password_port: u16,
    cert_port: u16,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl TlsBroker {
    async fn start(dir: &Path) -> TlsBroker {
        make_ca(dir, "ca");
        make_ca(dir, "rogue-ca");
        issue(
            dir,
            "ca",
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        issue(
            dir,
            "ca",
            "client",
            "gw-tls-client",
            "extendedKeyUsage=clientAuth\n",
        );
        issue(
            dir,
            "rogue-ca",
            "rogue-client",
            "intruder",
            "extendedKeyUsage=clientAuth\n",
        );
        let passwd = dir.join("passwd");
        let out = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args([USER, PASSWORD])
            .output()
            .expect("mosquitto_passwd is installed");
        assert!(out.status.success(), "{out:?}");
        let (password_port, cert_port) = (free_port(), free_port());
        let d = dir.display();
        let conf = format!(
            "per_listener_settings true\npersistence false\nlog_dest stderr\nuser root\n\
             listener {password_port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             listener {cert_port} 127.0.0.1\nallow_anonymous false\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             require_certificate true\nuse_identity_as_username true\n"
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed");
        let broker = TlsBroker {
            child,
            dir: dir.to_owned(),
            password_port,
            cert_port,
        };
        for port in [password_port, cert_port] {
            let mut up = false;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    up = true;
                    break;
                }
            }
            assert!(up, "mosquitto did not listen on {port}: {}", broker.log());
        }
        broker
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    fn tls(&self, ca: &str, client: Option<&str>) -> MqttTls {
        MqttTls {
            ca: Some(self.dir.join(format!("{ca}.pem"))),
            client: client.map(|c| {
                (
                    self.dir.join(format!("{c}.pem")),
                    self.dir.join(format!("{c}.key")),
                )
            }),
        }
    }

    fn endpoint(
        &self,
        port: u16,
        tls: &MqttTls,
        credentials: Option<(&str, &str)>,
    ) -> MqttEndpoint {
        MqttEndpoint {
            host: "127.0.0.1".into(),
            port,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            keep_alive: Duration::from_secs(10),
            tls: Some(tls_connector(tls).unwrap()),
        }
    }
}

/// Connects and returns the CONNACK or the first connection error.
async fn first_outcome(endpoint: &MqttEndpoint, client_id: &str) -> Result<(), ConnectionError> {
    let (_client, mut el) = AsyncClient::new(endpoint.options(client_id, None), 8);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("an outcome within 10 s")
}

/// A client on `endpoint` subscribed to `filter`, forwarding payloads; returns once SUBACKed.
async fn tls_subscriber(
    endpoint: &MqttEndpoint,
    client_id: &str,
    filter: &str,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let (client, mut el) = AsyncClient::new(endpoint.options(client_id, None), 64);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filter = filter.to_owned();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        r.send(()).ok();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p.payload.to_vec()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("TLS test client {filter}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("SUBACK in time")
        .unwrap();
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_uplink_and_concentrator_sources_work_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TlsBroker::start(dir.path()).await;
    let root = common::unique_prefix("tls");
    let site = format!("{root}/site");
    let cid = root.replace('/', "-");

    let up = broker.endpoint(
        broker.password_port,
        &broker.tls("ca", None),
        Some((USER, PASSWORD)),
    );
    let (_sub, mut batches) =
        tls_subscriber(&up, &format!("{cid}-sub"), &format!("{root}/readings/#")).await;

    // Relative TLS paths: `load` resolves them against the file's folder.
    let toml = format!(
        r#"gateway_id = "gw-tls"
[uplink]
broker = "mqtts://127.0.0.1:{pp}"
client_id = "{cid}"
username = "{USER}"
password = "{PASSWORD}"
tls_ca = "ca.pem"
topic_root = "{root}"
[spool]
dir = "spool"
[metrics]
listen = "127.0.0.1:0"
[[source]]
id = "conc"
kind = "mqtt"
broker = "mqtts://127.0.0.1:{cp}"
client_id = "{cid}-conc"
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
topics = [{{ filter = "{site}/c3/+/readings", format = "json" }}]
[[source]]
id = "conc5"
kind = "mqtt"
protocol = "5"
broker = "mqtts://127.0.0.1:{cp}"
client_id = "{cid}-conc5"
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
topics = [{{ filter = "{site}/c5/+/readings", format = "json" }}]
[[source]]
id = "hydrants"
kind = "hydrant_mqtt"
host = "127.0.0.1"
port = {cp}
client_id = "{cid}-hyd"
topic_prefix = "{site}/hydrant"
tls = true
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
"#,
        pp = broker.password_port,
        cp = broker.cert_port,
    );
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, toml).unwrap();
    let config = edge_config::load(&file).unwrap();
    assert_eq!(
        config.uplink.tls().unwrap().ca,
        Some(dir.path().join("ca.pem"))
    );
    let gateway = Gateway::start(config).await.unwrap();

    // A concentrator with its own client certificate publishes on the certificate listener.
    let conc = broker.endpoint(broker.cert_port, &broker.tls("ca", Some("client")), None);
    let (publisher, _rx) =
        tls_subscriber(&conc, &format!("{cid}-pub"), &format!("{root}/unused")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (topic, meter, volume) in [
        ("c3/a/readings", "cjt188:00000000000031", "3.125"),
        ("c5/b/readings", "cjt188:00000000000051", "5.5"),
    ] {
        let json = format!(
            r#"{{"v":1,"concentrator":"c","sent_at":"2026-11-24T10:00:00Z","readings":[{{"meter":"{meter}","ts":"2026-11-24T09:00:00Z","volume_m3":"{volume}"}}]}}"#
        );
        publisher
            .publish(format!("{site}/{topic}"), QoS::AtLeastOnce, false, json)
            .await
            .unwrap();
    }
    let hydrant_up = r#"{"v":1,"hydrant":"h1","ts":"2026-11-25T10:00:00Z","pressure_bar":"3.20","state":"closed","locked":true,"events":[]}"#;
    publisher
        .publish(
            format!("{site}/hydrant/h1/up"),
            QoS::AtLeastOnce,
            false,
            hydrant_up,
        )
        .await
        .unwrap();

    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while !got.iter().any(|(m, _)| m == "hydrant:h1") || got.len() < 3 {
            let b: ReadingBatch = serde_json::from_slice(&batches.recv().await.unwrap()).unwrap();
            for e in b.entries {
                let keep = matches!(
                    e.reading.quantity,
                    model::Quantity::Volume | model::Quantity::Pressure
                );
                if keep {
                    got.push((e.reading.meter.to_string(), e.reading.value));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("readings over TLS in time; broker log:\n{}", broker.log()));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cjt188:00000000000031".into(), Decimal::new(3125, 3)),
            ("cjt188:00000000000051".into(), Decimal::new(55, 1)),
            ("hydrant:h1".into(), Decimal::new(320, 2)),
        ]
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_wrong_ca_missing_or_foreign_client_certs_and_bad_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TlsBroker::start(dir.path()).await;
    let id = common::unique_prefix("tls-refusals").replace('/', "-");

    // The right CA and password: connected.
    let good = broker.endpoint(
        broker.password_port,
        &broker.tls("ca", None),
        Some((USER, PASSWORD)),
    );
    first_outcome(&good, &format!("{id}-ok")).await.unwrap();

    // A broker certificate from a CA we do not trust: the handshake fails.
    let rogue = broker.endpoint(
        broker.password_port,
        &broker.tls("rogue-ca", None),
        Some((USER, PASSWORD)),
    );
    let e = first_outcome(&rogue, &format!("{id}-rogue"))
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectionError::Tls(_)), "{e:?}");

    // Wrong password: the broker refuses the CONNECT.
    let wrong = broker.endpoint(
        broker.password_port,
        &broker.tls("ca", None),
        Some((USER, "not-the-password")),
    );
    let e = first_outcome(&wrong, &format!("{id}-pw"))
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectionError::ConnectionRefused(_)), "{e:?}");

    // The certificate listener: no client certificate, or one from another CA, is refused;
    // ours is accepted.
    for (client, accepted) in [
        (None, false),
        (Some("rogue-client"), false),
        (Some("client"), true),
    ] {
        let ep = broker.endpoint(broker.cert_port, &broker.tls("ca", client), None);
        let outcome = first_outcome(
            &ep,
            &format!("{id}-{client:?}").replace(['"', ' ', '(', ')'], ""),
        )
        .await;
        assert_eq!(
            outcome.is_ok(),
            accepted,
            "client cert {client:?}: {outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_the_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path(), "ca");
    issue(
        dir.path(),
        "ca",
        "client",
        "c",
        "extendedKeyUsage=clientAuth\n",
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();

    let e = tls_connector(&MqttTls {
        ca: Some(junk.clone()),
        client: None,
    })
    .unwrap_err();
    assert!(
        matches!(&e, TlsSetupError::Certificate { path, .. } if path == &junk),
        "{e}"
    );
    // The CA's key is not the client certificate's key.
    let e = tls_connector(&MqttTls {
        ca: None,
        client: Some((dir.path().join("client.pem"), dir.path().join("ca.key"))),
    })
    .unwrap_err();
    assert!(matches!(e, TlsSetupError::Build { .. }), "{e}");
    assert!(e.to_string().contains("client.pem"), "{e}");
    // A key that is not PKCS#8 PEM.
    std::fs::write(
        dir.path().join("bad.key"),
        "-----BEGIN RSA PRIVATE KEY-----\nAA==\n-----END RSA PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = tls_connector(&MqttTls {
        ca: None,
        client: Some((dir.path().join("client.pem"), dir.path().join("bad.key"))),
    })
    .unwrap_err();
    assert!(matches!(e, TlsSetupError::Identity { .. }), "{e}");
    assert!(e.to_string().contains("PKCS#8"), "{e}");

    // Through the gateway: the start fails, naming the connection.
    let toml = format!(
        r#"gateway_id = "gw-tls-bad"
[uplink]
broker = "mqtts://127.0.0.1:1"
tls_ca = "{}"
[spool]
dir = "{}"
"#,
        junk.display(),
        dir.path().join("spool").display()
    );
    let config = edge_config::parse(&toml, "t.toml".as_ref()).unwrap();
    match Gateway::start(config).await {
        Err(RuntimeError::Tls { what, .. }) => assert_eq!(what, "uplink broker"),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // `load` refuses a missing file and a TLS file on a plain connection, naming the field.
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "gateway_id = \"gw\"\n[uplink]\nbroker = \"mqtts://h\"\ntls_ca = \"missing.pem\"\n\
         [spool]\ndir = \"spool\"\n",
    )
    .unwrap();
    let errors = edge_config::load(&file).unwrap_err().0;
    assert_eq!(errors[0].field, "uplink.tls_ca");
    assert!(errors[0].message.contains("missing.pem"), "{errors:?}");
    std::fs::write(
        &file,
        "gateway_id = \"gw\"\n[uplink]\nbroker = \"mqtt://h\"\ntls_ca = \"ca.pem\"\n\
         [spool]\ndir = \"spool\"\n",
    )
    .unwrap();
    let errors = edge_config::load(&file).unwrap_err().0;
    assert_eq!(errors[0].field, "uplink.tls_ca");
    assert!(errors[0].message.contains("mqtts://"), "{errors:?}");
}
