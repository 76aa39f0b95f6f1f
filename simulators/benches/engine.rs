//! Engine throughput: simulated meter-days per second, with and without building frames.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use simulators::engine::Engine;
use simulators::frames::cjt188_reply;
use simulators::scenario::Scenario;
use time::macros::datetime;

const METERS: u32 = 10_000;

fn one_day(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(u64::from(METERS)));
    group.bench_function("meter_days_hourly", |b| {
        b.iter_batched(
            || {
                Engine::new(Scenario::plain(
                    METERS,
                    1,
                    1,
                    datetime!(2026-06-01 0:00 UTC),
                ))
            },
            |mut engine| {
                let mut sum = 0u64;
                engine.run(|e| sum = sum.wrapping_add(e.register_ml));
                black_box(sum)
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.bench_function("meter_days_hourly_with_cjt188_frames", |b| {
        b.iter_batched(
            || {
                Engine::new(Scenario::plain(
                    METERS,
                    1,
                    1,
                    datetime!(2026-06-01 0:00 UTC),
                ))
            },
            |mut engine| {
                let specs = engine.population().meters.clone();
                let mut bytes = 0usize;
                engine.run(|e| {
                    if let Some(f) = cjt188_reply(&specs[e.meter as usize], e, 0, 8) {
                        bytes += f.len();
                    }
                });
                black_box(bytes)
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, one_day);
criterion_main!(benches);
