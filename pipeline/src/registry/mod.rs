//! The meter registry (IF-METER-001, IF-METER-002, METER-003): meters with their lifecycle,
//! models, books, customer bindings and serving gateway, as library functions the CLI
//! (`pipeline registry …`) and the API call alike. Every change is audited in `audit_log`
//! (who, when, the meter row before and after) in the same transaction as the change.
//!
//! - [`lifecycle`]: the pure state machine (illegal transitions are refused with
//!   [`RegistryError::IllegalTransition`]).
//! - [`csv`]: import (all-or-nothing, line-numbered errors, dry run) and export.
//! - [`live`]: `LISTEN wm_registry`, so running workers see changes within a second.
//! - [`sync`]: registry → gateways device sets, gateways → registry status and last frames.
//!
//! `meters.meter_id` stays the protocol address and the key of every other table;
//! `meter_no` is the utility's meter number, the key people use (and the one these functions
//! take).

pub mod csv;
pub mod lifecycle;
pub mod live;
pub mod sync;

use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;

pub use lifecycle::{Op, Status};

use crate::db::StoreError;

/// Why a registry operation was refused or failed. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No meter with that meter number (or meter id).
    #[error("no meter {0:?} in the registry")]
    NotFound(String),
    /// The lifecycle does not allow `op` from the meter's status.
    #[error("meter {meter_no}: {op} is not allowed from status {from}")]
    IllegalTransition {
        /// The meter.
        meter_no: String,
        /// Its status.
        from: Status,
        /// The refused operation.
        op: Op,
    },
    /// A field value is invalid.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The meter number or meter id is already registered.
    #[error("{field} {value:?} is already registered")]
    Duplicate {
        /// `meter_no` or `meter_id`.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A referenced book, model or meter does not exist.
    #[error("unknown {what} {value:?}")]
    Unknown {
        /// `meter_book`, `model_code`, ...
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The database failed.
    #[error("{stage}")]
    Db {
        /// What was being done.
        stage: &'static str,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// Re-validating held reads failed in storage.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn db(stage: &'static str) -> impl FnOnce(sqlx::Error) -> RegistryError {
    move |source| RegistryError::Db { stage, source }
}

fn invalid(field: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field,
        message: message.into(),
    }
}

/// Role of a meter in the network (`meters.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// A customer's meter (the default).
    #[default]
    Customer,
    /// DMA inlet meter.
    Inlet,
    /// DMA outlet meter.
    Outlet,
    /// Hydrant.
    Hydrant,
    /// Pressure point.
    Pressure,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Customer,
        Role::Inlet,
        Role::Outlet,
        Role::Hydrant,
        Role::Pressure,
    ];

    /// The database and CSV spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Inlet => "inlet",
            Role::Outlet => "outlet",
            Role::Hydrant => "hydrant",
            Role::Pressure => "pressure",
        }
    }

    /// Parses the database and CSV spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Protocols a meter id may be registered with (`meters.protocol`).
pub const PROTOCOLS: [&str; 6] = ["cjt188", "mbus", "wmbus", "modbus", "hydrant", "named"];

/// Everything the registry holds about one meter, as registered or imported.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeterInput {
    /// The utility's meter number (unique).
    pub meter_no: String,
    /// Protocol address (`cjt188:…`, `mbus:…`, `modbus:…`); the key other tables use.
    pub meter_id: String,
    /// `cjt188`, `mbus`, `wmbus`, `modbus`, `hydrant` or `named` (default: the id's prefix).
    pub protocol: String,
    /// Meter model (`meter_models`), which drives per-model status-bit meanings.
    pub model_code: Option<String>,
    /// Caliber, DN (15, 20, 25...).
    pub caliber_dn: Option<i16>,
    /// Permanent flow Q3, m³/h (default 2.5).
    pub q3: Option<Decimal>,
    /// Meter class (billing and VEE class name, default `residential_dn15`).
    pub meter_class: Option<String>,
    /// Register capacity (rollover point), m³ (default 100 000).
    pub register_capacity: Option<Decimal>,
    /// Lifecycle status: `None` keeps the current one (new meters: `in_stock`).
    pub status: Option<Status>,
    /// Organisation (data-scope permissions).
    pub org: Option<String>,
    /// Area within the organisation.
    pub area: Option<String>,
    /// Latitude, degrees.
    pub latitude: Option<Decimal>,
    /// Longitude, degrees.
    pub longitude: Option<Decimal>,
    /// Address text.
    pub address: Option<String>,
    /// Role in the network.
    pub role: Role,
    /// District metered area.
    pub dma: Option<String>,
    /// Meter book (`meter_books`).
    pub meter_book: Option<String>,
    /// Customer account bound to the meter.
    pub customer_account: Option<String>,
    /// Customer (tariff) class (default `residential`).
    pub customer_class: Option<String>,
    /// Persons in the household (per-person tiers; default 4).
    pub persons: Option<i32>,
    /// The meter has a valve.
    pub has_valve: bool,
    /// The valve may be closed automatically on a burst.
    pub auto_close_on_burst: bool,
    /// Protected customer: the valve is never closed for arrears or automatically.
    pub protected_customer: bool,
    /// The gateway serving the meter.
    pub gateway_id: Option<String>,
    /// The source on that gateway the meter is reached through.
    pub gateway_source: Option<String>,
    /// The meter's protocol address on that source (M-Bus primary, Modbus unit...).
    pub gateway_address: Option<String>,
    /// Name of the meter's key in the gateway's key file (never a key).
    pub key_ref: Option<String>,
    /// Register map name (Modbus).
    pub register_map: Option<String>,
    /// Installation time.
    pub installed_at: Option<OffsetDateTime>,
}

/// A name that may appear in a topic, a key-file reference or a code: `[A-Za-z0-9._:-]`.
fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl MeterInput {
    /// Checks every field on its own (no database); returns every problem as (field, message).
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut e = Vec::new();
        if !is_code(&self.meter_no) {
            e.push((
                "meter_no",
                format!(
                    "{:?} must be 1..64 characters of A-Z a-z 0-9 . _ : -",
                    self.meter_no
                ),
            ));
        }
        if let Err(err) = model::MeterId::new(self.meter_id.clone()) {
            e.push(("meter_id", format!("{:?}: {err}", self.meter_id)));
        }
        if !PROTOCOLS.contains(&self.protocol.as_str()) {
            e.push((
                "protocol",
                format!("{:?} is not one of {}", self.protocol, PROTOCOLS.join(", ")),
            ));
        }
        if self.caliber_dn.is_some_and(|d| d <= 0) {
            e.push(("caliber_dn", "must be positive".into()));
        }
        if self.q3.is_some_and(|q| q <= Decimal::ZERO) {
            e.push(("q3", "must be positive".into()));
        }
        if self.register_capacity.is_some_and(|q| q <= Decimal::ZERO) {
            e.push(("register_capacity", "must be positive".into()));
        }
        if self.latitude.is_some_and(|v| v.abs() > Decimal::from(90)) {
            e.push(("latitude", "must be within -90..90".into()));
        }
        if self.longitude.is_some_and(|v| v.abs() > Decimal::from(180)) {
            e.push(("longitude", "must be within -180..180".into()));
        }
        if self.persons.is_some_and(|p| p <= 0) {
            e.push(("persons", "must be positive".into()));
        }
        if self.auto_close_on_burst && !self.has_valve {
            e.push(("auto_close_on_burst", "needs has_valve".into()));
        }
        if self.auto_close_on_burst && self.protected_customer {
            e.push((
                "auto_close_on_burst",
                "a protected customer's valve is never closed automatically".into(),
            ));
        }
        if matches!(self.status, Some(Status::Replaced)) {
            e.push((
                "status",
                "`replaced` is reached only through a replacement".into(),
            ));
        }
        for (field, v) in [
            ("meter_book", &self.meter_book),
            ("model_code", &self.model_code),
            ("gateway_id", &self.gateway_id),
            ("gateway_source", &self.gateway_source),
            ("dma", &self.dma),
            ("register_map", &self.register_map),
        ] {
            if let Some(v) = v
                && !is_code(v)
            {
                e.push((
                    field,
                    format!("{v:?} must be 1..64 characters of A-Z a-z 0-9 . _ : -"),
                ));
            }
        }
        if let Some(k) = &self.key_ref {
            if !is_code(k) {
                e.push((
                    "key_ref",
                    "must be 1..64 characters of A-Z a-z 0-9 . _ : -".into(),
                ));
            } else if k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
                // The registry holds references only; a key in clear would travel to
                // gateways on a topic that may not be TLS-protected.
                e.push((
                    "key_ref",
                    "looks like a key (32 hex digits): give the name of the key in the gateway's key file"
                        .into(),
                ));
            }
        }
        if self.gateway_source.is_some() && self.gateway_id.is_none() {
            e.push(("gateway_source", "needs gateway_id".into()));
        }
        e
    }
}

/// The protocol implied by a meter id's prefix (`cjt188:…` → `cjt188`), else `named`.
pub fn protocol_of(meter_id: &str) -> &'static str {
    let prefix = meter_id.split(':').next().unwrap_or("");
    PROTOCOLS
        .into_iter()
        .find(|p| *p == prefix && meter_id.contains(':'))
        .unwrap_or("named")
}

/// The meter row as JSON (the audit log's before/after).
const ROW_JSON: &str = "to_jsonb(m) - 'created_at' - 'updated_at'";

/// A locked meter row: id, number, status, JSON.
struct Locked {
    meter_id: String,
    meter_no: String,
    status: Status,
    before: serde_json::Value,
}

async fn lock(conn: &mut PgConnection, meter: &str) -> Result<Locked, RegistryError> {
    let row = sqlx::query(&format!(
        "SELECT meter_id, coalesce(meter_no, meter_id), status, {ROW_JSON} FROM meters m
         WHERE meter_no = $1 OR meter_id = $1
         ORDER BY (meter_no = $1) DESC NULLS LAST LIMIT 1 FOR UPDATE"
    ))
    .bind(meter)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("locking the meter"))?
    .ok_or_else(|| RegistryError::NotFound(meter.to_owned()))?;
    let status: String = row.try_get(2).map_err(db("reading the meter"))?;
    Ok(Locked {
        meter_id: row.try_get(0).map_err(db("reading the meter"))?,
        meter_no: row.try_get(1).map_err(db("reading the meter"))?,
        status: Status::parse(&status)
            .ok_or_else(|| invalid("status", format!("unknown status {status:?} stored")))?,
        before: row.try_get(3).map_err(db("reading the meter"))?,
    })
}

/// Writes the audit row of a change to meter `meter_id`: the row before, the row now, and
/// `extra` facts of the operation.
async fn audit_meter(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    meter_id: &str,
    before: Option<&serde_json::Value>,
    extra: serde_json::Value,
) -> Result<(), RegistryError> {
    sqlx::query(&format!(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail)
         SELECT $1, $2, 'meter', coalesce(m.meter_no, m.meter_id),
                jsonb_build_object('before', $4::jsonb, 'after', {ROW_JSON}) || $5::jsonb
         FROM meters m WHERE m.meter_id = $3"
    ))
    .bind(actor)
    .bind(action)
    .bind(meter_id)
    .bind(before)
    .bind(extra)
    .execute(&mut *conn)
    .await
    .map_err(db("auditing the change"))?;
    Ok(())
}

fn check_actor(actor: &str) -> Result<(), RegistryError> {
    if actor.trim().is_empty() {
        return Err(invalid("actor", "every registry change says who made it"));
    }
    Ok(())
}

async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, RegistryError> {
    pool.begin().await.map_err(db("beginning"))
}

/// Checks `op` against the lifecycle and returns the new status.
fn transition(locked: &Locked, op: Op) -> Result<Status, RegistryError> {
    lifecycle::next(locked.status, op).ok_or_else(|| RegistryError::IllegalTransition {
        meter_no: locked.meter_no.clone(),
        from: locked.status,
        op,
    })
}

/// Checks the references of `m` that live in other tables (book, model).
async fn check_references(conn: &mut PgConnection, m: &MeterInput) -> Result<(), RegistryError> {
    if let Some(book) = &m.meter_book {
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM meter_books WHERE book_code = $1)")
                .bind(book)
                .fetch_one(&mut *conn)
                .await
                .map_err(db("looking up the book"))?;
        if !known {
            return Err(RegistryError::Unknown {
                what: "meter_book",
                value: book.clone(),
            });
        }
    }
    if let Some(model) = &m.model_code {
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM meter_models WHERE model_code = $1)")
                .bind(model)
                .fetch_one(&mut *conn)
                .await
                .map_err(db("looking up the model"))?;
        if !known {
            return Err(RegistryError::Unknown {
                what: "model_code",
                value: model.clone(),
            });
        }
    }
    Ok(())
}

/// Inserts or updates (by `meter_id`) the meter row of `m`; `status` is the status to store.
/// The caller has checked everything.
pub(crate) async fn upsert_row(
    conn: &mut PgConnection,
    m: &MeterInput,
    status: Status,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO meters (meter_id, meter_no, protocol, model_code, caliber_dn,
             nominal_flow_q3, meter_class, register_capacity, status, org, area, latitude,
             longitude, address, role, dma, meter_book, customer_class, persons, has_valve,
             auto_close_on_burst, protected_customer, gateway_id, gateway_source,
             gateway_address, key_ref, register_map, installed_at)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, 2.5), coalesce($7, 'residential_dn15'),
             coalesce($8, 100000), $9, $10, $11, $12, $13, $14, $15, $16, $17,
             coalesce($18, 'residential'), coalesce($19, 4), $20, $21, $22, $23, $24, $25,
             $26, $27, $28)
         ON CONFLICT (meter_id) DO UPDATE SET meter_no = excluded.meter_no,
             protocol = excluded.protocol, model_code = excluded.model_code,
             caliber_dn = excluded.caliber_dn, nominal_flow_q3 = excluded.nominal_flow_q3,
             meter_class = excluded.meter_class, register_capacity = excluded.register_capacity,
             status = excluded.status, org = excluded.org, area = excluded.area,
             latitude = excluded.latitude, longitude = excluded.longitude,
             address = excluded.address, role = excluded.role, dma = excluded.dma,
             meter_book = excluded.meter_book, customer_class = excluded.customer_class,
             persons = excluded.persons, has_valve = excluded.has_valve,
             auto_close_on_burst = excluded.auto_close_on_burst,
             protected_customer = excluded.protected_customer,
             gateway_id = excluded.gateway_id, gateway_source = excluded.gateway_source,
             gateway_address = excluded.gateway_address, key_ref = excluded.key_ref,
             register_map = excluded.register_map,
             installed_at = coalesce(excluded.installed_at, meters.installed_at),
             updated_at = now()",
    )
    .bind(&m.meter_id)
    .bind(&m.meter_no)
    .bind(&m.protocol)
    .bind(&m.model_code)
    .bind(m.caliber_dn)
    .bind(m.q3)
    .bind(&m.meter_class)
    .bind(m.register_capacity)
    .bind(status.as_str())
    .bind(&m.org)
    .bind(&m.area)
    .bind(m.latitude)
    .bind(m.longitude)
    .bind(&m.address)
    .bind(m.role.as_str())
    .bind(&m.dma)
    .bind(&m.meter_book)
    .bind(&m.customer_class)
    .bind(m.persons)
    .bind(m.has_valve)
    .bind(m.auto_close_on_burst)
    .bind(m.protected_customer)
    .bind(&m.gateway_id)
    .bind(&m.gateway_source)
    .bind(&m.gateway_address)
    .bind(&m.key_ref)
    .bind(&m.register_map)
    .bind(m.installed_at)
    .execute(&mut *conn)
    .await
    .map_err(db("writing the meter"))?;
    Ok(())
}

/// Opens a binding of `account` on the meter at `at` (closing another open one), unless that
/// account is already bound. Returns true when something changed.
pub(crate) async fn bind_in(
    conn: &mut PgConnection,
    meter_id: &str,
    account: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<bool, RegistryError> {
    let open: Option<String> = sqlx::query_scalar(
        "SELECT account_id FROM meter_customer_bindings WHERE meter_id = $1 AND unbound_at IS NULL",
    )
    .bind(meter_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading the binding"))?;
    if open.as_deref() == Some(account) {
        return Ok(false);
    }
    if open.is_some() {
        unbind_in(conn, meter_id, at, actor).await?;
    }
    sqlx::query(
        "INSERT INTO meter_customer_bindings (meter_id, account_id, bound_at, bound_by)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(meter_id)
    .bind(account)
    .bind(at)
    .bind(actor)
    .execute(&mut *conn)
    .await
    .map_err(db("binding the customer"))?;
    sqlx::query("UPDATE meters SET customer_account = $2, updated_at = now() WHERE meter_id = $1")
        .bind(meter_id)
        .bind(account)
        .execute(&mut *conn)
        .await
        .map_err(db("binding the customer"))?;
    Ok(true)
}

async fn unbind_in(
    conn: &mut PgConnection,
    meter_id: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<bool, RegistryError> {
    let closed = sqlx::query(
        "UPDATE meter_customer_bindings SET unbound_at = greatest($2, bound_at), unbound_by = $3
         WHERE meter_id = $1 AND unbound_at IS NULL",
    )
    .bind(meter_id)
    .bind(at)
    .bind(actor)
    .execute(&mut *conn)
    .await
    .map_err(db("unbinding the customer"))?
    .rows_affected();
    sqlx::query(
        "UPDATE meters SET customer_account = NULL, updated_at = now() WHERE meter_id = $1",
    )
    .bind(meter_id)
    .execute(&mut *conn)
    .await
    .map_err(db("unbinding the customer"))?;
    Ok(closed > 0)
}

/// Registers a new meter, status `in_stock` (whatever `m.status` says), and binds its customer
/// account if one is given.
///
/// # Errors
/// [`RegistryError::Invalid`] for a bad field, [`RegistryError::Duplicate`] when the meter
/// number or id is taken, [`RegistryError::Unknown`] for an unknown book or model.
pub async fn register(pool: &PgPool, m: &MeterInput, actor: &str) -> Result<(), RegistryError> {
    check_actor(actor)?;
    if let Some((field, message)) = m.check().into_iter().next() {
        return Err(RegistryError::Invalid { field, message });
    }
    let mut tx = begin(pool).await?;
    let taken: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT meter_id, meter_no FROM meters WHERE meter_id = $1 OR meter_no = $2 LIMIT 1",
    )
    .bind(&m.meter_id)
    .bind(&m.meter_no)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("checking for duplicates"))?;
    if let Some((id, no)) = taken {
        return Err(if no.as_deref() == Some(m.meter_no.as_str()) {
            RegistryError::Duplicate {
                field: "meter_no",
                value: m.meter_no.clone(),
            }
        } else {
            RegistryError::Duplicate {
                field: "meter_id",
                value: id,
            }
        });
    }
    check_references(&mut tx, m).await?;
    upsert_row(&mut tx, m, Status::InStock).await?;
    if let Some(account) = &m.customer_account {
        bind_in(
            &mut tx,
            &m.meter_id,
            account,
            OffsetDateTime::now_utc(),
            actor,
        )
        .await?;
    }
    audit_meter(
        &mut tx,
        actor,
        "registry.register",
        &m.meter_id,
        None,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(())
}

/// Runs a plain lifecycle transition `op` on `meter` (number or id): status, plus the column
/// updates `set` (SQL assignments with `$2` bound to `at`).
async fn simple_transition(
    pool: &PgPool,
    meter: &str,
    op: Op,
    set: &str,
    at: OffsetDateTime,
    actor: &str,
    extra: serde_json::Value,
) -> Result<Status, RegistryError> {
    check_actor(actor)?;
    let mut tx = begin(pool).await?;
    let locked = lock(&mut tx, meter).await?;
    let to = transition(&locked, op)?;
    sqlx::query(&format!(
        "UPDATE meters SET status = $3{set}, updated_at = now() WHERE meter_id = $1 AND $2::timestamptz IS NOT NULL"
    ))
    .bind(&locked.meter_id)
    .bind(at)
    .bind(to.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db("updating the status"))?;
    audit_meter(
        &mut tx,
        actor,
        &format!("registry.{op}"),
        &locked.meter_id,
        Some(&locked.before),
        extra,
    )
    .await?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(to)
}

/// Installs a meter from stock at `at` (`in_stock` → `installed`); reads before `at` are
/// refused by VEE from then on.
///
/// # Errors
/// [`RegistryError::IllegalTransition`] unless the meter is in stock.
pub async fn install(
    pool: &PgPool,
    meter: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<Status, RegistryError> {
    simple_transition(
        pool,
        meter,
        Op::Install,
        ", installed_at = $2",
        at,
        actor,
        serde_json::json!({}),
    )
    .await
}

/// Commissions an installed meter, or returns a repaired faulty one to service.
///
/// # Errors
/// [`RegistryError::IllegalTransition`] from any other status.
pub async fn activate(pool: &PgPool, meter: &str, actor: &str) -> Result<Status, RegistryError> {
    simple_transition(
        pool,
        meter,
        Op::Activate,
        "",
        OffsetDateTime::now_utc(),
        actor,
        serde_json::json!({}),
    )
    .await
}

/// Marks a mounted meter faulty, with the reason.
///
/// # Errors
/// [`RegistryError::IllegalTransition`] unless installed or active.
pub async fn mark_faulty(
    pool: &PgPool,
    meter: &str,
    reason: &str,
    actor: &str,
) -> Result<Status, RegistryError> {
    if reason.trim().is_empty() {
        return Err(invalid("reason", "say why the meter is faulty"));
    }
    simple_transition(
        pool,
        meter,
        Op::MarkFaulty,
        "",
        OffsetDateTime::now_utc(),
        actor,
        serde_json::json!({"reason": reason}),
    )
    .await
}

/// Retires a meter at `at`: reads after `at` are refused by VEE; its customer is unbound.
///
/// # Errors
/// [`RegistryError::IllegalTransition`] for a meter already replaced or retired.
pub async fn retire(
    pool: &PgPool,
    meter: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<Status, RegistryError> {
    check_actor(actor)?;
    let mut tx = begin(pool).await?;
    let locked = lock(&mut tx, meter).await?;
    let to = transition(&locked, Op::Retire)?;
    unbind_in(&mut tx, &locked.meter_id, at, actor).await?;
    sqlx::query(
        "UPDATE meters SET status = $3, retired_at = $2, updated_at = now() WHERE meter_id = $1",
    )
    .bind(&locked.meter_id)
    .bind(at)
    .bind(to.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db("retiring the meter"))?;
    audit_meter(
        &mut tx,
        actor,
        "registry.retire",
        &locked.meter_id,
        Some(&locked.before),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(to)
}

/// A meter replacement (IF-METER-002).
#[derive(Debug, Clone, PartialEq)]
pub struct Replacement {
    /// When the device was swapped.
    pub at: OffsetDateTime,
    /// Final register reading of the old device, m³.
    pub old_final: Decimal,
    /// Initial register reading of the new device, m³.
    pub new_initial: Decimal,
    /// The new device's meter number when it is registered under its own number and address
    /// (it must be in stock or installed): the old meter becomes `replaced` and the new one
    /// takes over its customer, book, DMA, role, location and gateway. `None`: the new device
    /// keeps this meter's number and address, and VEE bridges the register restart.
    pub successor: Option<String>,
}

/// What a replacement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplaceOutcome {
    /// Reads held as `rejected register_decrease` after the replacement time that are now
    /// validated.
    pub revalidated: u64,
    /// Held reads that are still rejected after re-validation.
    pub still_rejected: u64,
}

/// Records a replacement: a `meter_replacements` row (what VEE and billing use to bridge the
/// register restart), the status change, and (same meter id) re-validation of the reads held
/// as `rejected register_decrease` since `at`, all in one transaction.
///
/// # Errors
/// [`RegistryError::IllegalTransition`] unless the meter is mounted;
/// [`RegistryError::Invalid`] for negative readings or a time in the future.
pub async fn replace(
    pool: &PgPool,
    meter: &str,
    r: &Replacement,
    actor: &str,
) -> Result<ReplaceOutcome, RegistryError> {
    check_actor(actor)?;
    if r.old_final < Decimal::ZERO || r.new_initial < Decimal::ZERO {
        return Err(invalid("reading", "register readings are never negative"));
    }
    if r.at > OffsetDateTime::now_utc() + time::Duration::minutes(5) {
        return Err(invalid("at", "a replacement cannot be in the future"));
    }
    let mut tx = begin(pool).await?;
    // Before any row lock, as every writer that recomputes rollups does: no ingest commit can
    // slip between the re-validation and its rollups.
    crate::db::journal::lock_out_ingest(&mut tx).await?;
    let locked = lock(&mut tx, meter).await?;
    let op = if r.successor.is_some() {
        Op::ReplaceBySuccessor
    } else {
        Op::Replace
    };
    let to = transition(&locked, op)?;
    sqlx::query(
        "INSERT INTO meter_replacements (meter_id, replaced_at, old_final_value,
             new_initial_value, recorded_by) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&locked.meter_id)
    .bind(r.at)
    .bind(r.old_final)
    .bind(r.new_initial)
    .bind(actor)
    .execute(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            invalid("at", "a replacement is already recorded at that time")
        }
        _ => db("recording the replacement")(e),
    })?;
    let mut outcome = ReplaceOutcome::default();
    let mut extra = serde_json::json!({
        "replaced_at": r.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "old_final": r.old_final.to_string(),
        "new_initial": r.new_initial.to_string(),
    });
    match &r.successor {
        None => {
            sqlx::query("UPDATE meters SET status = $2, updated_at = now() WHERE meter_id = $1")
                .bind(&locked.meter_id)
                .bind(to.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db("updating the status"))?;
            outcome = revalidate_held(&mut tx, &locked.meter_id, r.at).await?;
            extra["revalidated"] = outcome.revalidated.into();
            extra["still_rejected"] = outcome.still_rejected.into();
        }
        Some(successor) => {
            let next = lock(&mut tx, successor).await?;
            if next.meter_id == locked.meter_id {
                return Err(invalid("successor", "a meter cannot succeed itself"));
            }
            if !matches!(next.status, Status::InStock | Status::Installed) {
                return Err(RegistryError::IllegalTransition {
                    meter_no: next.meter_no.clone(),
                    from: next.status,
                    op: Op::Activate,
                });
            }
            let account: Option<String> =
                sqlx::query_scalar("SELECT customer_account FROM meters WHERE meter_id = $1")
                    .bind(&locked.meter_id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("reading the binding"))?;
            unbind_in(&mut tx, &locked.meter_id, r.at, actor).await?;
            sqlx::query(
                "UPDATE meters n SET status = 'active', installed_at = $3, role = o.role,
                     dma = o.dma, meter_book = o.meter_book, org = o.org, area = o.area,
                     latitude = o.latitude, longitude = o.longitude, address = o.address,
                     customer_class = o.customer_class, persons = o.persons,
                     township = o.township, protected_customer = o.protected_customer,
                     gateway_id = coalesce(n.gateway_id, o.gateway_id),
                     gateway_source = coalesce(n.gateway_source, o.gateway_source),
                     updated_at = now()
                 FROM meters o WHERE n.meter_id = $2 AND o.meter_id = $1",
            )
            .bind(&locked.meter_id)
            .bind(&next.meter_id)
            .bind(r.at)
            .execute(&mut *tx)
            .await
            .map_err(db("activating the successor"))?;
            if let Some(account) = account {
                bind_in(&mut tx, &next.meter_id, &account, r.at, actor).await?;
            }
            sqlx::query(
                "UPDATE meters SET status = $2, retired_at = $3, updated_at = now()
                 WHERE meter_id = $1",
            )
            .bind(&locked.meter_id)
            .bind(to.as_str())
            .bind(r.at)
            .execute(&mut *tx)
            .await
            .map_err(db("updating the status"))?;
            extra["successor"] = next.meter_no.clone().into();
            audit_meter(
                &mut tx,
                actor,
                "registry.succeed",
                &next.meter_id,
                Some(&next.before),
                serde_json::json!({"predecessor": locked.meter_no}),
            )
            .await?;
        }
    }
    audit_meter(
        &mut tx,
        actor,
        &format!("registry.{op}"),
        &locked.meter_id,
        Some(&locked.before),
        extra,
    )
    .await?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(outcome)
}

/// Re-validates the reads of `meter_id` held as `rejected register_decrease` after `since`
/// (inside the caller's transaction, which holds the ingest-journal lock): each moves to
/// `reading_history` and goes through VEE again with the meter's replacements, in time order;
/// the results are stored with their rollups and the meter state like a manual read.
async fn revalidate_held(
    tx: &mut PgConnection,
    meter_id: &str,
    since: OffsetDateTime,
) -> Result<ReplaceOutcome, RegistryError> {
    use time::format_description::well_known::Rfc3339;
    let rows = crate::db::readings::held_register_decreases(&mut *tx, meter_id, since).await?;
    if rows.is_empty() {
        return Ok(ReplaceOutcome::default());
    }
    let mut held = Vec::with_capacity(rows.len());
    for row in rows {
        let json = serde_json::json!({
            "meter": meter_id,
            "ts": row.ts.format(&Rfc3339).unwrap_or_default(),
            "clock": row.clock,
            "quantity": row.quantity,
            "value": row.value,
            "unit": row.unit,
            "storage": row.storage,
            "tariff": row.tariff,
            "subunit": row.subunit,
            "quality": {"status": "actual"},
            "provenance": {
                "gateway": row.gateway,
                "source": row.source,
                "source_id": row.source_id,
                "frame_hash": row.frame_hash,
                "received_at": row.received_at.format(&Rfc3339).unwrap_or_default(),
                "channel": row.channel,
            },
        });
        let reading: model::Reading = serde_json::from_value(json)
            .map_err(|e| invalid("reading", format!("a held read cannot be rebuilt: {e}")))?;
        held.push(reading);
    }
    crate::db::readings::move_held_to_history(tx, meter_id, since).await?;
    let mut vee = crate::db::meter_state::load_vee_filtered(
        tx,
        crate::vee::VeeConfig::default(),
        Some(meter_id),
        |_| true,
    )
    .await?;
    if let Some(state) = crate::db::journal::latest_state(tx, meter_id).await? {
        vee.insert_state(meter_id, state);
    }
    let out = vee.validate(held, OffsetDateTime::now_utc());
    let still = out
        .readings
        .iter()
        .filter(|r| matches!(r.quality, model::Quality::Rejected { .. }))
        .count() as u64;
    let ok = out
        .readings
        .iter()
        .filter(|r| r.quality.is_billable() && r.clock != model::ClockSource::Pipeline)
        .count() as u64;
    let rejects: Vec<crate::db::rejects::RejectRecord> = out
        .conflicts
        .iter()
        .map(crate::db::rejects::RejectRecord::conflict)
        .collect();
    crate::db::write_batch(
        tx,
        &crate::db::WriteSet {
            readings: &out.readings,
            mode: crate::db::WriteMode::Direct {
                usage: &out.usage,
                states: Some(&out.states),
            },
            progress: &[],
            rejects: &rejects,
            out_of_order: &out.out_of_order,
            alarms: None,
        },
        crate::db::StoreOptions::default(),
    )
    .await?;
    Ok(ReplaceOutcome {
        revalidated: ok,
        still_rejected: still,
    })
}

/// Binds customer `account` to the meter at `at` (closing any other open binding).
///
/// # Errors
/// [`RegistryError::Invalid`] for an empty account; [`RegistryError::IllegalTransition`] for
/// a replaced or retired meter.
pub async fn bind_customer(
    pool: &PgPool,
    meter: &str,
    account: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<bool, RegistryError> {
    check_actor(actor)?;
    if !is_code(account) {
        return Err(invalid(
            "account",
            "1..64 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    let mut tx = begin(pool).await?;
    let locked = lock(&mut tx, meter).await?;
    if matches!(locked.status, Status::Replaced | Status::Retired) {
        return Err(invalid(
            "status",
            format!(
                "meter {} is {}; bind the account to its successor",
                locked.meter_no, locked.status
            ),
        ));
    }
    let changed = bind_in(&mut tx, &locked.meter_id, account, at, actor).await?;
    if changed {
        audit_meter(
            &mut tx,
            actor,
            "registry.bind_customer",
            &locked.meter_id,
            Some(&locked.before),
            serde_json::json!({"account": account}),
        )
        .await?;
    }
    tx.commit().await.map_err(db("committing"))?;
    Ok(changed)
}

/// Ends the meter's open customer binding at `at`. Returns false when none was open.
///
/// # Errors
/// [`RegistryError::NotFound`] for an unknown meter.
pub async fn unbind_customer(
    pool: &PgPool,
    meter: &str,
    at: OffsetDateTime,
    actor: &str,
) -> Result<bool, RegistryError> {
    check_actor(actor)?;
    let mut tx = begin(pool).await?;
    let locked = lock(&mut tx, meter).await?;
    let changed = unbind_in(&mut tx, &locked.meter_id, at, actor).await?;
    if changed {
        audit_meter(
            &mut tx,
            actor,
            "registry.unbind_customer",
            &locked.meter_id,
            Some(&locked.before),
            serde_json::json!({}),
        )
        .await?;
    }
    tx.commit().await.map_err(db("committing"))?;
    Ok(changed)
}

/// Moves the meter to another meter book.
///
/// # Errors
/// [`RegistryError::Unknown`] for an unknown book.
pub async fn move_book(
    pool: &PgPool,
    meter: &str,
    book: &str,
    actor: &str,
) -> Result<(), RegistryError> {
    check_actor(actor)?;
    let mut tx = begin(pool).await?;
    let locked = lock(&mut tx, meter).await?;
    check_references(
        &mut tx,
        &MeterInput {
            meter_book: Some(book.to_owned()),
            ..MeterInput::default()
        },
    )
    .await?;
    sqlx::query("UPDATE meters SET meter_book = $2, updated_at = now() WHERE meter_id = $1")
        .bind(&locked.meter_id)
        .bind(book)
        .execute(&mut *tx)
        .await
        .map_err(db("moving the meter"))?;
    audit_meter(
        &mut tx,
        actor,
        "registry.move_book",
        &locked.meter_id,
        Some(&locked.before),
        serde_json::json!({"book": book}),
    )
    .await?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(())
}

/// Billing cycle length of a meter book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cycle {
    /// Every month.
    Monthly,
    /// Every two months.
    Bimonthly,
}

impl Cycle {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Cycle::Monthly => "monthly",
            Cycle::Bimonthly => "bimonthly",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Cycle> {
        [Cycle::Monthly, Cycle::Bimonthly]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// A meter book (抄表册).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Book {
    /// Code (`meters.meter_book`).
    pub code: String,
    /// Name.
    pub name: String,
    /// Meter reader responsible.
    pub reader: Option<String>,
    /// Cycle length (one per book).
    pub cycle: Cycle,
}

/// Creates a meter book, or updates its name and reader. A book keeps one cycle length:
/// changing it is refused (its cycles would no longer line up).
///
/// # Errors
/// [`RegistryError::Invalid`] for a bad code or a cycle change.
pub async fn save_book(pool: &PgPool, book: &Book, actor: &str) -> Result<(), RegistryError> {
    check_actor(actor)?;
    if !is_code(&book.code) {
        return Err(invalid(
            "book_code",
            "1..64 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    let mut tx = begin(pool).await?;
    let before: Option<(serde_json::Value, String)> = sqlx::query_as(
        "SELECT to_jsonb(b) - 'created_at', cycle FROM meter_books b WHERE book_code = $1 FOR UPDATE",
    )
    .bind(&book.code)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading the book"))?;
    if let Some((_, cycle)) = &before
        && cycle != book.cycle.as_str()
    {
        return Err(invalid(
            "cycle",
            format!(
                "book {} is {cycle}; a book keeps one cycle length",
                book.code
            ),
        ));
    }
    sqlx::query(
        "INSERT INTO meter_books (book_code, name, reader, cycle) VALUES ($1, $2, $3, $4)
         ON CONFLICT (book_code) DO UPDATE SET name = excluded.name, reader = excluded.reader",
    )
    .bind(&book.code)
    .bind(&book.name)
    .bind(&book.reader)
    .bind(book.cycle.as_str())
    .execute(&mut *tx)
    .await
    .map_err(db("saving the book"))?;
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail)
         SELECT $1, 'registry.save_book', 'meter_book', $2,
                jsonb_build_object('before', $3::jsonb, 'after', to_jsonb(b) - 'created_at')
         FROM meter_books b WHERE book_code = $2",
    )
    .bind(actor)
    .bind(&book.code)
    .bind(before.map(|b| b.0))
    .execute(&mut *tx)
    .await
    .map_err(db("auditing the book"))?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(())
}

/// Meanings a model's status bit may have (`meter_model_status_bits.meaning`).
pub const STATUS_BIT_MEANINGS: [&str; 9] = [
    "magnetic_tamper",
    "valve_closed",
    "valve_fault",
    "battery_low",
    "reverse_flow",
    "leak",
    "empty_pipe",
    "cover_open",
    "other",
];

/// A meter model and what its CJ/T 188 status bits mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterModel {
    /// Model code.
    pub code: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Description.
    pub description: String,
    /// (bit 0..15 of ST1|ST2<<8, meaning).
    pub status_bits: Vec<(u8, String)>,
}

/// Creates or replaces a meter model and its status-bit map.
///
/// # Errors
/// [`RegistryError::Invalid`] for a bad code, a bit above 15 or an unknown meaning.
pub async fn save_model(
    pool: &PgPool,
    model: &MeterModel,
    actor: &str,
) -> Result<(), RegistryError> {
    check_actor(actor)?;
    if !is_code(&model.code) {
        return Err(invalid(
            "model_code",
            "1..64 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    for (bit, meaning) in &model.status_bits {
        if *bit > 15 {
            return Err(invalid("status_bits", format!("bit {bit} is above 15")));
        }
        if !STATUS_BIT_MEANINGS.contains(&meaning.as_str()) {
            return Err(invalid(
                "status_bits",
                format!(
                    "{meaning:?} is not one of {}",
                    STATUS_BIT_MEANINGS.join(", ")
                ),
            ));
        }
    }
    let mut tx = begin(pool).await?;
    let before: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('model', to_jsonb(mm) - 'created_at', 'bits',
                (SELECT coalesce(jsonb_object_agg(bit, meaning), '{}') FROM meter_model_status_bits b
                 WHERE b.model_code = mm.model_code))
         FROM meter_models mm WHERE model_code = $1 FOR UPDATE",
    )
    .bind(&model.code)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading the model"))?;
    sqlx::query(
        "INSERT INTO meter_models (model_code, manufacturer, description) VALUES ($1, $2, $3)
         ON CONFLICT (model_code) DO UPDATE SET manufacturer = excluded.manufacturer,
             description = excluded.description",
    )
    .bind(&model.code)
    .bind(&model.manufacturer)
    .bind(&model.description)
    .execute(&mut *tx)
    .await
    .map_err(db("saving the model"))?;
    sqlx::query("DELETE FROM meter_model_status_bits WHERE model_code = $1")
        .bind(&model.code)
        .execute(&mut *tx)
        .await
        .map_err(db("saving the status bits"))?;
    let bits: Vec<i16> = model.status_bits.iter().map(|b| i16::from(b.0)).collect();
    let meanings: Vec<&str> = model.status_bits.iter().map(|b| b.1.as_str()).collect();
    sqlx::query(
        "INSERT INTO meter_model_status_bits (model_code, bit, meaning)
         SELECT $1, * FROM unnest($2::smallint[], $3::text[])",
    )
    .bind(&model.code)
    .bind(&bits)
    .bind(&meanings)
    .execute(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            invalid("status_bits", "a bit is given twice")
        }
        _ => db("saving the status bits")(e),
    })?;
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail)
         VALUES ($1, 'registry.save_model', 'meter_model', $2,
                 jsonb_build_object('before', $3::jsonb, 'after', $4::jsonb))",
    )
    .bind(actor)
    .bind(&model.code)
    .bind(before)
    .bind(serde_json::json!({
        "manufacturer": model.manufacturer,
        "description": model.description,
        "bits": model.status_bits.iter().map(|(b, m)| (b.to_string(), m.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    }))
    .execute(&mut *tx)
    .await
    .map_err(db("auditing the model"))?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(())
}

/// The status-bit map of a model: bit → meaning.
///
/// # Errors
/// [`RegistryError::Db`] when the query fails.
pub async fn status_bits(
    pool: &PgPool,
    model_code: &str,
) -> Result<Vec<(u8, String)>, RegistryError> {
    let rows: Vec<(i16, String)> = sqlx::query_as(
        "SELECT bit, meaning FROM meter_model_status_bits WHERE model_code = $1 ORDER BY bit",
    )
    .bind(model_code)
    .fetch_all(pool)
    .await
    .map_err(db("reading the status bits"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(b, m)| u8::try_from(b).ok().map(|b| (b, m)))
        .collect())
}

/// The lifecycle status of a meter (by number or id).
///
/// # Errors
/// [`RegistryError::NotFound`] for an unknown meter.
pub async fn status_of(pool: &PgPool, meter: &str) -> Result<Status, RegistryError> {
    let mut conn = pool.acquire().await.map_err(db("acquiring a connection"))?;
    let mut tx = conn.begin().await.map_err(db("beginning"))?;
    let locked = lock(&mut tx, meter).await?;
    tx.rollback().await.ok();
    Ok(locked.status)
}
