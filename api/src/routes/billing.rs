//! IF-REV-005 billing: bill runs as jobs, bills, arrears and payments, tariff quotes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use billing_core::QuoteRequest;
use pipeline::billing::{Arrears, Cycle, RunOptions, RunProgress};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, Paged, meter_in_scope, scope_sql};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start_bill_run))
        .routes(routes!(job))
        .routes(routes!(list_bills))
        .routes(routes!(bill))
        .routes(routes!(record_arrears))
        .routes(routes!(payment))
        .routes(routes!(quote))
}

time::serde::format_description!(date_fmt, Date, "[year]-[month]-[day]");

/// A bill run to start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BillRunRequest {
    /// Meter book.
    pub book: String,
    /// First day of the cycle (`YYYY-MM-DD`, local date).
    #[serde(with = "date_fmt")]
    #[schema(value_type = String, format = Date)]
    pub period_start: Date,
    /// Day after the last day.
    #[serde(with = "date_fmt")]
    #[schema(value_type = String, format = Date)]
    pub period_end: Date,
}

/// A started job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobStarted {
    /// Job id (`GET /api/v1/jobs/{id}`).
    pub job_id: i64,
}

/// A job's state.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct JobView {
    /// Id.
    pub job_id: i64,
    /// `bill_run`.
    pub kind: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Items to do, once known.
    pub total: Option<i32>,
    /// Items done.
    pub done: i32,
    /// The parameters.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// The result when done.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

struct Progress {
    total: AtomicUsize,
    done: AtomicUsize,
}

impl RunProgress for Progress {
    fn start(&self, meters: usize) {
        self.total.store(meters, Ordering::Relaxed);
    }
    fn meter_done(&self, _meter_id: &str) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// IF-REV-005 账单生成: start a bill run of a meter book and cycle as a job. Running a cycle
/// that already ran is a rerun (high-risk: second factor).
#[utoipa::path(post, path = "/api/v1/bill-runs", tag = "IF-REV-005", request_body = BillRunRequest,
    security(("bearer" = [])),
    responses((status = 202, body = JobStarted), (status = 403, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
async fn start_bill_run(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(r): ApiJson<BillRunRequest>,
) -> Result<(StatusCode, axum::Json<JobStarted>), ApiError> {
    p.require(rbac::BILL_RUN)?;
    if r.period_end <= r.period_start || r.period_end - r.period_start > time::Duration::days(93) {
        return Err(ApiError::field(
            "period_end",
            "must be after period_start, within 93 days",
        ));
    }
    let (book_known, outside): (bool, i64) = sqlx::query_as(&format!(
        "SELECT EXISTS (SELECT 1 FROM meter_books WHERE book_code = $3),
                (SELECT count(*) FROM meters m WHERE m.meter_book = $3 AND NOT ({}))",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(&r.book)
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("checking the book"))?;
    if !book_known {
        return Err(ApiError::field(
            "book",
            format!("unknown meter book {:?}", r.book),
        ));
    }
    if outside > 0 {
        return Err(ApiError::Forbidden(format!(
            "book {:?} has {outside} meters outside your scope",
            r.book
        )));
    }
    let tariffs = s
        .tariffs
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no tariff is configured on this node".into()))?;
    let (ran,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM billing_cycles
                        WHERE meter_book = $1 AND period_start = $2 AND period_end = $3)",
    )
    .bind(&r.book)
    .bind(r.period_start)
    .bind(r.period_end)
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("checking for a previous run"))?;
    if ran {
        p.require_second_factor(Action::BillRerun, &s.config.second_factor_actions)?;
    }
    let params = serde_json::json!({
        "book": r.book, "period_start": r.period_start.to_string(),
        "period_end": r.period_end.to_string(), "rerun": ran,
    });
    let (job_id,): (i64,) = sqlx::query_as(
        "INSERT INTO api_jobs (kind, params, state, created_by) VALUES ('bill_run', $1, 'running', $2)
         RETURNING job_id",
    )
    .bind(&params)
    .bind(p.actor())
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("creating the job"))?;
    let cycle = Cycle {
        meter_book: r.book,
        period_start: r.period_start,
        period_end: r.period_end,
    };
    tokio::spawn(run_job(s.pool.clone(), tariffs, cycle, p.actor(), job_id));
    Ok((StatusCode::ACCEPTED, axum::Json(JobStarted { job_id })))
}

async fn run_job(
    pool: sqlx::PgPool,
    tariffs: Arc<billing_core::TariffBook>,
    cycle: Cycle,
    actor: String,
    job_id: i64,
) {
    let progress = Arc::new(Progress {
        total: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    });
    let reporter = {
        let pool = pool.clone();
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let total =
                    i32::try_from(progress.total.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
                let done = i32::try_from(progress.done.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
                let _ignored = sqlx::query(
                    "UPDATE api_jobs SET total = $2, done = $3, updated_at = now()
                     WHERE job_id = $1 AND state = 'running'",
                )
                .bind(job_id)
                .bind(total)
                .bind(done)
                .execute(&pool)
                .await;
            }
        })
    };
    let options = RunOptions {
        actor,
        ..RunOptions::default()
    };
    let outcome =
        pipeline::billing::run_cycle_observed(&pool, &tariffs, &cycle, &options, &*progress).await;
    reporter.abort();
    let total = i32::try_from(progress.total.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
    let done = i32::try_from(progress.done.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
    let (state, result, error) = match outcome {
        Ok(rep) => (
            "done",
            Some(serde_json::json!({
                "run_id": rep.run_id, "cycle_id": rep.cycle_id, "created": rep.created,
                "adjusted": rep.adjusted, "unchanged": rep.unchanged, "skipped": rep.skipped,
            })),
            None,
        ),
        Err(e) => {
            tracing::error!(job_id, error = ?e, "bill run failed");
            ("failed", None, Some(e.to_string()))
        }
    };
    if let Err(e) = sqlx::query(
        "UPDATE api_jobs SET state = $2, result = $3, error = $4, total = $5, done = $6,
                updated_at = now() WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(state)
    .bind(result)
    .bind(error)
    .bind(total)
    .bind(done)
    .execute(&pool)
    .await
    {
        tracing::error!(job_id, error = %e, "cannot record the end of a bill-run job");
    }
}

/// IF-REV-005: a job's progress and result.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "IF-REV-005",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = JobView), (status = 404, body = Problem)))]
async fn job(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<JobView>, ApiError> {
    p.require(rbac::BILLS_READ)?;
    let j: Option<JobView> = sqlx::query_as(
        "SELECT job_id, kind, state, total, done, params, result, error FROM api_jobs WHERE job_id = $1",
    )
    .bind(id)
    .fetch_optional(&s.pool)
    .await
    .map_err(ApiError::db("reading a job"))?;
    j.map(axum::Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

/// A bill.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct BillView {
    /// Id.
    pub bill_id: i64,
    /// Meter id.
    pub meter_id: String,
    /// Meter book.
    pub meter_book: String,
    /// Cycle start (local date).
    #[schema(value_type = String)]
    pub period_start: String,
    /// Cycle end (exclusive).
    #[schema(value_type = String)]
    pub period_end: String,
    /// 0 = original; >0 = adjustment.
    pub revision: i32,
    /// Customer class.
    pub customer_class: String,
    /// Tariff version.
    pub tariff_version: String,
    /// Usage, m³.
    #[schema(value_type = String)]
    pub usage_m3: Decimal,
    /// Based on an estimate.
    pub estimated: bool,
    /// Total, yuan.
    #[schema(value_type = String)]
    pub total: Decimal,
}

/// A bill line.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct BillLineView {
    /// Component.
    pub component: String,
    /// Tier (0 for fixed charges).
    pub tier: i32,
    /// Volume, m³.
    #[schema(value_type = String)]
    pub volume_m3: Decimal,
    /// Unit price.
    #[schema(value_type = String)]
    pub unit_price: Decimal,
    /// Amount, yuan.
    #[schema(value_type = String)]
    pub amount: Decimal,
}

/// A bill with its lines.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BillDetail {
    /// The bill.
    #[serde(flatten)]
    pub bill: BillView,
    /// Its lines.
    pub lines: Vec<BillLineView>,
}

/// Bill filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BillQuery {
    /// Meter number or id.
    pub meter: Option<String>,
    /// Meter book.
    pub book: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

const BILL_COLUMNS: &str =
    "b.bill_id, b.meter_id, c.meter_book, c.period_start::text AS period_start,
    c.period_end::text AS period_end, b.revision, b.customer_class, b.tariff_version, b.usage_m3,
    b.estimated, b.total";

/// IF-REV-005: bills of meters in scope, newest first.
#[utoipa::path(get, path = "/api/v1/bills", tag = "IF-REV-005", params(BillQuery),
    security(("bearer" = [])), responses((status = 200, body = Paged<BillView>)))]
async fn list_bills(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<BillQuery>,
) -> Result<axum::Json<Paged<BillView>>, ApiError> {
    p.require(rbac::BILLS_READ)?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let meter = match &q.meter {
        Some(m) => Some(meter_in_scope(&s.pool, &p.scope, m).await?.meter_id),
        None => None,
    };
    let items: Vec<BillView> = sqlx::query_as(&format!(
        "SELECT {BILL_COLUMNS} FROM bills b JOIN billing_cycles c ON c.cycle_id = b.cycle_id
         JOIN meters m ON m.meter_id = b.meter_id
         WHERE {} AND ($3::text IS NULL OR b.meter_id = $3) AND ($4::text IS NULL OR c.meter_book = $4)
         ORDER BY b.bill_id DESC LIMIT $5 OFFSET $6",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(meter)
    .bind(&q.book)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing bills"))?;
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

/// IF-REV-005: one bill with its lines.
#[utoipa::path(get, path = "/api/v1/bills/{id}", tag = "IF-REV-005",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = BillDetail), (status = 404, body = Problem)))]
async fn bill(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<BillDetail>, ApiError> {
    p.require(rbac::BILLS_READ)?;
    // Bills are partitioned by their cycle's month (migration 0140): the month comes from
    // bill_index first, so only that month's partition is searched (run-time pruning), not
    // one index per month.
    let bill: Option<BillView> = sqlx::query_as(&format!(
        "SELECT {BILL_COLUMNS} FROM bills b JOIN billing_cycles c ON c.cycle_id = b.cycle_id
         JOIN meters m ON m.meter_id = b.meter_id
         WHERE b.bill_id = $3
           AND b.period_start = (SELECT i.period_start FROM bill_index i WHERE i.bill_id = $3)
           AND {}",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(id)
    .fetch_optional(&s.pool)
    .await
    .map_err(ApiError::db("reading a bill"))?;
    let bill = bill.ok_or_else(|| ApiError::NotFound(format!("no bill {id} in your scope")))?;
    // The lines sit in their bill's month; the bill's period_start is its cycle's.
    let lines: Vec<BillLineView> = sqlx::query_as(
        "SELECT component, tier, volume_m3, unit_price, amount FROM bill_lines
         WHERE bill_id = $1 AND period_start = $2::date ORDER BY line_no",
    )
    .bind(id)
    .bind(&bill.period_start)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("reading bill lines"))?;
    Ok(axum::Json(BillDetail { bill, lines }))
}

/// One meter's overdue debt as the revenue system reports it; 0 clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArrearsRecord {
    /// Meter number or id.
    pub meter: String,
    /// Customer account.
    pub account_id: String,
    /// Yuan overdue (≥ 0, at most two decimals); 0 clears.
    #[schema(value_type = String)]
    pub amount_overdue: Decimal,
    /// First overdue day (`YYYY-MM-DD`).
    #[serde(with = "date_fmt")]
    #[schema(value_type = String, format = Date)]
    pub overdue_since: Date,
}

/// A batch of arrears records.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArrearsBatch {
    /// The records (at most 5000).
    pub records: Vec<ArrearsRecord>,
}

/// How many records were stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Recorded {
    /// Records stored.
    pub recorded: usize,
    /// Of them, clearings (amount 0).
    pub cleared: usize,
}

async fn store_arrears(
    s: &AppState,
    p: &Principal,
    records: Vec<ArrearsRecord>,
) -> Result<Recorded, ApiError> {
    // Validate and resolve everything first: a batch is stored whole or not at all (as far as
    // validation goes; each record is its own audited transaction).
    let mut resolved = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        if r.amount_overdue.is_sign_negative() || r.amount_overdue.normalize().scale() > 2 {
            return Err(ApiError::field(
                format!("records[{i}].amount_overdue"),
                "a non-negative yuan amount with at most two decimals",
            ));
        }
        if r.account_id.is_empty() || r.account_id.len() > 64 {
            return Err(ApiError::field(
                format!("records[{i}].account_id"),
                "1..64 characters",
            ));
        }
        let m = meter_in_scope(&s.pool, &p.scope, &r.meter)
            .await
            .map_err(|e| match e {
                ApiError::NotFound(d) => ApiError::field(format!("records[{i}].meter"), d),
                other => other,
            })?;
        resolved.push(Arrears {
            meter_id: m.meter_id,
            account_id: r.account_id,
            amount_overdue: r.amount_overdue,
            overdue_since: r.overdue_since,
            reported_at: OffsetDateTime::now_utc(),
        });
    }
    let cleared = resolved
        .iter()
        .filter(|a| a.amount_overdue.is_zero())
        .count();
    if cleared > 1 {
        p.require_second_factor(Action::ArrearsBulkClear, &s.config.second_factor_actions)?;
    }
    for a in &resolved {
        pipeline::billing::record_arrears(&s.pool, a, &p.actor()).await?;
    }
    Ok(Recorded {
        recorded: resolved.len(),
        cleared,
    })
}

/// IF-REV-005: arrears input from the revenue system (clearing more than one meter at once is
/// high-risk: second factor).
#[utoipa::path(post, path = "/api/v1/arrears", tag = "IF-REV-005", request_body = ArrearsBatch,
    security(("bearer" = [])),
    responses((status = 200, body = Recorded), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem)))]
async fn record_arrears(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(b): ApiJson<ArrearsBatch>,
) -> Result<axum::Json<Recorded>, ApiError> {
    p.require(rbac::ARREARS_WRITE)?;
    if b.records.is_empty() {
        return Err(ApiError::field("records", "no records"));
    }
    if b.records.len() > s.config.max_batch {
        return Err(ApiError::TooLarge(format!(
            "at most {} records",
            s.config.max_batch
        )));
    }
    Ok(axum::Json(store_arrears(&s, &p, b.records).await?))
}

/// A payment that settles a meter's arrears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    /// Meter number or id.
    pub meter: String,
    /// Customer account.
    pub account_id: String,
}

/// IF-REV-005: a payment clears the meter's arrears.
#[utoipa::path(post, path = "/api/v1/payments", tag = "IF-REV-005", request_body = Payment,
    security(("bearer" = [])),
    responses((status = 200, body = Recorded), (status = 422, body = Problem)))]
async fn payment(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(pay): ApiJson<Payment>,
) -> Result<axum::Json<Recorded>, ApiError> {
    p.require(rbac::ARREARS_WRITE)?;
    let today = OffsetDateTime::now_utc().date();
    let rec = ArrearsRecord {
        meter: pay.meter,
        account_id: pay.account_id,
        amount_overdue: Decimal::ZERO,
        overdue_since: today,
    };
    Ok(axum::Json(store_arrears(&s, &p, vec![rec]).await?))
}

/// What to quote.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuoteInput {
    /// Customer class.
    pub class: String,
    /// Persons in the household; needed only when the class has a per-person allowance.
    pub persons: Option<u32>,
    /// Usage to price, m³.
    #[schema(value_type = String)]
    pub usage: Decimal,
    /// Usage earlier in the tier period, m³ (default 0).
    #[schema(value_type = Option<String>)]
    pub usage_before: Option<Decimal>,
    /// Tariff date (`YYYY-MM-DD`, default today).
    #[serde(default, with = "date_fmt::option")]
    #[schema(value_type = Option<String>, format = Date)]
    pub date: Option<Date>,
    /// Township prices.
    #[serde(default)]
    pub township: bool,
}

/// IF-REV-005: price a usage with the tariff in force (a class without a per-person allowance
/// needs no `persons`).
#[utoipa::path(post, path = "/api/v1/tariffs/quote", tag = "IF-REV-005", request_body = QuoteInput,
    security(("bearer" = [])),
    responses((status = 200, body = Object), (status = 422, body = Problem),
        (status = 503, body = Problem)))]
async fn quote(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(q): ApiJson<QuoteInput>,
) -> Result<axum::Json<billing_core::Quote>, ApiError> {
    p.require(rbac::QUOTE)?;
    let tariffs = s
        .tariffs
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no tariff is configured on this node".into()))?;
    let date = q.date.unwrap_or_else(|| OffsetDateTime::now_utc().date());
    let (_, class) = tariffs
        .lookup(&q.class, date)
        .map_err(|e| ApiError::field("class", e.to_string()))?;
    let per_person = class.base_persons.is_some() && !class.extra_volume_per_person.is_zero();
    let persons = match q.persons {
        Some(n) => n,
        None if per_person => {
            return Err(ApiError::field(
                "persons",
                format!(
                    "class {:?} has a per-person allowance: give persons",
                    q.class
                ),
            ));
        }
        // Tier bounds do not depend on the household: any size gives the same price.
        None => class.base_persons.unwrap_or(1).max(1),
    };
    let mut req = QuoteRequest::new(
        q.class.clone(),
        persons,
        q.usage_before.unwrap_or(Decimal::ZERO),
        q.usage,
    );
    req.township = q.township;
    let quote = billing_core::quote(&tariffs, date, &req).map_err(|e| match e {
        billing_core::BillingError::OutOfRange { field, .. } => {
            ApiError::field(field, e.to_string())
        }
        other => ApiError::field("class", other.to_string()),
    })?;
    Ok(axum::Json(quote))
}
