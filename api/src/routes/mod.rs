//! The routes, one module per interface group.

pub mod alarms;
pub mod approvals;
pub mod arrears;
pub mod audit;
pub mod billing;
pub mod commands;
pub mod dash;
pub mod events;
pub mod health;
pub mod login;
pub mod meters;
pub mod push;
pub mod readings;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Scope;
use crate::error::ApiError;

/// The dashboard's routes (issue 23): login, its read endpoints and the live event stream.
pub(crate) fn dashboard_routers() -> utoipa_axum::router::OpenApiRouter<crate::AppState> {
    utoipa_axum::router::OpenApiRouter::new()
        .merge(login::router())
        .merge(dash::router())
        .merge(events::router())
}

/// The data-scope condition on a `meters m` row, with the organisation bound to `$org` and
/// the areas to `$areas` (placeholders given by the caller).
pub(crate) fn scope_sql(org: usize, areas: usize) -> String {
    format!(
        "(${org}::text IS NULL OR m.org = ${org}) AND (${areas}::text[] IS NULL OR m.area = ANY(${areas}))"
    )
}

/// A meter as addressed in a path, by its id.
#[derive(Debug, Clone)]
pub(crate) struct MeterRef {
    pub meter_id: String,
}

/// Finds a meter by number or id within `scope`; a meter outside the scope is "not found" so
/// its existence does not leak.
pub(crate) async fn meter_in_scope(
    pool: &PgPool,
    scope: &Scope,
    key: &str,
) -> Result<MeterRef, ApiError> {
    let row: Option<(String,)> = sqlx::query_as(&format!(
        "SELECT meter_id FROM meters m WHERE (m.meter_no = $1 OR m.meter_id = $1) AND {}
         ORDER BY (m.meter_no = $1) DESC LIMIT 1",
        scope_sql(2, 3)
    ))
    .bind(key)
    .bind(&scope.org)
    .bind(scope.areas_param())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::db("looking up a meter"))?;
    row.map(|(meter_id,)| MeterRef { meter_id })
        .ok_or_else(|| ApiError::NotFound(format!("no meter {key:?} in your scope")))
}

/// Paging of list endpoints.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip (default 0).
    pub offset: Option<i64>,
}

impl Page {
    /// (limit, offset), checked.
    pub(crate) fn resolve(self, max: i64) -> Result<(i64, i64), ApiError> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=max).contains(&limit) {
            return Err(ApiError::field("limit", format!("must be 1..{max}")));
        }
        let offset = self.offset.unwrap_or(0);
        if !(0..=10_000_000).contains(&offset) {
            return Err(ApiError::field("offset", "must be 0..10000000"));
        }
        Ok((limit, offset))
    }
}

/// A page of results.
#[derive(Debug, Serialize, ToSchema)]
pub struct Paged<T> {
    /// The rows.
    pub items: Vec<T>,
    /// Offset of the next page, absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

impl<T> Paged<T> {
    pub(crate) fn new(items: Vec<T>, limit: i64, offset: i64) -> Self {
        let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit;
        Self {
            items,
            next_offset: full.then_some(offset + limit),
        }
    }
}
