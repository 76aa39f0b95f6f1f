//! Carrier IoT-platform push envelopes: the JSON an NB-IoT meter's uplink arrives in when a
//! carrier platform (China Telecom CTWing/AEP, China Mobile OneNET) forwards it to us, plus
//! our own generic form. [`decode_envelope`] detects the platform, checks the fields and
//! unwraps the device payload (hex or base64; a CJ/T 188 frame for our meters) together with
//! the device id, IMEI, platform timestamp and radio metadata (RSRP, SINR, ECL), which
//! [`Envelope::signal_records`] turns into readings. [`encode_envelope`] writes the same
//! formats for the simulators' pusher.
//!
//! Formats (field names as the platforms push them; see `docs/modbus-maps.md`, section
//! "Envelopes"):
//! - generic: `{"v":1,"device_id":"m1","imei":"8675...","ts":"2026-11-25T10:00:00Z",
//!   "payload":"68 10 ...hex","encoding":"hex","rsrp":-95,"sinr":12.5,"ecl":0}`
//!   (`encoding` `hex`|`base64`, default: hex if the text is hex, else base64; `ts` RFC 3339
//!   or unix milliseconds).
//! - CTWing (AEP subscription push, `messageType` `dataReport`): `deviceId`, `IMEI`,
//!   `timestamp` (ms), `payload.APPdata` (base64). Other message types (online/offline,
//!   command responses) are [`EnvelopeError::NotData`].
//! - OneNET (HTTP push): `{"msg":{"type":1,"dev_id":..,"imei":..,"at":ms,"ds_id":"3200_0_5750",
//!   "value":"68..hex"},"msg_signature":..,"nonce":..}`, `msg` possibly an array (batched
//!   push). Data points `4_0_2` (LwM2M Connectivity Monitoring, radio signal strength) and
//!   `rsrp`/`sinr`/`ecl` carry the radio metadata; type 2 (online/offline) and 7 (command
//!   result) are [`EnvelopeError::NotData`]. Encrypted pushes (`enc_msg`) are refused.
//!
//! ```
//! use decoders::envelope::{decode_envelope, Platform};
//! let body = br#"{"messageType":"dataReport","deviceId":"d1","IMEI":"868334033111111",
//!   "timestamp":1764064800000,"payload":{"APPdata":"aBAB"}}"#;
//! let env = decode_envelope(body).unwrap();
//! assert_eq!(env.platform, Platform::CtWing);
//! assert_eq!(env.payload, vec![0x68, 0x10, 0x01]);
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use model::{Decimal, Unit};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{DecodeError, DecodedFrame, Function, Record, RecordValue};

/// Largest envelope accepted, in bytes (a CJ/T 188 frame is well under 300 bytes; platforms
/// cap pushes far below this).
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// Which platform pushed the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Our own generic JSON form.
    #[default]
    Generic,
    /// China Telecom CTWing (AEP) subscription push.
    CtWing,
    /// China Mobile OneNET HTTP push.
    OneNet,
}

impl Platform {
    /// Returns the name used in logs and metrics (`generic`, `ctwing`, `onenet`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::CtWing => "ctwing",
            Self::OneNet => "onenet",
        }
    }
}

/// NB-IoT radio metadata reported with an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signal {
    /// Reference signal received power, dBm.
    pub rsrp: Option<Decimal>,
    /// Signal to interference plus noise ratio, dB.
    pub sinr: Option<Decimal>,
    /// Coverage enhancement level (0, 1, 2).
    pub ecl: Option<u8>,
}

/// One unwrapped uplink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Platform that pushed it.
    pub platform: Platform,
    /// The platform's device id (CTWing `deviceId`, OneNET `dev_id`, generic `device_id`).
    pub device_id: String,
    /// Module IMEI, when the platform sends it.
    pub imei: Option<String>,
    /// When the platform received the uplink, when it says.
    pub received_at: Option<OffsetDateTime>,
    /// The device payload: for our meters one CJ/T 188 frame.
    pub payload: Vec<u8>,
    /// Radio metadata, when reported.
    pub signal: Signal,
}

impl Envelope {
    /// Returns an envelope with no IMEI, timestamp or signal.
    pub fn new(platform: Platform, device_id: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            platform,
            device_id: device_id.into(),
            payload,
            ..Self::default()
        }
    }

    /// Decodes the inner CJ/T 188 frame and appends the radio metadata records
    /// ([`Envelope::signal_records`]) to its records.
    ///
    /// # Errors
    /// [`DecodeError::Cjt188`] when the payload is not a valid CJ/T 188 frame.
    pub fn decode_frame(&self) -> Result<DecodedFrame, DecodeError> {
        let mut frame = crate::cjt188::decode(&self.payload)?;
        frame.records.extend(self.signal_records());
        Ok(frame)
    }

    /// Returns the radio metadata as records (`signal_rsrp` dBm, `signal_sinr` dB,
    /// `signal_ecl`), for the dashboard's signal-quality view.
    pub fn signal_records(&self) -> Vec<Record> {
        let rec = |quantity: crate::frame::RecordQuantity, value: Decimal, unit: Unit| Record {
            quantity,
            value: RecordValue::Number(value),
            unit: Some(unit),
            storage: 0,
            tariff: 0,
            subunit: 0,
            function: Function::Instantaneous,
        };
        let mut out = Vec::new();
        if let Some(v) = self.signal.rsrp {
            out.push(rec(crate::frame::q!("signal_rsrp"), v, Unit::Dbm));
        }
        if let Some(v) = self.signal.sinr {
            out.push(rec(crate::frame::q!("signal_sinr"), v, Unit::Decibel));
        }
        if let Some(v) = self.signal.ecl {
            out.push(rec(
                crate::frame::q!("signal_ecl"),
                Decimal::from(v),
                Unit::Dimensionless,
            ));
        }
        out
    }
}

/// Why an envelope could not be unwrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Body length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The body is not JSON.
    #[error("bad json at line {line} column {column}: {message}")]
    Json {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Parser message.
        message: String,
    },
    /// The body is JSON but matches no known platform.
    #[error(
        "not a known envelope (expected a generic object with device_id and payload, a CTWing push with messageType, or a OneNET push with msg)"
    )]
    UnknownFormat,
    /// A required field is absent.
    #[error("{platform} envelope: missing field {field}")]
    MissingField {
        /// Platform name.
        platform: &'static str,
        /// JSON path of the field.
        field: String,
    },
    /// A field has the wrong JSON type or an impossible value.
    #[error("{platform} envelope: field {field}: expected {expected}")]
    BadField {
        /// Platform name.
        platform: &'static str,
        /// JSON path of the field.
        field: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The payload text is not hex.
    #[error("{platform} envelope: field {field}: not hex at character {position}")]
    BadHex {
        /// Platform name.
        platform: &'static str,
        /// JSON path of the field.
        field: String,
        /// 0-based character offset of the first bad character (or the length, if odd).
        position: usize,
    },
    /// The payload text is not base64.
    #[error("{platform} envelope: field {field}: not base64 ({message})")]
    BadBase64 {
        /// Platform name.
        platform: &'static str,
        /// JSON path of the field.
        field: String,
        /// Decoder message.
        message: String,
    },
    /// The payload decoded to zero bytes.
    #[error("{platform} envelope: field {field}: empty payload")]
    EmptyPayload {
        /// Platform name.
        platform: &'static str,
        /// JSON path of the field.
        field: String,
    },
    /// A valid push that carries no device data (online/offline, command result); the
    /// receiver should acknowledge it and move on.
    #[error("{platform} envelope: {kind} message carries no device data")]
    NotData {
        /// Platform name.
        platform: &'static str,
        /// Message type as the platform names it.
        kind: String,
    },
    /// OneNET pushed in encrypted mode (`enc_msg`), which we do not configure.
    #[error(
        "onenet envelope: encrypted push (enc_msg) is not supported; disable encryption on the push subscription"
    )]
    Encrypted,
    /// A batched push holds data for several uplinks; use [`decode_envelopes`].
    #[error("{platform} envelope holds {count} uplinks; decode it with decode_envelopes")]
    Batch {
        /// Platform name.
        platform: &'static str,
        /// Number of uplinks.
        count: usize,
    },
}

/// Unwraps one pushed uplink, detecting the platform.
///
/// # Errors
/// [`EnvelopeError`] saying which field is missing or malformed; [`EnvelopeError::NotData`]
/// for valid pushes without device data; [`EnvelopeError::Batch`] when a OneNET batch holds
/// several uplinks.
pub fn decode_envelope(body: &[u8]) -> Result<Envelope, EnvelopeError> {
    let mut all = decode_envelopes(body)?;
    if all.len() > 1 {
        return Err(EnvelopeError::Batch {
            platform: Platform::OneNet.as_str(),
            count: all.len(),
        });
    }
    all.pop().ok_or(EnvelopeError::UnknownFormat)
}

/// Unwraps every uplink of a push (OneNET may batch several in `msg`; the others hold one).
///
/// # Errors
/// As [`decode_envelope`], except that batches are returned whole.
pub fn decode_envelopes(body: &[u8]) -> Result<Vec<Envelope>, EnvelopeError> {
    if body.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            len: body.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError::Json {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(EnvelopeError::UnknownFormat);
    };
    if obj.contains_key("enc_msg") {
        return Err(EnvelopeError::Encrypted);
    }
    if obj.contains_key("msg") {
        return onenet(&obj);
    }
    if obj.contains_key("messageType") || obj.contains_key("deviceId") {
        return ctwing(&obj).map(|e| vec![e]);
    }
    if obj.contains_key("device_id") || obj.contains_key("payload") {
        return generic(&obj).map(|e| vec![e]);
    }
    Err(EnvelopeError::UnknownFormat)
}

/// Field access with the platform and path in every error.
struct Fields<'a> {
    platform: Platform,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn path(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn missing(&self, field: &str) -> EnvelopeError {
        EnvelopeError::MissingField {
            platform: self.platform.as_str(),
            field: self.path(field),
        }
    }

    fn bad(&self, field: &str, expected: &'static str) -> EnvelopeError {
        EnvelopeError::BadField {
            platform: self.platform.as_str(),
            field: self.path(field),
            expected,
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// A string or number field rendered as text (device ids are numbers on OneNET).
    fn id(&self, field: &str) -> Result<Option<String>, EnvelopeError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() || s == "undefined" => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(self.bad(field, "a string or number")),
        }
    }

    fn required_id(&self, field: &str) -> Result<String, EnvelopeError> {
        self.id(field)?.ok_or_else(|| self.missing(field))
    }

    fn text(&self, field: &str) -> Result<Option<&'a str>, EnvelopeError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.bad(field, "a string")),
        }
    }

    /// Unix milliseconds (number or digit string) or an RFC 3339 string.
    fn time(&self, field: &str) -> Result<Option<OffsetDateTime>, EnvelopeError> {
        let bad = || self.bad(field, "unix milliseconds or an RFC 3339 timestamp");
        let millis = match self.get(field) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_i64().ok_or_else(bad)?,
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(ms) => ms,
                Err(_) => {
                    return OffsetDateTime::parse(s, &Rfc3339)
                        .map(Some)
                        .map_err(|_| bad());
                }
            },
            Some(_) => return Err(bad()),
        };
        let nanos = i128::from(millis).checked_mul(1_000_000).ok_or_else(bad)?;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map(Some)
            .map_err(|_| bad())
    }

    fn decimal(&self, field: &str) -> Result<Option<Decimal>, EnvelopeError> {
        let bad = || self.bad(field, "a decimal number");
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .to_string()
                .parse::<Decimal>()
                .map(Some)
                .map_err(|_| bad()),
            Some(Value::String(s)) => s.trim().parse::<Decimal>().map(Some).map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    }

    fn ecl(&self, field: &str) -> Result<Option<u8>, EnvelopeError> {
        match self.decimal(field)? {
            None => Ok(None),
            Some(d) => u8::try_from(d)
                .ok()
                .filter(|e| *e <= 2)
                .map(Some)
                .ok_or_else(|| self.bad(field, "a coverage enhancement level 0, 1 or 2")),
        }
    }

    /// Reads the signal fields under any of their usual spellings.
    fn signal(&self) -> Result<Signal, EnvelopeError> {
        let pick = |names: &[&'static str]| names.iter().copied().find(|n| self.get(n).is_some());
        Ok(Signal {
            rsrp: match pick(&["rsrp", "RSRP"]) {
                Some(n) => self.decimal(n)?,
                None => None,
            },
            sinr: match pick(&["sinr", "SINR", "snr", "SNR"]) {
                Some(n) => self.decimal(n)?,
                None => None,
            },
            ecl: match pick(&["ecl", "ECL"]) {
                Some(n) => self.ecl(n)?,
                None => None,
            },
        })
    }

    fn payload(&self, field: &str, encoding: Encoding) -> Result<Vec<u8>, EnvelopeError> {
        let text = self.text(field)?.ok_or_else(|| self.missing(field))?;
        decode_payload(self.platform, &self.path(field), text, encoding)
    }
}

/// How a payload string is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Hex,
    Base64,
    /// Hex if every character is a hex digit (spaces allowed) and the count is even, else
    /// base64. A CJ/T 188 frame in hex starts with `68` (or `FE`), in base64 with `a`/`/`.
    Auto,
}

fn decode_payload(
    platform: Platform,
    field: &str,
    text: &str,
    encoding: Encoding,
) -> Result<Vec<u8>, EnvelopeError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let encoding = match encoding {
        Encoding::Auto
            if compact.len().is_multiple_of(2)
                && compact.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            Encoding::Hex
        }
        Encoding::Auto => Encoding::Base64,
        other => other,
    };
    let bytes = match encoding {
        Encoding::Hex => {
            if let Some(position) = compact.chars().position(|c| !c.is_ascii_hexdigit()) {
                return Err(EnvelopeError::BadHex {
                    platform: platform.as_str(),
                    field: field.to_owned(),
                    position,
                });
            }
            hex::decode(&compact).map_err(|_| EnvelopeError::BadHex {
                platform: platform.as_str(),
                field: field.to_owned(),
                position: compact.len(),
            })?
        }
        _ => BASE64
            .decode(compact.as_bytes())
            .map_err(|e| EnvelopeError::BadBase64 {
                platform: platform.as_str(),
                field: field.to_owned(),
                message: e.to_string(),
            })?,
    };
    if bytes.is_empty() {
        return Err(EnvelopeError::EmptyPayload {
            platform: platform.as_str(),
            field: field.to_owned(),
        });
    }
    Ok(bytes)
}

fn generic(obj: &Map<String, Value>) -> Result<Envelope, EnvelopeError> {
    let f = Fields {
        platform: Platform::Generic,
        obj,
        prefix: "",
    };
    if let Some(v) = f.get("v")
        && v.as_u64() != Some(1)
    {
        return Err(f.bad("v", "version 1"));
    }
    let encoding = match f.text("encoding")? {
        None => Encoding::Auto,
        Some("hex") => Encoding::Hex,
        Some("base64") => Encoding::Base64,
        Some(_) => return Err(f.bad("encoding", "hex or base64")),
    };
    Ok(Envelope {
        platform: Platform::Generic,
        device_id: f.required_id("device_id")?,
        imei: f.id("imei")?,
        received_at: f.time("ts")?,
        payload: f.payload("payload", encoding)?,
        signal: f.signal()?,
    })
}

fn ctwing(obj: &Map<String, Value>) -> Result<Envelope, EnvelopeError> {
    let f = Fields {
        platform: Platform::CtWing,
        obj,
        prefix: "",
    };
    match f.text("messageType")? {
        Some("dataReport") => {}
        Some(other) => {
            return Err(EnvelopeError::NotData {
                platform: Platform::CtWing.as_str(),
                kind: other.to_owned(),
            });
        }
        None => return Err(f.missing("messageType")),
    }
    let Some(payload) = f.get("payload") else {
        return Err(f.missing("payload"));
    };
    let Value::Object(inner) = payload else {
        return Err(f.bad("payload", "an object with APPdata"));
    };
    let p = Fields {
        platform: Platform::CtWing,
        obj: inner,
        prefix: "payload.",
    };
    // Radio metadata: in `payload.serviceData` for profile-decoded products (CTWing pushes
    // `{"serviceId":..,"serviceData":{"RSRP":..,"SNR":..}}` there), next to APPdata, or at
    // the top level; the innermost wins.
    let mut signal = f.signal()?;
    let mut layers = vec![p.signal()?];
    if let Some(Value::Object(data)) = p.get("serviceData") {
        let d = Fields {
            platform: Platform::CtWing,
            obj: data,
            prefix: "payload.serviceData.",
        };
        layers.push(d.signal()?);
    }
    for inner in layers {
        signal.rsrp = inner.rsrp.or(signal.rsrp);
        signal.sinr = inner.sinr.or(signal.sinr);
        signal.ecl = inner.ecl.or(signal.ecl);
    }
    Ok(Envelope {
        platform: Platform::CtWing,
        device_id: f.required_id("deviceId")?,
        imei: f.id("IMEI")?.or(f.id("imei")?),
        received_at: f.time("timestamp")?,
        payload: p.payload("APPdata", Encoding::Base64)?,
        signal,
    })
}

/// OneNET data stream ids of the radio metadata.
const ONENET_RSRP_STREAMS: [&str; 2] = ["4_0_2", "rsrp"];

fn onenet(obj: &Map<String, Value>) -> Result<Vec<Envelope>, EnvelopeError> {
    let messages: Vec<(String, &Map<String, Value>)> = match obj.get("msg") {
        Some(Value::Object(m)) => vec![("msg.".to_owned(), m)],
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let Value::Object(m) = item else {
                    return Err(EnvelopeError::BadField {
                        platform: Platform::OneNet.as_str(),
                        field: format!("msg[{i}]"),
                        expected: "an object",
                    });
                };
                out.push((format!("msg[{i}]."), m));
            }
            out
        }
        // OneNET's URL verification sends msg as a plain string (GET); as a POST body it is
        // not an uplink.
        _ => {
            return Err(EnvelopeError::BadField {
                platform: Platform::OneNet.as_str(),
                field: "msg".into(),
                expected: "an object or an array of objects",
            });
        }
    };
    let mut envelopes: Vec<Envelope> = Vec::new();
    let mut signals: Vec<(String, Signal)> = Vec::new();
    let mut other_kind: Option<String> = None;
    for (prefix, m) in &messages {
        let f = Fields {
            platform: Platform::OneNet,
            obj: m,
            prefix,
        };
        let kind = match f.get("type") {
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| f.bad("type", "a message type"))?,
            Some(_) => return Err(f.bad("type", "a message type number")),
            None => return Err(f.missing("type")),
        };
        if kind != 1 {
            other_kind.get_or_insert_with(|| match kind {
                2 => "online/offline (type 2)".to_owned(),
                7 => "command result (type 7)".to_owned(),
                k => format!("type {k}"),
            });
            continue;
        }
        let device_id = f.required_id("dev_id")?;
        let ds_id = f.text("ds_id")?.ok_or_else(|| f.missing("ds_id"))?;
        let mut signal = Signal::default();
        let is_signal = if ONENET_RSRP_STREAMS.contains(&ds_id) {
            signal.rsrp = f.decimal("value")?;
            true
        } else if ds_id == "sinr" {
            signal.sinr = f.decimal("value")?;
            true
        } else if ds_id == "ecl" {
            signal.ecl = f.ecl("value")?;
            true
        } else {
            false
        };
        if is_signal {
            signals.push((device_id, signal));
            continue;
        }
        let inline = f.signal()?;
        envelopes.push(Envelope {
            platform: Platform::OneNet,
            device_id,
            imei: f.id("imei")?,
            received_at: f.time("at")?,
            payload: f.payload("value", Encoding::Auto)?,
            signal: inline,
        });
    }
    for (device, s) in signals {
        for env in envelopes.iter_mut().filter(|e| e.device_id == device) {
            env.signal.rsrp = env.signal.rsrp.or(s.rsrp);
            env.signal.sinr = env.signal.sinr.or(s.sinr);
            env.signal.ecl = env.signal.ecl.or(s.ecl);
        }
    }
    if envelopes.is_empty() {
        return Err(EnvelopeError::NotData {
            platform: Platform::OneNet.as_str(),
            kind: other_kind.unwrap_or_else(|| "signal-only".to_owned()),
        });
    }
    Ok(envelopes)
}

fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn number(d: Decimal) -> Value {
    // Keep the exact decimal text; serde_json numbers are f64 but these are small values.
    serde_json::from_str(&d.to_string()).unwrap_or(Value::Null)
}

/// Writes an envelope in a platform's push format (what the simulators' pusher POSTs).
/// The payload is base64 for CTWing, upper-case hex for OneNET and lower-case hex for generic.
pub fn encode_envelope(platform: Platform, envelope: &Envelope) -> Vec<u8> {
    let value = match platform {
        Platform::Generic => {
            let mut m = Map::new();
            m.insert("v".into(), json!(1));
            m.insert("device_id".into(), json!(envelope.device_id));
            if let Some(imei) = &envelope.imei {
                m.insert("imei".into(), json!(imei));
            }
            if let Some(t) = envelope.received_at.and_then(|t| t.format(&Rfc3339).ok()) {
                m.insert("ts".into(), json!(t));
            }
            m.insert("payload".into(), json!(hex::encode(&envelope.payload)));
            m.insert("encoding".into(), json!("hex"));
            insert_signal(&mut m, &envelope.signal, ["rsrp", "sinr", "ecl"]);
            Value::Object(m)
        }
        Platform::CtWing => {
            let mut payload = Map::new();
            payload.insert("APPdata".into(), json!(BASE64.encode(&envelope.payload)));
            let mut m = Map::new();
            m.insert("upPacketSN".into(), json!(-1));
            m.insert("upDataSN".into(), json!(-1));
            m.insert("topic".into(), json!("v1/up/ad"));
            if let Some(t) = envelope.received_at {
                m.insert("timestamp".into(), json!(millis(t)));
            }
            m.insert("tenantId".into(), json!(""));
            m.insert("serviceId".into(), json!(""));
            m.insert("protocol".into(), json!("lwm2m"));
            m.insert("productId".into(), json!(""));
            insert_signal(&mut payload, &envelope.signal, ["RSRP", "SINR", "ECL"]);
            m.insert("payload".into(), Value::Object(payload));
            m.insert("messageType".into(), json!("dataReport"));
            m.insert("deviceType".into(), json!(""));
            m.insert("deviceId".into(), json!(envelope.device_id));
            m.insert("assocAssetId".into(), json!(""));
            m.insert("IMSI".into(), json!("undefined"));
            m.insert(
                "IMEI".into(),
                json!(envelope.imei.clone().unwrap_or_default()),
            );
            Value::Object(m)
        }
        Platform::OneNet => {
            // A number only when it prints back the same (`+1`, `01` stay strings), so the id
            // survives the round trip.
            let dev_id = match envelope.device_id.parse::<u64>() {
                Ok(n) if n.to_string() == envelope.device_id => json!(n),
                _ => json!(envelope.device_id),
            };
            let point = |ds_id: &str, value: Value| {
                let mut m = Map::new();
                if let Some(t) = envelope.received_at {
                    m.insert("at".into(), json!(millis(t)));
                }
                if let Some(imei) = &envelope.imei {
                    m.insert("imei".into(), json!(imei));
                }
                m.insert("type".into(), json!(1));
                m.insert("ds_id".into(), json!(ds_id));
                m.insert("value".into(), value);
                m.insert("dev_id".into(), dev_id.clone());
                Value::Object(m)
            };
            let data = point("3200_0_5750", json!(hex::encode_upper(&envelope.payload)));
            let mut extra = Vec::new();
            if let Some(v) = envelope.signal.rsrp {
                extra.push(point("4_0_2", number(v)));
            }
            if let Some(v) = envelope.signal.sinr {
                extra.push(point("sinr", number(v)));
            }
            if let Some(v) = envelope.signal.ecl {
                extra.push(point("ecl", json!(v)));
            }
            let msg = if extra.is_empty() {
                data
            } else {
                let mut all = vec![data];
                all.extend(extra);
                Value::Array(all)
            };
            json!({ "msg": msg, "msg_signature": "", "nonce": "" })
        }
    };
    value.to_string().into_bytes()
}

fn insert_signal(m: &mut Map<String, Value>, s: &Signal, names: [&str; 3]) {
    let [rsrp, sinr, ecl] = names;
    if let Some(v) = s.rsrp {
        m.insert(rsrp.into(), number(v));
    }
    if let Some(v) = s.sinr {
        m.insert(sinr.into(), number(v));
    }
    if let Some(v) = s.ecl {
        m.insert(ecl.into(), json!(v));
    }
}
