//! The registry CSV of a simulated fleet (`simulate registry-csv`), for `pipeline registry
//! import` (docs/registry.md): the same meters, in the same transport order as
//! `simulate demo` assigns them, with meter numbers, DMAs and their inlet meters and pressure
//! points, one book per DMA, customer accounts, and NB-IoT valve meters with a few policies.

use crate::engine::Population;
use crate::profile::Profile;
use crate::scenario::Scenario;

/// How `simulate demo` spreads the fleet over the gateway's sources (its `--…-meters`
/// options) and which gateway serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Gateway id (`gateway_id` of its TOML).
    pub gateway: String,
    /// CJ/T 188 meters over CoAP (source `nbiot`), first.
    pub coap_meters: u32,
    /// Then over HTTP push (source `platform`).
    pub http_meters: u32,
    /// Then through concentrators (source `concentrators`).
    pub concentrator_meters: u32,
    /// M-Bus-addressed meters over wireless M-Bus (source `wmbus`).
    pub wmbus_meters: u32,
    /// Every n-th valve meter may be closed automatically on a burst.
    pub auto_close_every: u32,
    /// Every n-th valve meter is a protected customer (never closed).
    pub protected_every: u32,
    /// Hydrant controllers (`simulate demo --hydrants`, source `hydrants`), role `hydrant`,
    /// spread over the DMAs.
    pub hydrants: u32,
    /// Each DMA's inlet meter is the wM-Bus bulk meter of `simulate demo --wmbus-dma-inlets`
    /// (its own clock) instead of the Modbus flow meter (stamped at the gateway's poll).
    pub wmbus_dma_inlets: bool,
}

/// The header of the CSV this module writes (a subset of the registry's columns).
pub const HEADER: &str = "meter_no,meter_id,protocol,status,role,dma,meter_book,customer_account,customer_class,has_valve,auto_close_on_burst,protected_customer,gateway_id,gateway_source,register_map,q3,installed_at,latitude,longitude";

/// Q3 (m³/h) of the commercial meters in the registry CSV (DN32).
pub const COMMERCIAL_Q3: &str = "10";

/// Centre of the demo's service area (Nan'an, Quanzhou, Fujian), micro-degrees.
const CENTRE_UDEG: (i64, i64) = (24_960_000, 118_390_000);

/// Returns a plausible position (latitude, longitude, 6 decimals) for device `index` of `dma`,
/// deterministic: each DMA is a district of about 1.5 km × 1.5 km on a ring of districts around
/// the centre, and its devices are spread over it by a fixed stride (no randomness, so a
/// re-import of the same fleet keeps every position).
pub fn position(dma: u32, index: u32) -> (String, String) {
    // Districts on a 4-wide grid, 0.02° apart (≈ 2 km), centred on the centre.
    let (row, col) = (i64::from(dma / 4), i64::from(dma % 4));
    let lat0 = CENTRE_UDEG.0 + (row - 1) * 20_000;
    let lon0 = CENTRE_UDEG.1 + (col - 2) * 20_000;
    // Within the district: a 0.015° square, filled by co-prime strides so neighbours spread.
    let i = i64::from(index);
    let lat = lat0 + (i * 7_919) % 15_000;
    let lon = lon0 + (i * 104_729) % 15_000;
    let fmt = |u: i64| format!("{}.{:06}", u / 1_000_000, u % 1_000_000);
    (fmt(lat), fmt(lon))
}

/// The book of DMA `d`.
pub fn book_of(dma: u32) -> String {
    format!("BOOK-{dma}")
}

/// Writes the registry CSV of `scenario` as `simulate demo` runs it with `layout`.
pub fn registry_csv(scenario: &Scenario, layout: &Layout) -> String {
    let pop = Population::new(scenario);
    let installed = scenario
        .start
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut out = String::from(HEADER);
    out.push('\n');
    let mut cjt_seen = 0u32;
    let mut mbus_seen = 0u32;
    let mut valves = 0u32;
    for (i, m) in pop.meters.iter().enumerate() {
        let (protocol, source) = match m.address {
            model::MeterAddress::Cjt188 { .. } => {
                cjt_seen += 1;
                let k = cjt_seen;
                let source = if k <= layout.coap_meters {
                    Some("nbiot")
                } else if k <= layout.coap_meters + layout.http_meters {
                    Some("platform")
                } else if k <= layout.coap_meters + layout.http_meters + layout.concentrator_meters
                {
                    Some("concentrators")
                } else {
                    None
                };
                ("cjt188", source)
            }
            model::MeterAddress::Mbus { .. } => {
                mbus_seen += 1;
                (
                    "wmbus",
                    (mbus_seen <= layout.wmbus_meters).then_some("wmbus"),
                )
            }
            _ => ("named", None),
        };
        // NB-IoT meters over CoAP carry a valve (the simulator answers valve commands).
        let valve = source == Some("nbiot");
        let (auto_close, protected) = if valve {
            valves += 1;
            let protected =
                layout.protected_every > 0 && valves.is_multiple_of(layout.protected_every);
            let auto = !protected
                && layout.auto_close_every > 0
                && valves.is_multiple_of(layout.auto_close_every);
            (auto, protected)
        } else {
            (false, false)
        };
        // Shops draw up to 12 m³ a day: on the registry's default DN15 meter (Q3 2.5 m³/h) their
        // busy hours look like bursts (0.4 × Q3), so they are registered as DN32 (Q3 10 m³/h).
        let (class, q3) = match m.profile {
            Profile::Household => ("residential", ""),
            Profile::Commercial => ("non_residential", COMMERCIAL_Q3),
        };
        let (lat, lon) = position(m.dma, i as u32);
        out.push_str(&format!(
            "WM{i:07},{},{protocol},active,customer,DMA-{dma},{book},C{i:07},{class},{valve},{auto_close},{protected},{gw},{src},,{q3},{installed},{lat},{lon}\n",
            m.id,
            dma = m.dma,
            book = book_of(m.dma),
            gw = source.map_or("", |_| layout.gateway.as_str()),
            src = source.unwrap_or(""),
        ));
    }
    // The hydrant controllers, named as the gateway's hydrant bridge names them.
    for h in 0..layout.hydrants {
        let hydrant = crate::mqtt::Hydrant::new(h);
        let dma = h % pop.dmas.max(1);
        // Offset from the meters' indices so a hydrant does not sit on a customer's meter.
        let (lat, lon) = position(dma, 1_000_003 + h);
        out.push_str(&format!(
            "HYD{h:04},hydrant:{id},hydrant,active,hydrant,DMA-{dma},,,,false,false,false,{gw},hydrants,,,{installed},{lat},{lon}\n",
            id = hydrant.id,
            gw = layout.gateway,
        ));
    }
    // Each DMA's inlet flow meter and pressure point (the demo's Modbus instruments).
    for d in 0..pop.dmas {
        // Both at the district's inlet chamber (its corner).
        let (lat, lon) = position(d, 0);
        if layout.wmbus_dma_inlets {
            out.push_str(&format!(
                "DMA{d}-inlet,{id},wmbus,active,inlet,DMA-{d},,,,false,false,false,{gw},wmbus,,63,{installed},{lat},{lon}\n",
                id = crate::engine::dma_inlet_meter(d).id,
                gw = layout.gateway,
            ));
        }
        for (kind, role, map, q3) in [
            ("inlet", "inlet", "generic-emf", "63"),
            ("pressure", "pressure", "pressure-transmitter", ""),
        ] {
            if kind == "inlet" && layout.wmbus_dma_inlets {
                continue;
            }
            out.push_str(&format!(
                "DMA{d}-{kind},modbus:dma-{d}-{kind},modbus,active,{role},DMA-{d},,,,false,false,false,{gw},dma,{map},{q3},{installed},{lat},{lon}\n",
                gw = layout.gateway,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shops_are_registered_with_a_larger_q3() {
        // 10 meters: 9 households, then 1 shop.
        let s = Scenario::plain(10, 1, 1, time::macros::datetime!(2026-11-01 0:00 UTC));
        let csv = registry_csv(
            &s,
            &Layout {
                gateway: "gw-demo".into(),
                coap_meters: 2,
                http_meters: 0,
                concentrator_meters: 0,
                wmbus_meters: 0,
                auto_close_every: 0,
                protected_every: 0,
                hydrants: 0,
                wmbus_dma_inlets: false,
            },
        );
        let q3: Vec<String> = csv
            .lines()
            .skip(1)
            .take(10)
            .map(|l| l.split(',').nth(15).unwrap_or("?").to_owned())
            .collect();
        let mut expected = vec![String::new(); 9];
        expected.push(COMMERCIAL_Q3.to_owned());
        assert_eq!(q3, expected);
    }

    #[test]
    fn routes_follow_the_demo_order() {
        let mut s = Scenario::plain(10, 0, 2, time::macros::datetime!(2026-11-01 0:00 UTC));
        s.fleet.mbus_meters = 2;
        s.fleet.dmas = 2;
        let csv = registry_csv(
            &s,
            &Layout {
                gateway: "gw-demo".into(),
                coap_meters: 3,
                http_meters: 2,
                concentrator_meters: 3,
                wmbus_meters: 1,
                auto_close_every: 2,
                protected_every: 3,
                hydrants: 2,
                wmbus_dma_inlets: false,
            },
        );
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 1 + 10 + 2 + 4, "{csv}");
        let source = |l: &str| l.split(',').nth(13).unwrap_or("").to_owned();
        let sources: Vec<String> = lines[1..11].iter().map(|l| source(l)).collect();
        assert_eq!(
            sources,
            [
                "nbiot",
                "nbiot",
                "nbiot",
                "platform",
                "platform",
                "concentrators",
                "concentrators",
                "concentrators",
                "wmbus",
                ""
            ]
        );
        // Valve policies: 2nd valve meter auto-closes, 3rd is protected.
        assert!(lines[2].contains(",true,true,false,"), "{}", lines[2]);
        assert!(lines[3].contains(",true,false,true,"), "{}", lines[3]);
        assert_eq!(
            lines[12],
            "HYD0001,hydrant:hyd-0001,hydrant,active,hydrant,DMA-1,,,,false,false,false,gw-demo,hydrants,,,2026-11-01T00:00:00Z,24.946676,118.373916"
        );
        assert!(lines[13].starts_with("DMA0-inlet,modbus:dma-0-inlet,modbus,active,inlet,DMA-0"));
    }

    #[test]
    fn every_device_has_a_position_near_nanan() {
        let mut s = Scenario::plain(40, 0, 3, time::macros::datetime!(2026-11-01 0:00 UTC));
        s.fleet.dmas = 6;
        let csv = registry_csv(
            &s,
            &Layout {
                gateway: "gw-demo".into(),
                coap_meters: 10,
                http_meters: 0,
                concentrator_meters: 0,
                wmbus_meters: 0,
                auto_close_every: 0,
                protected_every: 0,
                hydrants: 5,
                wmbus_dma_inlets: false,
            },
        );
        let header: Vec<&str> = csv.lines().next().unwrap_or("").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (lat_at, lon_at) = (col("latitude").unwrap(), col("longitude").unwrap());
        let mut seen = std::collections::HashSet::new();
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(rows.len(), 40 + 5 + 12);
        for row in &rows {
            let f: Vec<&str> = row.split(',').collect();
            let lat: f64 = f[lat_at].parse().unwrap_or(f64::NAN);
            let lon: f64 = f[lon_at].parse().unwrap_or(f64::NAN);
            // Within about 5 km of Nan'an's centre (24.96 N, 118.39 E).
            assert!((24.91..=25.01).contains(&lat), "{row}");
            assert!((118.34..=118.44).contains(&lon), "{row}");
            if !row.starts_with("DMA") {
                seen.insert((f[lat_at].to_owned(), f[lon_at].to_owned()));
            }
        }
        // Meters and hydrants each have a place of their own.
        assert_eq!(seen.len(), 40 + 5);
        // Deterministic from the DMA and the index alone.
        assert_eq!(
            position(0, 0),
            ("24.940000".to_owned(), "118.350000".to_owned())
        );
    }

    #[test]
    fn wmbus_inlets_replace_the_modbus_flow_meters() {
        let mut s = Scenario::plain(4, 0, 1, time::macros::datetime!(2026-11-01 0:00 UTC));
        s.fleet.dmas = 2;
        let csv = registry_csv(
            &s,
            &Layout {
                gateway: "gw-demo".into(),
                coap_meters: 0,
                http_meters: 0,
                concentrator_meters: 0,
                wmbus_meters: 0,
                auto_close_every: 0,
                protected_every: 0,
                hydrants: 0,
                wmbus_dma_inlets: true,
            },
        );
        let dma_rows: Vec<&str> = csv.lines().filter(|l| l.starts_with("DMA")).collect();
        assert_eq!(
            dma_rows,
            [
                "DMA0-inlet,mbus:SIM99000000,wmbus,active,inlet,DMA-0,,,,false,false,false,gw-demo,wmbus,,63,2026-11-01T00:00:00Z,24.940000,118.350000",
                "DMA0-pressure,modbus:dma-0-pressure,modbus,active,pressure,DMA-0,,,,false,false,false,gw-demo,dma,pressure-transmitter,,2026-11-01T00:00:00Z,24.940000,118.350000",
                "DMA1-inlet,mbus:SIM99000001,wmbus,active,inlet,DMA-1,,,,false,false,false,gw-demo,wmbus,,63,2026-11-01T00:00:00Z,24.940000,118.370000",
                "DMA1-pressure,modbus:dma-1-pressure,modbus,active,pressure,DMA-1,,,,false,false,false,gw-demo,dma,pressure-transmitter,,2026-11-01T00:00:00Z,24.940000,118.370000",
            ]
        );
    }
}
