//! Writes to and reads from PostgreSQL.

use model::Reading;
use sqlx::PgPool;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A value could not be encoded for storage.
    #[error("cannot encode {field} for meter {meter}")]
    Encode {
        /// Field that failed.
        field: &'static str,
        /// Meter of the reading.
        meter: String,
    },
}

/// Inserts readings in one statement; rows already stored (same meter, ts, quantity, tariff,
/// subunit) are left untouched. Returns how many rows were new.
///
/// # Errors
/// Returns [`StoreError`] when the database refuses the batch; nothing is written then.
pub async fn insert_readings(pool: &PgPool, readings: &[Reading]) -> Result<u64, StoreError> {
    if readings.is_empty() {
        return Ok(0);
    }
    let mut meter = Vec::with_capacity(readings.len());
    let mut ts = Vec::with_capacity(readings.len());
    let mut quantity = Vec::with_capacity(readings.len());
    let mut tariff = Vec::with_capacity(readings.len());
    let mut subunit = Vec::with_capacity(readings.len());
    let mut storage = Vec::with_capacity(readings.len());
    let mut value = Vec::with_capacity(readings.len());
    let mut unit = Vec::with_capacity(readings.len());
    let mut quality = Vec::with_capacity(readings.len());
    let mut clock = Vec::with_capacity(readings.len());
    let mut source = Vec::with_capacity(readings.len());
    let mut source_id = Vec::with_capacity(readings.len());
    let mut gateway = Vec::with_capacity(readings.len());
    let mut frame_hash = Vec::with_capacity(readings.len());
    let mut received_at = Vec::with_capacity(readings.len());
    for r in readings {
        let encode = |field| StoreError::Encode {
            field,
            meter: r.meter.to_string(),
        };
        meter.push(r.meter.as_str().to_owned());
        ts.push(r.ts);
        quantity.push(r.quantity.as_str().to_owned());
        tariff.push(i16::try_from(r.tariff).map_err(|_| encode("tariff"))?);
        subunit.push(i16::try_from(r.subunit).map_err(|_| encode("subunit"))?);
        storage.push(i32::try_from(r.storage).map_err(|_| encode("storage"))?);
        value.push(r.value);
        unit.push(r.unit.symbol().to_owned());
        quality.push(r.quality.status().to_owned());
        clock.push(
            serde_json::to_value(r.clock)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .ok_or_else(|| encode("clock"))?,
        );
        source.push(
            serde_json::to_value(r.provenance.source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .ok_or_else(|| encode("source"))?,
        );
        source_id.push(r.provenance.source_id.clone());
        gateway.push(r.provenance.gateway.as_str().to_owned());
        frame_hash.push(r.provenance.frame_hash.clone());
        received_at.push(r.provenance.received_at);
    }
    let result = sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, tariff, subunit, storage, value, unit,
             quality, clock, source, source_id, gateway_id, frame_hash, received_at)
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::int2[], $5::int2[],
             $6::int4[], $7::numeric[], $8::text[], $9::text[], $10::text[], $11::text[],
             $12::text[], $13::text[], $14::text[], $15::timestamptz[])
         ON CONFLICT DO NOTHING",
    )
    .bind(meter)
    .bind(ts)
    .bind(quantity)
    .bind(tariff)
    .bind(subunit)
    .bind(storage)
    .bind(value)
    .bind(unit)
    .bind(quality)
    .bind(clock)
    .bind(source)
    .bind(source_id)
    .bind(gateway)
    .bind(frame_hash)
    .bind(received_at)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
