//! `meter-decode`: decodes one meter frame pasted from a log and prints it as JSON.
//!
//! ```text
//! meter-decode --protocol <cjt188|mbus|wmbus|auto> [--key HEX] HEX...
//! ```
//! The hex may contain spaces (several arguments are joined). A frame that does not decode
//! exits with status 1 and prints the typed error, with its byte offset, on stderr.

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use decoders::Protocol;

/// Which decoder to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    /// CJ/T 188 frame (optional FE preamble).
    Cjt188,
    /// Wired M-Bus long frame (RSP_UD).
    Mbus,
    /// Wireless M-Bus telegram (L field first, no CRCs).
    Wmbus,
    /// Guess from the framing bytes (CJ/T 188 or wired M-Bus; otherwise wireless M-Bus).
    Auto,
}

/// Decodes one meter frame and prints it as JSON.
#[derive(Debug, Parser)]
#[command(name = "meter-decode", version, about)]
struct Args {
    /// Protocol of the frame.
    #[arg(long, value_enum, default_value = "auto")]
    protocol: ProtocolArg,
    /// AES-128 key (32 hex digits) for encrypted wM-Bus telegrams.
    #[arg(long)]
    key: Option<String>,
    /// The frame as hex; spaces, colons and a 0x prefix are ignored.
    #[arg(required = true, num_args = 1..)]
    hex: Vec<String>,
}

fn parse_hex(parts: &[String]) -> anyhow::Result<Vec<u8>> {
    let joined: String = parts
        .iter()
        .map(|p| p.trim_start_matches("0x").trim_start_matches("0X"))
        .collect::<Vec<_>>()
        .join("");
    let clean: String = joined
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    hex::decode(&clean).with_context(|| format!("frame is not valid hex: {clean:?}"))
}

fn run(args: Args) -> anyhow::Result<()> {
    let bytes = parse_hex(&args.hex)?;
    // The key is parsed into an array at once and never printed.
    let key: Option<[u8; 16]> = match &args.key {
        Some(key) => {
            let key = hex::decode(key).context("--key is not valid hex")?;
            let len = key.len();
            Some(<[u8; 16]>::try_from(key).map_err(|_| {
                anyhow::anyhow!("--key must be 16 bytes (32 hex digits), got {len}")
            })?)
        }
        None => None,
    };
    let protocol = match args.protocol {
        ProtocolArg::Cjt188 => Protocol::Cjt188,
        ProtocolArg::Mbus => Protocol::Mbus,
        ProtocolArg::Wmbus => Protocol::Wmbus,
        // Wireless telegrams start with their L field, which no wired framing byte claims.
        ProtocolArg::Auto => decoders::detect(&bytes).unwrap_or(Protocol::Wmbus),
    };
    let wmbus = |bytes: &[u8]| {
        let mut cache = decoders::wmbus::FormatCache::new();
        decoders::wmbus::decode(bytes, &key, &mut cache)
    };
    let frame = if protocol == Protocol::Wmbus {
        wmbus(&bytes).map_err(|e| anyhow::anyhow!("wmbus: {e}"))?
    } else {
        match decoders::decode(protocol, &bytes) {
            Some(Ok(frame)) => frame,
            // A wireless telegram whose L field is 0x68 looks like a wired frame: in auto mode
            // try it as wM-Bus before reporting the first error.
            Some(Err(e)) => match (args.protocol, wmbus(&bytes)) {
                (ProtocolArg::Auto, Ok(frame)) => frame,
                // The error's Display already includes its cause; keep the message single.
                _ => bail!("{e}"),
            },
            None => bail!("{protocol:?} frames cannot be decoded from bytes alone"),
        }
    };
    println!("{}", serde_json::to_string_pretty(&frame)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
