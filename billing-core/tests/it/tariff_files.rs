//! Tariff files: the DOMAIN.md form is accepted, the shipped files load, errors name file,
//! line and field, and newer files supersede older ones from their date.

use billing_core::{Component, Tariff, TariffBook, TariffError, TariffStatus, TierPeriod};
use rust_decimal_macros::dec;
use time::macros::date;

const DOMAIN_EXAMPLE: &str = r#"name = "Example residential tariff"
currency = "CNY"
effective_from = "2025-09-01"     # inclusive; a newer file for the same class supersedes
tier_period = "month"             # or "year": the span tier volumes apply to

[[classes]]
id = "residential"
base_persons = 4                  # household size the tier volumes are for
extra_volume_per_person = "5"     # m3 per tier period added to every tier boundary per extra person

  [[classes.tiers]]
  up_to = "20"                    # m3 per tier period, upper bound inclusive; omitted on the last tier
  prices = { water = "1.85", sewage = "0.95" }

  [[classes.tiers]]
  up_to = "35"
  prices = { water = "2.78", sewage = "0.95" }

  [[classes.tiers]]
  prices = { water = "5.55", sewage = "0.95" }

[[classes]]
id = "special"
  [[classes.tiers]]
  prices = { water = "3.00", sewage = "1.40" }
"#;

fn shipped(name: &str) -> Tariff {
    testkit::tariff::shipped(name)
}

#[test]
fn domain_md_example_is_accepted_as_written() {
    let t = Tariff::parse("example.toml", DOMAIN_EXAMPLE).unwrap();
    assert_eq!(t.effective_from, date!(2025 - 09 - 01));
    assert_eq!(t.tier_period, TierPeriod::Month);
    assert_eq!(t.status, TariffStatus::Unverified);
    assert!(t.version.starts_with("2025-09-01+"));
    assert_eq!(t.version.len(), "2025-09-01+".len() + 12);
    let r = t.class("residential").unwrap();
    assert_eq!(r.base_persons, Some(4));
    assert_eq!(r.extra_volume_per_person, dec!(5));
    assert_eq!(r.tiers.len(), 3);
    assert_eq!(r.tiers[1].up_to, Some(dec!(35)));
    assert_eq!(r.tiers[2].up_to, None);
    assert_eq!(r.tiers[2].prices[&Component::Water], dec!(5.55));
    // Six persons: every bound grows by 2 × 5 m3.
    assert_eq!(
        r.bounds(6, dec!(1)),
        vec![Some(dec!(30)), Some(dec!(45)), None]
    );
    assert_eq!(
        r.bounds(2, dec!(1)),
        vec![Some(dec!(20)), Some(dec!(35)), None]
    );
    assert_eq!(
        t.class("special").unwrap().tiers[0].prices[&Component::Sewage],
        dec!(1.40)
    );
}

#[test]
fn shipped_files_load_with_their_status() {
    let nanan = shipped("nanan-2025.toml");
    assert_eq!(nanan.status, TariffStatus::Verified);
    assert_eq!(nanan.tier_period, TierPeriod::Month);
    let r = nanan.class("residential").unwrap();
    let sums: Vec<_> = r
        .tiers
        .iter()
        .map(|t| t.prices.values().copied().sum::<rust_decimal::Decimal>())
        .collect();
    assert_eq!(sums, vec![dec!(2.80), dec!(3.73), dec!(6.50)]);
    let other = nanan.class("non_residential").unwrap();
    assert_eq!(
        other.tiers[0]
            .prices
            .values()
            .copied()
            .sum::<rust_decimal::Decimal>(),
        dec!(3.60)
    );
    let fz = shipped("fuzhou-example.toml");
    assert_eq!(fz.status, TariffStatus::Example);
    assert!(fz.name.contains("EXAMPLE"));
    let r = fz.class("residential").unwrap();
    assert_eq!(r.township[&Component::Sewage], dec!(0.50));
    assert_eq!(r.price(0, Component::Sewage, true), Some(dec!(0.50)));
    assert_eq!(r.price(0, Component::Sewage, false), Some(dec!(0.85)));
    assert_eq!(r.fixed_charges[0].amount, dec!(1.00));
}

fn invalid(text: &str) -> (usize, String, String) {
    match Tariff::parse("bad.toml", text).unwrap_err() {
        TariffError::Invalid {
            file,
            line,
            field,
            message,
        } => {
            assert_eq!(file, "bad.toml");
            (line, field, message)
        }
        TariffError::Syntax {
            file,
            line,
            message,
        } => {
            assert_eq!(file, "bad.toml");
            (line, String::from("<syntax>"), message)
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn errors_name_file_line_and_field() {
    // Tier bound not increasing (line 16).
    let text = DOMAIN_EXAMPLE.replace("up_to = \"35\"", "up_to = \"15\"");
    let (line, field, message) = invalid(&text);
    assert_eq!((line, field.as_str()), (16, "classes[0].tiers[1].up_to"));
    assert!(message.contains("previous bound 20"), "{message}");

    // A float price is inexact (line 13).
    let text = DOMAIN_EXAMPLE.replacen("water = \"1.85\"", "water = 1.85", 1);
    let (line, field, message) = invalid(&text);
    assert_eq!(
        (line, field.as_str()),
        (13, "classes[0].tiers[0].prices.water")
    );
    assert!(message.contains("decimal strings"), "{message}");

    // Unknown component.
    let text = DOMAIN_EXAMPLE.replacen("sewage = \"0.95\"", "sewer = \"0.95\"", 1);
    let (line, field, _) = invalid(&text);
    assert_eq!(
        (line, field.as_str()),
        (13, "classes[0].tiers[0].prices.sewer")
    );

    // The last tier must be open.
    let text = DOMAIN_EXAMPLE.replace(
        "  [[classes.tiers]]\n  prices = { water = \"5.55\"",
        "  [[classes.tiers]]\n  up_to = \"50\"\n  prices = { water = \"5.55\"",
    );
    let (line, field, _) = invalid(&text);
    assert_eq!((line, field.as_str()), (20, "classes[0].tiers[2].up_to"));

    // Bad date and bad period, on lines 3 and 4.
    let (line, field, _) = invalid(&DOMAIN_EXAMPLE.replace("2025-09-01", "2025-13-01"));
    assert_eq!((line, field.as_str()), (3, "effective_from"));
    let (line, field, _) = invalid(&DOMAIN_EXAMPLE.replace("\"month\"", "\"week\""));
    assert_eq!((line, field.as_str()), (4, "tier_period"));

    // More than 4 decimals in a price; negative volume per person.
    let (_, field, _) = invalid(&DOMAIN_EXAMPLE.replace("\"2.78\"", "\"2.78001\""));
    assert_eq!(field, "classes[0].tiers[1].prices.water");
    let (line, field, _) = invalid(&DOMAIN_EXAMPLE.replace("\"5\" ", "\"-5\" "));
    assert_eq!(
        (line, field.as_str()),
        (9, "classes[0].extra_volume_per_person")
    );

    // Unknown key: a syntax error with the line.
    let (line, field, message) = invalid(&DOMAIN_EXAMPLE.replace(
        "currency = \"CNY\"",
        "currency = \"CNY\"\ncolour = \"blue\"",
    ));
    assert_eq!((line, field.as_str()), (3, "<syntax>"));
    assert!(message.contains("colour"), "{message}");

    // Display form: file:line: field: message.
    let err = Tariff::parse("t.toml", &DOMAIN_EXAMPLE.replace("\"CNY\"", "\"USD\"")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.toml:2: currency: \"USD\" is not supported (expected \"CNY\")"
    );
}

#[test]
fn verified_files_must_name_a_source() {
    let text = DOMAIN_EXAMPLE.replace(
        "tier_period = \"month\"",
        "tier_period = \"month\"\nstatus = \"verified\"",
    );
    let (_, field, _) = invalid(&text);
    assert_eq!(field, "source");
}

#[test]
fn newer_file_supersedes_from_its_date_per_class() {
    let newer = DOMAIN_EXAMPLE
        .replace("2025-09-01", "2026-01-01")
        .replace("\"1.85\"", "\"2.00\"")
        .replace("[[classes]]\nid = \"special\"\n  [[classes.tiers]]\n  prices = { water = \"3.00\", sewage = \"1.40\" }\n", "");
    let book =
        TariffBook::parse([("new.toml", newer.as_str()), ("old.toml", DOMAIN_EXAMPLE)]).unwrap();
    let (t, c) = book.lookup("residential", date!(2025 - 12 - 31)).unwrap();
    assert_eq!(t.file, "old.toml");
    assert_eq!(c.tiers[0].prices[&Component::Water], dec!(1.85));
    let (t, c) = book.lookup("residential", date!(2026 - 01 - 01)).unwrap();
    assert_eq!(t.file, "new.toml");
    assert_eq!(c.tiers[0].prices[&Component::Water], dec!(2.00));
    // The newer file does not define `special`: the older one still applies to it.
    let (t, _) = book.lookup("special", date!(2026 - 06 - 01)).unwrap();
    assert_eq!(t.file, "old.toml");
    assert!(matches!(
        book.lookup("residential", date!(2025 - 08 - 31)),
        Err(TariffError::NoTariff { .. })
    ));
    assert_eq!(
        book.changes_within("residential", date!(2025 - 12 - 15), date!(2026 - 01 - 15)),
        vec![date!(2026 - 01 - 01)]
    );
    assert!(
        book.changes_within("special", date!(2025 - 12 - 15), date!(2026 - 01 - 15))
            .is_empty()
    );
    // Same class from the same date in two files is refused.
    let err =
        TariffBook::parse([("a.toml", DOMAIN_EXAMPLE), ("b.toml", DOMAIN_EXAMPLE)]).unwrap_err();
    assert!(matches!(err, TariffError::Ambiguous { .. }), "{err}");
}
