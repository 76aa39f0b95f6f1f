//! `GET /api/v1/events`: live updates for the dashboard as server-sent events, fed by
//! PostgreSQL `LISTEN wm_events` (migration `0070_dashboard.sql`: alarms, commands, gateways).
//! Any API node can serve any client: the notifications come from the database, not from the
//! node that made the change. Authenticated with the bearer header (the page reads the stream
//! with `fetch`, which can send it; `EventSource` cannot).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiQuery, Auth};
use crate::rbac;
use crate::routes::scope_sql;

/// The notification channel the triggers send on.
pub const CHANNEL: &str = "wm_events";

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

/// Stream options.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Close the stream after this many seconds (0..3600, default 900); the page then
    /// reconnects with its current token, so a stream never outlives a login by long.
    pub max_s: Option<u64>,
}

/// One change (the `data` of an SSE event whose `event` is its `kind`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ChangeEvent {
    /// `alarm`, `command` or `gateway`.
    pub kind: String,
    /// Alarm id, command id or gateway id.
    pub id: String,
    /// The meter concerned (alarms and commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    /// State after the change (`open`, `acknowledged`, `closed`; a command state; `online` or
    /// `offline`).
    pub state: Option<String>,
}

struct Feed {
    listener: PgListener,
    principal: Principal,
    pool: sqlx::PgPool,
    deadline: tokio::time::Instant,
    started: bool,
}

/// Live changes of alarms, commands and gateways (server-sent events). The first event is
/// `ready`; each change is an event named by its kind with a [`ChangeEvent`] as data; `resync`
/// means notifications may have been lost (reload what is shown). Each kind goes only to roles
/// that may read it, alarms and commands only for meters in the caller's scope.
#[utoipa::path(get, path = "/api/v1/events", tag = "DASHBOARD", params(EventsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of ChangeEvent", body = ChangeEvent,
        content_type = "text/event-stream"), (status = 403, body = Problem)))]
async fn events(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    p.require(rbac::DASHBOARD_READ)?;
    let max_s = q.max_s.unwrap_or(900);
    if max_s > 3600 {
        return Err(ApiError::field("max_s", "must be 0..3600"));
    }
    let mut listener = PgListener::connect_with(&s.pool)
        .await
        .map_err(ApiError::db("connecting the event listener"))?;
    listener
        .listen(CHANNEL)
        .await
        .map_err(ApiError::db("listening for events"))?;
    let feed = Feed {
        listener,
        principal: p,
        pool: s.pool.clone(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(max_s),
        started: false,
    };
    let stream = futures::stream::unfold(feed, |mut f| async move {
        if !f.started {
            f.started = true;
            let ev = Event::default().event("ready").data("{}");
            return Some((Ok::<Event, Infallible>(ev), f));
        }
        loop {
            let next = tokio::select! {
                n = f.listener.try_recv() => n,
                () = tokio::time::sleep_until(f.deadline) => return None,
            };
            match next {
                Ok(Some(n)) => {
                    let Ok(ev) = serde_json::from_str::<ChangeEvent>(n.payload()) else {
                        continue;
                    };
                    if visible(&f.pool, &f.principal, &ev).await {
                        let data = serde_json::to_string(&ev).unwrap_or_default();
                        let out = Event::default().event(ev.kind.clone()).data(data);
                        return Some((Ok(out), f));
                    }
                }
                // The connection was lost and re-established: notifications in between are gone.
                Ok(None) => return Some((Ok(Event::default().event("resync").data("{}")), f)),
                Err(e) => {
                    tracing::warn!(error = %e, "event listener failed; closing the stream");
                    return None;
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Whether the caller may see `ev`: the kind's read roles, and for meter events the scope.
async fn visible(pool: &sqlx::PgPool, p: &Principal, ev: &ChangeEvent) -> bool {
    let roles = match ev.kind.as_str() {
        "alarm" => rbac::ALARMS_READ,
        "command" => rbac::COMMANDS_READ,
        "gateway" => rbac::DASHBOARD_READ,
        _ => return false,
    };
    if p.require(roles).is_err() {
        return false;
    }
    let unscoped = p.scope.org.is_none() && p.scope.areas.is_empty();
    match (&ev.meter, unscoped) {
        (_, true) | (None, false) => true,
        (Some(meter), false) => sqlx::query_scalar::<_, bool>(&format!(
            "SELECT EXISTS (SELECT 1 FROM meters m WHERE m.meter_id = $3 AND {})",
            scope_sql(1, 2)
        ))
        .bind(&p.scope.org)
        .bind(p.scope.areas_param())
        .bind(meter)
        .fetch_one(pool)
        .await
        .unwrap_or(false),
    }
}
