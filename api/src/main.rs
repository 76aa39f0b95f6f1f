//! `api`: serve the HTTP API, mint a demo token, verify the audit chain, register a signing
//! client, print the OpenAPI document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use api::auth::{Action, Claims, JwtConfig, JwtVerifier, Role};
use api::publish::{Publisher, PublisherConfig};
use api::{ApiConfig, AppState};
use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
#[command(name = "api", about = "HTTP API of the water-meter platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Token issuer (iss).
    #[arg(long, env = "API_JWT_ISSUER", default_value = "wm-dev")]
    issuer: String,
    /// Token audience (aud).
    #[arg(long, env = "API_JWT_AUDIENCE", default_value = "wm-api")]
    audience: String,
    /// HS256 secret.
    #[arg(long, env = "API_JWT_SECRET")]
    jwt_secret: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API.
    Serve {
        /// Listen address.
        #[arg(long, env = "API_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// PostgreSQL URL.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/wm"
        )]
        database_url: String,
        /// MQTT broker host.
        #[arg(long, env = "MQTT_HOST", default_value = "127.0.0.1")]
        mqtt_host: String,
        /// MQTT broker port.
        #[arg(long, env = "MQTT_PORT", default_value_t = 1883)]
        mqtt_port: u16,
        /// Topic root.
        #[arg(long, env = "TOPIC_ROOT", default_value = "wm/v1")]
        topic_root: String,
        /// Partitions P (the workers' value).
        #[arg(long, env = "PARTITIONS", default_value_t = 16)]
        partitions: u16,
        /// This node's id: gateway id of published readings, MQTT client id suffix.
        #[arg(long, env = "API_NODE_ID", default_value = "api")]
        node_id: String,
        #[command(flatten)]
        token: TokenArgs,
        /// JWKS URL for RS256 tokens.
        #[arg(long, env = "API_JWKS_URL")]
        jwks_url: Option<String>,
        /// Tariff files (quotes and bill runs).
        #[arg(long = "tariff", env = "API_TARIFFS", value_delimiter = ',')]
        tariffs: Vec<PathBuf>,
        /// High-risk actions that need a second factor (comma-separated; `none` for none).
        #[arg(
            long,
            env = "API_SECOND_FACTOR",
            value_delimiter = ',',
            default_value = "meter_retire,bill_rerun,read_edit,arrears_bulk_clear,valve_close,valve_open,hydrant_unlock"
        )]
        second_factor: Vec<String>,
        /// Largest request body, bytes.
        #[arg(long, env = "API_MAX_BODY", default_value_t = 8 * 1024 * 1024)]
        max_body_bytes: usize,
        /// Apply the database migrations first.
        #[arg(long)]
        migrate: bool,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key); without both, plain
        /// HTTP for running behind a TLS-terminating proxy.
        #[arg(long, env = "API_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM PKCS#8 private key of --tls-cert.
        #[arg(long, env = "API_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// How long a high-risk request held for a second approver stays pending, seconds.
        #[arg(long, env = "API_APPROVAL_TTL", default_value_t = 86_400)]
        approval_ttl_s: i64,
    },
    /// Print a signed HS256 token for the demo.
    DevToken {
        /// Roles (repeatable): meter_operator, meter_admin, meter_reader, billing, auditor, integration.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Subject.
        #[arg(long, default_value = "demo")]
        sub: String,
        /// Organisation, or * for all.
        #[arg(long, default_value = "*")]
        org: String,
        /// Areas (repeatable).
        #[arg(long = "area")]
        areas: Vec<String>,
        /// Claim a second factor (amr = [pwd, otp]).
        #[arg(long)]
        mfa: bool,
        /// Lifetime, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Audit-log operations.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Register (or re-key) a signing client for IF-METER-004.
    ClientAdd {
        /// Client id.
        #[arg(long)]
        id: String,
        /// HMAC secret (at least 16 characters).
        #[arg(long, env = "API_CLIENT_SECRET")]
        secret: String,
        /// Organisation the client may push for (default: every organisation).
        #[arg(long)]
        org: Option<String>,
        /// PostgreSQL URL.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/wm"
        )]
        database_url: String,
    },
    /// Create a dashboard user (or reset its password, role, scope and second factor).
    UserAdd {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Password (at least 8 characters; only its argon2id hash is stored).
        #[arg(long, env = "API_USER_PASSWORD")]
        password: String,
        /// Role: meter_operator, meter_admin, meter_reader, billing, auditor, integration.
        #[arg(long)]
        role: String,
        /// Organisation, or * for all.
        #[arg(long, default_value = "*")]
        org: String,
        /// Areas (repeatable; none: every area of the organisation).
        #[arg(long = "area")]
        areas: Vec<String>,
        /// RFC 6238 TOTP secret, base32: logins with its current code get amr [pwd, otp].
        #[arg(long)]
        totp_secret: Option<String>,
        /// PostgreSQL URL.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/wm"
        )]
        database_url: String,
    },
    /// Delete old call-log rows, idempotency keys, expired nonces and decided approval
    /// requests; expire approval requests past their deadline (cron; the scheduler's
    /// `api-retention` job does the same). Prints what it deleted as JSON.
    Retention {
        /// Days of call log kept.
        #[arg(long, default_value_t = 180)]
        call_log_days: i64,
        /// Days of push idempotency keys kept.
        #[arg(long, default_value_t = 7)]
        idempotency_days: i64,
        /// Days decided approval requests are kept.
        #[arg(long, default_value_t = 365)]
        approvals_days: i64,
        /// Count only; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// PostgreSQL URL.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/wm"
        )]
        database_url: String,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Print signed IF-METER-004 requests for a load run (`scripts/api-load.sh`): one line
    /// per request, `nonce TAB timestamp TAB signature TAB body`.
    LoadRequests {
        /// Requests.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Reads per request.
        #[arg(long, default_value_t = 500)]
        reads: usize,
        /// Signing client id.
        #[arg(long)]
        client: String,
        /// Its secret.
        #[arg(long, env = "API_CLIENT_SECRET")]
        secret: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; exit status 1 when a row was changed, deleted or inserted.
    Verify {
        /// PostgreSQL URL.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/wm"
        )]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve {
            listen,
            database_url,
            mqtt_host,
            mqtt_port,
            topic_root,
            partitions,
            node_id,
            token,
            jwks_url,
            tariffs,
            second_factor,
            max_body_bytes,
            migrate,
            tls_cert,
            tls_key,
            approval_ttl_s,
        } => {
            if !(60..=30 * 86_400).contains(&approval_ttl_s) {
                bail!("--approval-ttl-s must be 60..=2592000 (got {approval_ttl_s})");
            }
            // Read the certificate before anything else starts: a bad file fails at once.
            let tls = match (&tls_cert, &tls_key) {
                (Some(c), Some(k)) => Some(api::tls::acceptor_from_files(c, k)?),
                _ => None,
            };
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            if migrate {
                pipeline::MIGRATOR.run(&pool).await.context("migrating")?;
            }
            if token.jwt_secret.is_none() && jwks_url.is_none() {
                bail!(
                    "no way to verify tokens: set API_JWT_SECRET (HS256) or API_JWKS_URL (RS256)"
                );
            }
            let mut actions = Vec::new();
            for a in second_factor.iter().filter(|a| a.as_str() != "none") {
                actions.push(Action::parse(a).with_context(|| {
                    format!("--second-factor: unknown action {a:?} (meter_retire, bill_rerun, read_edit, arrears_bulk_clear, valve_close, valve_open, hydrant_unlock, none)")
                })?);
            }
            let tariff_book = if tariffs.is_empty() {
                None
            } else {
                Some(Arc::new(billing_core::TariffBook::load(&tariffs)?))
            };
            let gateway = model::GatewayId::new(node_id.clone())
                .with_context(|| format!("--node-id {node_id:?}"))?;
            let publisher = Publisher::start(PublisherConfig {
                host: mqtt_host,
                port: mqtt_port,
                client_id: format!("{node_id}-{:08x}", rand::random::<u32>()),
                topic_root,
                partitions,
                gateway,
                ack_timeout: Duration::from_secs(10),
            });
            let state = AppState {
                pool: pool.clone(),
                jwt: Arc::new(JwtVerifier::new(JwtConfig {
                    issuer: token.issuer,
                    audience: token.audience,
                    hs256_secret: token.jwt_secret.map(String::into_bytes),
                    jwks_url,
                    jwks_min_refresh: Duration::from_secs(60),
                })),
                publisher,
                metrics: Arc::default(),
                config: Arc::new(ApiConfig {
                    max_body_bytes,
                    second_factor_actions: actions,
                    approval_ttl: time::Duration::seconds(approval_ttl_s),
                    ..ApiConfig::default()
                }),
                tariffs: tariff_book,
                calls: api::calllog::CallLog::start(pool.clone()),
            };
            api::spawn_upkeep(pool);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let app = api::app(state).into_make_service_with_connect_info::<SocketAddr>();
            let shutdown = async {
                let _ignored = tokio::signal::ctrl_c().await;
            };
            if let Some(acceptor) = tls {
                use axum::serve::ListenerExt as _;
                tracing::info!(%listen, "api listening (HTTPS); OpenAPI UI at /api/v1/docs");
                // tap_io: lets ConnectInfo<SocketAddr> (call log peer) work on the TLS listener.
                let listener = api::tls::TlsListener::new(listener, acceptor)?.tap_io(|_| ());
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            } else {
                tracing::info!(%listen, "api listening (plain HTTP); OpenAPI UI at /api/v1/docs");
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            }
        }
        Command::DevToken {
            roles,
            sub,
            org,
            areas,
            mfa,
            ttl,
            token,
        } => {
            for r in &roles {
                if Role::parse(r).is_none() {
                    bail!(
                        "unknown role {r:?}: one of meter_operator, meter_admin, meter_reader, billing, auditor, integration"
                    );
                }
            }
            let secret = token
                .jwt_secret
                .context("set API_JWT_SECRET (or --jwt-secret) to the server's HS256 secret")?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let claims = Claims {
                sub,
                iss: token.issuer,
                aud: token.audience,
                exp: now + ttl,
                iat: now,
                roles,
                org: Some(org),
                areas,
                amr: if mfa {
                    vec!["pwd".into(), "otp".into()]
                } else {
                    vec!["pwd".into()]
                },
            };
            println!("{}", api::auth::sign_hs256(secret.as_bytes(), &claims)?);
        }
        Command::Audit {
            command: AuditCommand::Verify { database_url },
        } => {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            let report = api::audit::verify(&pool).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.intact {
                std::process::exit(1);
            }
        }
        Command::ClientAdd {
            id,
            secret,
            org,
            database_url,
        } => {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            api::signing::upsert_client(&pool, &id, &secret, org.as_deref()).await?;
            println!("client {id} registered");
        }
        Command::UserAdd {
            username,
            password,
            role,
            org,
            areas,
            totp_secret,
            database_url,
        } => {
            let role = Role::parse(&role).with_context(|| {
                format!("unknown role {role:?}: one of meter_operator, meter_admin, meter_reader, billing, auditor, integration")
            })?;
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            api::users::upsert_user(
                &pool,
                &api::users::NewUser {
                    username: username.clone(),
                    password,
                    role,
                    org,
                    areas,
                    totp_secret,
                },
            )
            .await?;
            println!("user {username} saved ({})", role.as_str());
        }
        Command::Retention {
            call_log_days,
            idempotency_days,
            approvals_days,
            dry_run,
            database_url,
        } => {
            for (flag, days) in [
                ("--call-log-days", call_log_days),
                ("--idempotency-days", idempotency_days),
                ("--approvals-days", approvals_days),
            ] {
                if days < 1 {
                    bail!("{flag} must be at least 1 (got {days})");
                }
            }
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            let report = pipeline::api_retention::run(
                &pool,
                time::OffsetDateTime::now_utc(),
                pipeline::api_retention::RetentionPolicy {
                    call_log: time::Duration::days(call_log_days),
                    idempotency: time::Duration::days(idempotency_days),
                    approvals: time::Duration::days(approvals_days),
                },
                dry_run,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Openapi => println!("{}", api::openapi_json()),
        Command::LoadRequests {
            count,
            reads,
            client,
            secret,
        } => {
            use std::io::Write as _;
            let _ = &client;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let base = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for i in 0..count {
                let items: Vec<serde_json::Value> = (0..reads)
                    .map(|j| {
                        let n = i * reads + j;
                        serde_json::json!({
                            "meter": format!("cjt188:{:014}", n % 100_000),
                            "ts": (base + time::Duration::seconds(i64::try_from(n / 100_000).unwrap_or(0)))
                                .format(&time::format_description::well_known::Rfc3339)
                                .unwrap_or_default(),
                            "value": format!("{}.{:03}", n % 99_999, n % 1000),
                            "unit": "m3",
                        })
                    })
                    .collect();
                let body = serde_json::to_string(&serde_json::json!({ "reads": items }))?;
                let nonce = format!("load-{i:08}-{:016x}", rand::random::<u64>());
                let sig = model::auth::sign_request(
                    secret.as_bytes(),
                    "POST",
                    "/api/v1/push",
                    now,
                    &nonce,
                    body.as_bytes(),
                );
                writeln!(out, "{nonce}\t{now}\t{sig}\t{body}")?;
            }
        }
    }
    Ok(())
}
