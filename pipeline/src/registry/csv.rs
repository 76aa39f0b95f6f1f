//! Registry import and export as CSV (RFC 4180: comma-separated, `"` quoting, first line the
//! header). Import is all-or-nothing: every row is checked first and every problem reported
//! with its line number; nothing is written unless all rows are valid (and nothing at all with
//! `dry_run`). Columns: [`COLUMNS`] (docs/registry.md); only `meter_no` and `meter_id` are
//! required, unknown columns are refused.

use std::collections::{HashMap, HashSet};

use rust_decimal::Decimal;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{MeterInput, RegistryError, Role, Status, db};

/// The columns of the registry CSV, in export order.
pub const COLUMNS: [&str; 29] = [
    "meter_no",
    "meter_id",
    "protocol",
    "model_code",
    "caliber_dn",
    "q3",
    "meter_class",
    "register_capacity",
    "status",
    "org",
    "area",
    "latitude",
    "longitude",
    "address",
    "role",
    "dma",
    "meter_book",
    "customer_account",
    "customer_class",
    "persons",
    "has_valve",
    "auto_close_on_burst",
    "protected_customer",
    "gateway_id",
    "gateway_source",
    "gateway_address",
    "key_ref",
    "register_map",
    "installed_at",
];

/// One problem in an import file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line in the file (the header is line 1).
    pub line: usize,
    /// Column concerned (empty for the whole line).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            write!(f, "line {}: {}: {}", self.line, self.field, self.message)
        }
    }
}

/// Why an import applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file has invalid rows; nothing was applied.
    #[error("{} invalid row(s), nothing applied:\n{}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Rows(Vec<LineError>),
    /// The database failed; nothing was applied.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What an import did (or would do, with `dry_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportReport {
    /// Rows read.
    pub rows: usize,
    /// Meters created.
    pub created: usize,
    /// Meters whose registry entry changed.
    pub updated: usize,
    /// Rows identical to the registry.
    pub unchanged: usize,
    /// True when nothing was written (dry run).
    pub dry_run: bool,
}

/// Splits CSV text into records of fields, each with the line it starts on. Quoted fields may
/// hold commas, doubled quotes and line breaks.
///
/// # Errors
/// A [`LineError`] for an unterminated quote or text after a closing quote.
pub fn parse_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, LineError> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut line = 1usize;
    let mut start = 1usize;
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut after_quote = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    after_quote = true;
                }
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            ',' => {
                fields.push(std::mem::take(&mut field));
                after_quote = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty()) {
                    records.push((start, std::mem::take(&mut fields)));
                }
                fields.clear();
                after_quote = false;
                line += 1;
                start = line;
            }
            '"' if field.is_empty() && !after_quote => quoted = true,
            _ if after_quote => {
                return Err(LineError {
                    line,
                    field: String::new(),
                    message: "text after a closing quote".into(),
                });
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(LineError {
            line: start,
            field: String::new(),
            message: "unterminated quoted field".into(),
        });
    }
    if !field.is_empty() || !fields.is_empty() || after_quote {
        fields.push(field);
        records.push((start, fields));
    }
    Ok(records)
}

/// Quotes a field when it needs it.
fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "" | "false" | "no" | "0" | "n" => Some(false),
        "true" | "yes" | "1" | "y" => Some(true),
        _ => None,
    }
}

/// Parses the rows of a registry CSV into meters, without the database. Every problem is
/// returned, each with its line.
///
/// # Errors
/// The list of problems when any row (or the header) is invalid.
pub fn parse(text: &str) -> Result<Vec<(usize, MeterInput)>, Vec<LineError>> {
    let records = parse_records(text).map_err(|e| vec![e])?;
    let mut it = records.into_iter();
    let Some((_, header)) = it.next() else {
        return Err(vec![LineError {
            line: 1,
            field: String::new(),
            message: "the file is empty (a header line is needed)".into(),
        }]);
    };
    let mut errors = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        let h = h.trim();
        match COLUMNS.iter().find(|c| **c == h) {
            Some(c) => {
                if index.insert(c, i).is_some() {
                    errors.push(LineError {
                        line: 1,
                        field: h.to_owned(),
                        message: "column given twice".into(),
                    });
                }
            }
            None => errors.push(LineError {
                line: 1,
                field: h.to_owned(),
                message: format!("unknown column (known: {})", COLUMNS.join(", ")),
            }),
        }
    }
    for required in ["meter_no", "meter_id"] {
        if !index.contains_key(required) {
            errors.push(LineError {
                line: 1,
                field: required.into(),
                message: "required column missing".into(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut out = Vec::new();
    let mut seen_no: HashMap<String, usize> = HashMap::new();
    let mut seen_id: HashMap<String, usize> = HashMap::new();
    for (line, fields) in it {
        if fields.len() != header.len() {
            errors.push(LineError {
                line,
                field: String::new(),
                message: format!("{} fields, the header has {}", fields.len(), header.len()),
            });
            continue;
        }
        let get = |c: &str| -> &str { index.get(c).map_or("", |&i| fields[i].trim()) };
        let opt = |c: &str| -> Option<String> {
            let v = get(c);
            (!v.is_empty()).then(|| v.to_owned())
        };
        let mut err = |field: &str, message: String| {
            errors.push(LineError {
                line,
                field: field.to_owned(),
                message,
            });
        };
        let mut dec = |c: &str| -> Option<Decimal> {
            let v = get(c);
            if v.is_empty() {
                return None;
            }
            v.parse::<Decimal>()
                .map_err(|_| err(c, format!("{v:?} is not a decimal number")))
                .ok()
        };
        let q3 = dec("q3");
        let register_capacity = dec("register_capacity");
        let latitude = dec("latitude");
        let longitude = dec("longitude");
        let mut m = MeterInput {
            meter_no: get("meter_no").to_owned(),
            meter_id: get("meter_id").to_owned(),
            q3,
            register_capacity,
            latitude,
            longitude,
            model_code: opt("model_code"),
            meter_class: opt("meter_class"),
            org: opt("org"),
            area: opt("area"),
            address: opt("address"),
            dma: opt("dma"),
            meter_book: opt("meter_book"),
            customer_account: opt("customer_account"),
            customer_class: opt("customer_class"),
            gateway_id: opt("gateway_id"),
            gateway_source: opt("gateway_source"),
            gateway_address: opt("gateway_address"),
            key_ref: opt("key_ref"),
            register_map: opt("register_map"),
            ..MeterInput::default()
        };
        m.protocol = opt("protocol").unwrap_or_else(|| super::protocol_of(&m.meter_id).to_owned());
        let mut err = |field: &str, message: String| {
            errors.push(LineError {
                line,
                field: field.to_owned(),
                message,
            });
        };
        if let Some(v) = opt("caliber_dn") {
            match v.parse::<i16>() {
                Ok(d) => m.caliber_dn = Some(d),
                Err(_) => err("caliber_dn", format!("{v:?} is not a whole number")),
            }
        }
        if let Some(v) = opt("persons") {
            match v.parse::<i32>() {
                Ok(d) => m.persons = Some(d),
                Err(_) => err("persons", format!("{v:?} is not a whole number")),
            }
        }
        if let Some(v) = opt("status") {
            match Status::parse(&v) {
                Some(s) => m.status = Some(s),
                None => err(
                    "status",
                    format!(
                        "{v:?} is not one of {}",
                        Status::ALL.map(Status::as_str).join(", ")
                    ),
                ),
            }
        }
        if let Some(v) = opt("role") {
            match Role::parse(&v) {
                Some(r) => m.role = r,
                None => err(
                    "role",
                    format!(
                        "{v:?} is not one of {}",
                        Role::ALL.map(Role::as_str).join(", ")
                    ),
                ),
            }
        }
        for (c, slot) in [
            ("has_valve", &mut m.has_valve),
            ("auto_close_on_burst", &mut m.auto_close_on_burst),
            ("protected_customer", &mut m.protected_customer),
        ] {
            match parse_bool(get(c)) {
                Some(b) => *slot = b,
                None => err(c, format!("{:?} is not true or false", get(c))),
            }
        }
        if let Some(v) = opt("installed_at") {
            match OffsetDateTime::parse(&v, &Rfc3339) {
                Ok(t) => m.installed_at = Some(t),
                Err(_) => err(
                    "installed_at",
                    format!("{v:?} is not an RFC 3339 time (2025-01-31T08:00:00+08:00)"),
                ),
            }
        }
        for (field, message) in m.check() {
            err(field, message);
        }
        if let Some(first) = seen_no.insert(m.meter_no.clone(), line) {
            err("meter_no", format!("{:?} also on line {first}", m.meter_no));
        }
        if let Some(first) = seen_id.insert(m.meter_id.clone(), line) {
            err("meter_id", format!("{:?} also on line {first}", m.meter_id));
        }
        out.push((line, m));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

/// Imports a registry CSV (creating meters, updating existing ones by meter number, binding
/// customer accounts) in one transaction, audited per meter as `registry.import`.
///
/// A new meter takes the row's status (default `in_stock`): a ledger import brings meters that
/// are already in service. An existing meter keeps its status: a different status in the file
/// is an error (status changes go through the lifecycle operations).
///
/// # Errors
/// [`ImportError::Rows`] with every invalid row (nothing applied), [`ImportError::Registry`]
/// when the database fails (nothing applied).
pub async fn import(
    pool: &PgPool,
    text: &str,
    actor: &str,
    dry_run: bool,
) -> Result<ImportReport, ImportError> {
    super::check_actor(actor)?;
    let rows = parse(text).map_err(ImportError::Rows)?;
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    // Everything the checks need, in four queries rather than four per row.
    let books: HashSet<String> = sqlx::query_scalar("SELECT book_code FROM meter_books")
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the books"))?
        .into_iter()
        .collect();
    let models: HashSet<String> = sqlx::query_scalar("SELECT model_code FROM meter_models")
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the models"))?
        .into_iter()
        .collect();
    let ids: Vec<&str> = rows.iter().map(|(_, m)| m.meter_id.as_str()).collect();
    let nos: Vec<&str> = rows.iter().map(|(_, m)| m.meter_no.as_str()).collect();
    let existing = sqlx::query(&format!(
        "SELECT meter_id, meter_no, status, {} AS row FROM meters m
         WHERE meter_id = ANY($1) OR meter_no = ANY($2) FOR UPDATE",
        super::ROW_JSON
    ))
    .bind(&ids)
    .bind(&nos)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading the existing meters"))?;
    let mut by_id: HashMap<String, (Option<String>, String, serde_json::Value)> = HashMap::new();
    let mut by_no: HashMap<String, String> = HashMap::new();
    for r in existing {
        let id: String = r.try_get(0).map_err(db("reading a meter"))?;
        let no: Option<String> = r.try_get(1).map_err(db("reading a meter"))?;
        let status: String = r.try_get(2).map_err(db("reading a meter"))?;
        let row: serde_json::Value = r.try_get(3).map_err(db("reading a meter"))?;
        if let Some(no) = &no {
            by_no.insert(no.clone(), id.clone());
        }
        by_id.insert(id, (no, status, row));
    }
    let mut errors = Vec::new();
    for (line, m) in &rows {
        let mut err = |field: &str, message: String| {
            errors.push(LineError {
                line: *line,
                field: field.to_owned(),
                message,
            });
        };
        if let Some(b) = &m.meter_book
            && !books.contains(b)
        {
            err(
                "meter_book",
                format!("unknown meter book {b:?} (create it first: `pipeline registry book`)"),
            );
        }
        if let Some(c) = &m.model_code
            && !models.contains(c)
        {
            err(
                "model_code",
                format!("unknown model {c:?} (create it first: `pipeline registry model`)"),
            );
        }
        if let Some(other) = by_no.get(&m.meter_no)
            && other != &m.meter_id
        {
            err(
                "meter_no",
                format!("{:?} is registered to meter id {other:?}", m.meter_no),
            );
        }
        if let Some((no, status, _)) = by_id.get(&m.meter_id) {
            if let Some(no) = no
                && no != &m.meter_no
            {
                err(
                    "meter_id",
                    format!("{:?} is registered as meter number {no:?}", m.meter_id),
                );
            }
            if let Some(s) = m.status
                && s.as_str() != status
            {
                err(
                    "status",
                    format!(
                        "the meter is {status}; status changes go through lifecycle operations"
                    ),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(ImportError::Rows(errors));
    }
    let mut report = ImportReport {
        rows: rows.len(),
        dry_run,
        ..ImportReport::default()
    };
    let now = OffsetDateTime::now_utc();
    for (_, m) in &rows {
        let prior = by_id.get(&m.meter_id);
        let status = match prior {
            Some((_, s, _)) => Status::parse(s).unwrap_or(Status::Active),
            None => m.status.unwrap_or(Status::InStock),
        };
        super::upsert_row(&mut tx, m, status).await?;
        let mut changed = prior.is_none();
        if let Some(account) = &m.customer_account {
            changed |= super::bind_in(
                &mut tx,
                &m.meter_id,
                account,
                m.installed_at.unwrap_or(now),
                actor,
            )
            .await?;
        }
        let after: serde_json::Value = sqlx::query_scalar(&format!(
            "SELECT {} FROM meters m WHERE meter_id = $1",
            super::ROW_JSON
        ))
        .bind(&m.meter_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading the imported meter"))?;
        let before = prior.map(|p| &p.2);
        changed |= before != Some(&after);
        match (prior, changed) {
            (None, _) => report.created += 1,
            (Some(_), true) => report.updated += 1,
            (Some(_), false) => report.unchanged += 1,
        }
        if changed {
            super::audit_meter(
                &mut tx,
                actor,
                "registry.import",
                &m.meter_id,
                before,
                serde_json::json!({}),
            )
            .await?;
        }
    }
    if dry_run {
        tx.rollback()
            .await
            .map_err(db("rolling back the dry run"))?;
    } else {
        tx.commit().await.map_err(db("committing the import"))?;
    }
    Ok(report)
}

/// Exports the registry as CSV ([`COLUMNS`]), ordered by meter number; the output imports
/// back unchanged.
///
/// # Errors
/// [`RegistryError::Db`] when the query fails.
pub async fn export(pool: &PgPool) -> Result<String, RegistryError> {
    let rows = sqlx::query(
        "SELECT coalesce(meter_no, meter_id), meter_id, protocol, model_code,
                caliber_dn::text, nominal_flow_q3::text, meter_class,
                register_capacity::text, status, org, area, latitude::text, longitude::text,
                address, role, dma, meter_book, customer_account, customer_class,
                persons::text, has_valve::text, auto_close_on_burst::text,
                protected_customer::text, gateway_id, gateway_source, gateway_address, key_ref,
                register_map, installed_at
         FROM meters ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(db("reading the registry"))?;
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        for (i, column) in COLUMNS.iter().enumerate().take(COLUMNS.len() - 1) {
            if i > 0 {
                out.push(',');
            }
            let v: Option<String> = r.try_get(i).map_err(db("reading the registry"))?;
            let v = v.unwrap_or_default();
            // Decimals come back with the column's scale (2.5000): trim for readability.
            let v = match *column {
                "q3" | "register_capacity" | "latitude" | "longitude" => v
                    .parse::<Decimal>()
                    .map(|d| d.normalize().to_string())
                    .unwrap_or(v),
                _ => v,
            };
            out.push_str(&quote(&v));
        }
        let at: Option<OffsetDateTime> = r
            .try_get(COLUMNS.len() - 1)
            .map_err(db("reading the registry"))?;
        out.push(',');
        out.push_str(&at.and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_quotes_commas_and_newlines() {
        let text = "a,b,c\n1,\"x, y\",\"say \"\"hi\"\"\"\r\n2,\"two\nlines\",3\n\n";
        let r = parse_records(text).expect("valid csv");
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[1],
            (2, vec!["1".into(), "x, y".into(), "say \"hi\"".into()])
        );
        assert_eq!(r[2], (3, vec!["2".into(), "two\nlines".into(), "3".into()]));
    }

    #[test]
    fn unterminated_quote_is_an_error_with_its_line() {
        let e = parse_records("a\n\"open\n").expect_err("unterminated");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let text = "meter_no,meter_id,q3,role,has_valve,auto_close_on_burst,key_ref\n\
                    M1,cjt188:00000000000001,2.5,customer,true,true,\n\
                    M2,not a meter id,abc,boss,maybe,false,\n\
                    M1,cjt188:00000000000003,,,,false,00112233445566778899aabbccddeeff\n";
        let errors = parse(text).expect_err("bad rows");
        let lines: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert!(lines.contains(&(3, "meter_id")), "{errors:?}");
        assert!(lines.contains(&(3, "q3")), "{errors:?}");
        assert!(lines.contains(&(3, "role")), "{errors:?}");
        assert!(lines.contains(&(3, "has_valve")), "{errors:?}");
        assert!(lines.contains(&(4, "meter_no")), "{errors:?}");
        assert!(lines.contains(&(4, "key_ref")), "{errors:?}");
        assert!(!lines.iter().any(|(l, _)| *l == 2), "{errors:?}");
    }

    #[test]
    fn unknown_and_missing_columns_are_refused() {
        let errors = parse("meter_no,colour\n").expect_err("bad header");
        assert!(errors.iter().any(|e| e.field == "colour"));
        assert!(errors.iter().any(|e| e.field == "meter_id"));
    }

    #[test]
    fn protocol_defaults_to_the_id_prefix() {
        let rows = parse("meter_no,meter_id\nA-1,mbus:KAM12345678\nA-2,modbus:dma-0-inlet\n")
            .expect("valid");
        assert_eq!(rows[0].1.protocol, "mbus");
        assert_eq!(rows[1].1.protocol, "modbus");
        assert_eq!(rows[0].1.status, None);
    }
}
