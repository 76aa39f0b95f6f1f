//! Which transport each simulated meter's readings leave by.

use super::*;

/// How a meter's readings leave the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Not transmitted (simulated only).
    None,
    /// Through concentrator `n`.
    Concentrator(u32),
    /// CoAP uplink.
    Coap,
    /// IoT-platform HTTP push.
    Http,
    /// wM-Bus telegram over UDP.
    Wmbus,
    /// Polled on the M-Bus serial line.
    Mbus,
}

/// The route of every meter of the engine's population, by index.
///
/// # Errors
/// When the config asks for more meters of a kind than the scenario has.
pub(super) fn routes(config: &FleetConfig, engine: &Engine) -> anyhow::Result<Vec<Route>> {
    let addresses: Vec<&model::MeterAddress> = engine
        .population()
        .meters
        .iter()
        .map(|m| &m.address)
        .collect();
    plan(config, &addresses)
}

/// Assigns routes by address kind: CJ/T 188 meters go, in population order, to CoAP, then HTTP
/// push, then the concentrators (round-robin); M-Bus-addressed meters to wM-Bus, then to the
/// wired M-Bus. Meters left over are simulated only ([`Route::None`]).
///
/// # Errors
/// When the config asks for more meters of a kind than `addresses` has, for zero
/// concentrators, or for more than 250 wired M-Bus slaves.
pub(super) fn plan(
    config: &FleetConfig,
    addresses: &[&model::MeterAddress],
) -> anyhow::Result<Vec<Route>> {
    let mut routes = vec![Route::None; addresses.len()];
    let cjt: Vec<usize> = addresses
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, model::MeterAddress::Cjt188 { .. }))
        .map(|(i, _)| i)
        .collect();
    let mbus: Vec<usize> = addresses
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, model::MeterAddress::Mbus { .. }))
        .map(|(i, _)| i)
        .collect();
    let mut next = cjt.iter();
    let mut take = |n: u32, what: &str| -> anyhow::Result<Vec<usize>> {
        let picked: Vec<usize> = next.by_ref().take(n as usize).copied().collect();
        if picked.len() < n as usize {
            bail!(
                "{what}.meters: not enough CJ/T 188 meters in the scenario ({} in all)",
                cjt.len()
            );
        }
        Ok(picked)
    };
    let mut assign = |idx: usize, route: Route| {
        if let Some(r) = routes.get_mut(idx) {
            *r = route;
        }
    };
    if let Some(c) = &config.coap {
        for i in take(c.meters, "coap")? {
            assign(i, Route::Coap);
        }
    }
    if let Some(h) = &config.http_push {
        for i in take(h.meters, "http_push")? {
            assign(i, Route::Http);
        }
    }
    if let Some(c) = &config.concentrators {
        if c.count == 0 {
            bail!("concentrators.count is 0");
        }
        for (k, i) in take(c.meters, "concentrators")?.into_iter().enumerate() {
            assign(i, Route::Concentrator(k as u32 % c.count));
        }
    }
    if let Some(w) = &config.wmbus {
        if w.meters as usize > mbus.len() {
            bail!(
                "wmbus.meters = {} but the scenario has only {} M-Bus-addressed meters (fleet.mbus_meters)",
                w.meters,
                mbus.len()
            );
        }
        for &i in mbus.iter().take(w.meters as usize) {
            assign(i, Route::Wmbus);
        }
    }
    if let Some(m) = &config.mbus {
        let skip = config.wmbus.as_ref().map_or(0, |w| w.meters as usize);
        if m.meters > 250 || skip + m.meters as usize > mbus.len() {
            bail!(
                "mbus.meters = {} (at most 250) but only {} M-Bus-addressed meters are left after wM-Bus",
                m.meters,
                mbus.len().saturating_sub(skip)
            );
        }
        for &i in mbus.iter().skip(skip).take(m.meters as usize) {
            assign(i, Route::Mbus);
        }
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::MeterAddress;

    fn cjt(n: u8) -> MeterAddress {
        MeterAddress::Cjt188 {
            meter_type: 0x10,
            address: [n, 0, 0, 0, 0, 0, 0],
        }
    }

    fn mbus(id: u32) -> MeterAddress {
        MeterAddress::Mbus {
            id,
            manufacturer: "KAM".into(),
            version: 1,
            medium: 0x07,
        }
    }

    fn config() -> FleetConfig {
        FleetConfig::new(Scenario::plain(
            1,
            1,
            1,
            time::macros::datetime!(2026-11-01 0:00 UTC),
        ))
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5683))
    }

    #[test]
    fn nothing_enabled_routes_nothing() {
        let a = [cjt(1), mbus(2)];
        let refs: Vec<&MeterAddress> = a.iter().collect();
        assert_eq!(plan(&config(), &refs).unwrap(), vec![Route::None; 2]);
    }

    #[test]
    fn cjt188_meters_fill_coap_then_http_then_concentrators_round_robin() {
        let a = [
            cjt(1),
            mbus(1),
            cjt(2),
            cjt(3),
            cjt(4),
            cjt(5),
            cjt(6),
            mbus(2),
        ];
        let refs: Vec<&MeterAddress> = a.iter().collect();
        let mut c = config();
        c.coap = Some(CoapConfig {
            gateway: addr(),
            meters: 1,
        });
        c.http_push = Some(HttpPushConfig {
            gateway: addr(),
            path: "/v1/push".into(),
            secret: "s".into(),
            platform: Platform::OneNet,
            meters: 1,
        });
        c.concentrators = Some(ConcentratorConfig {
            format: ConcentratorFormat::Json,
            count: 2,
            meters: 3,
            upload: Upload::EveryStep,
        });
        c.wmbus = Some(WmbusConfig {
            gateway: addr(),
            meters: 1,
            encrypted: false,
        });
        c.mbus = Some(MbusConfig {
            meters: 1,
            dir: std::path::PathBuf::from("/tmp"),
        });
        assert_eq!(
            plan(&c, &refs).unwrap(),
            vec![
                Route::Coap,
                Route::Wmbus,
                Route::Http,
                Route::Concentrator(0),
                Route::Concentrator(1),
                Route::Concentrator(0),
                Route::None,
                Route::Mbus,
            ]
        );
    }

    #[test]
    fn asking_for_more_meters_than_exist_is_refused_with_the_field() {
        let a = [cjt(1), mbus(1)];
        let refs: Vec<&MeterAddress> = a.iter().collect();
        let mut c = config();
        c.coap = Some(CoapConfig {
            gateway: addr(),
            meters: 2,
        });
        let e = plan(&c, &refs).unwrap_err().to_string();
        assert!(e.starts_with("coap.meters"), "{e}");

        let mut c = config();
        c.wmbus = Some(WmbusConfig {
            gateway: addr(),
            meters: 1,
            encrypted: true,
        });
        c.mbus = Some(MbusConfig {
            meters: 1,
            dir: std::path::PathBuf::from("/tmp"),
        });
        let e = plan(&c, &refs).unwrap_err().to_string();
        assert!(e.starts_with("mbus.meters = 1"), "{e}");

        let mut c = config();
        c.concentrators = Some(ConcentratorConfig {
            format: ConcentratorFormat::Json,
            count: 0,
            meters: 1,
            upload: Upload::Midnight,
        });
        let e = plan(&c, &refs).unwrap_err().to_string();
        assert_eq!(e, "concentrators.count is 0");
    }
}
