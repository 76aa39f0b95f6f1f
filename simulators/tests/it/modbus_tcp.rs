//! Modbus TCP instruments answer function 03/04 polls with registers that decode, through
//! the shipped register maps, to the DMA inflow the model produced.

use std::time::Duration;

use decoders::RecordValue;
use rust_decimal::Decimal;
use simulators::fleet::{Fleet, FleetConfig, ModbusConfig};
use simulators::scenario::Scenario;
use time::macros::datetime;
use tokio_modbus::client::{Reader, tcp};
use tokio_modbus::slave::{Slave, SlaveContext};

fn number(records: &[decoders::Record], quantity: &str) -> Decimal {
    records
        .iter()
        .find_map(|r| match (&r.value, r.quantity.as_ref()) {
            (RecordValue::Number(n), q) if q == quantity => Some(*n),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {quantity} in {records:?}"))
}

#[tokio::test]
async fn inlet_meters_report_the_dma_inflow_and_pressure() {
    let s = Scenario::plain(30, 1, 8, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(s);
    config.step_every = Duration::ZERO;
    config.max_steps = Some(6);
    config.modbus = Some(ModbusConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    fleet.wait_finished().await;
    let truth = fleet.ground_truth();
    let addr = fleet.modbus_addr().unwrap();
    let devices = fleet.modbus_devices().to_vec();
    assert_eq!(devices.len(), 2);

    let emf = edge_config::register_map::builtin("generic-emf").unwrap();
    let (start, count) = emf.register_span().unwrap();
    let mut ctx = tcp::connect(addr).await.unwrap();
    ctx.set_slave(Slave(devices[0].unit));
    let words = ctx
        .read_holding_registers(start, count)
        .await
        .unwrap()
        .unwrap();
    let records = decoders::modbus::decode(&emf, start, &words).unwrap();
    // Forward totaliser = system input volume of DMA 0 (litres, scale 0.001 m³).
    let inflow_l = truth.dmas[0].inflow_l;
    let total = number(&records, "volume");
    assert!(
        (total * Decimal::from(1000) - Decimal::from(inflow_l)).abs() <= Decimal::ONE,
        "{total} m3 vs {inflow_l} L"
    );
    assert!(number(&records, "volume_flow") > Decimal::ZERO);

    let pt = edge_config::register_map::builtin("pressure-transmitter").unwrap();
    ctx.set_slave(Slave(devices[1].unit));
    let words = ctx.read_holding_registers(4, 1).await.unwrap().unwrap();
    let p = decoders::modbus::decode(&pt, 4, &words).unwrap();
    let mpa = number(&p, "pressure");
    assert!(
        mpa > Decimal::new(10, 2) && mpa <= Decimal::new(40, 2),
        "{mpa}"
    );
    // Unknown unit id: the gateway-target exception, not a hang.
    ctx.set_slave(Slave(99));
    let err = ctx.read_holding_registers(0, 2).await.unwrap();
    assert!(err.is_err());
    drop(ctx);
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.modbus_requests, 3);
}
