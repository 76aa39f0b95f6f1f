//! The driver: steps the engine against the wall clock and sends each step's readings over
//! the routes' transports.

use super::*;

pub(super) struct Driver {
    pub(super) engine: Arc<Mutex<Engine>>,
    pub(super) routes: Vec<Route>,
    pub(super) config: FleetConfig,
    pub(super) counters: Arc<Counters>,
    pub(super) mqtt: Option<AsyncClient>,
    pub(super) hydrants: Option<Arc<Mutex<Vec<Hydrant>>>>,
    pub(super) clock: Arc<AtomicI64>,
    pub(super) population: Arc<Vec<MeterSpec>>,
    pub(super) hydrant_truth: Arc<Mutex<Vec<TruthEvent>>>,
    pub(super) latest: Latest,
    pub(super) modbus: Option<ModbusState>,
    pub(super) wmbus_socket: Option<UdpSocket>,
    pub(super) message_id: Arc<AtomicU16>,
    /// Daily NB-IoT meters: readings (with the SER of their step) since the last uplink.
    pub(super) nbiot_history: Mutex<HashMap<u32, Vec<(Emission, u8)>>>,
}

pub(super) struct ModbusState {
    pub(super) addr: SocketAddr,
    pub(super) devices: Vec<modbus_tcp::ModbusDevice>,
    pub(super) maps: HashMap<String, decoders::modbus::RegisterMap>,
    pub(super) images: modbus_tcp::Images,
}

pub(super) fn dma_measurement(engine: &Engine, dma: u32) -> Option<modbus_tcp::DmaMeasurement> {
    engine
        .dma_inflow(dma)
        .map(|(inflow_ml, flow_lph)| modbus_tcp::DmaMeasurement {
            inflow_ml,
            flow_lph,
        })
}

/// At most this many CoAP / HTTP exchanges run at once (one socket each).
const MAX_CONCURRENT_EXCHANGES: usize = 32;

impl Driver {
    pub(super) async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        finished: watch::Sender<bool>,
    ) -> anyhow::Result<()> {
        let result = tokio::select! {
            r = self.steps() => r,
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        finished.send_replace(true);
        result
    }

    async fn steps(&self) -> anyhow::Result<()> {
        let conc = self.config.concentrators.clone();
        let n_conc = conc.as_ref().map_or(0, |c| c.count as usize);
        let frames_format = conc
            .as_ref()
            .is_some_and(|c| c.format == ConcentratorFormat::Frames);
        let mut buffers: Vec<Vec<ConcentratorReading>> = vec![Vec::new(); n_conc];
        let mut frame_buffers: Vec<Vec<Vec<u8>>> = vec![Vec::new(); n_conc];
        let ids: Vec<String> = lock(&self.engine)
            .population()
            .meters
            .iter()
            .map(|m| m.id.as_str().to_owned())
            .collect();
        let offset = i64::from(self.config.scenario.utc_offset_hours) * 3600;
        let seed = self.config.scenario.seed;
        let mut ticker =
            tokio::time::interval(self.config.step_every.max(Duration::from_micros(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut step = 0u64;
        loop {
            if self.config.max_steps.is_some_and(|m| step >= m) {
                break;
            }
            if !self.config.step_every.is_zero() {
                ticker.tick().await;
            }
            if self.config.not_ahead_of_wall_clock {
                // The step's readings are stamped at its end.
                let step_end = {
                    let engine = lock(&self.engine);
                    engine.now().unix_timestamp()
                        + i64::from(engine.scenario().interval_minutes) * 60
                };
                let ahead = step_end - time::OffsetDateTime::now_utc().unix_timestamp();
                if ahead > 0 {
                    tokio::time::sleep(Duration::from_secs(ahead.unsigned_abs())).await;
                }
            }
            let mut emissions: Vec<Emission> = Vec::new();
            let now = {
                let mut engine = lock(&self.engine);
                if engine.finished() {
                    break;
                }
                engine.step(|e| emissions.push(*e));
                engine.now().unix_timestamp()
            };
            step += 1;
            self.clock.store(now, Ordering::Relaxed);
            for e in &emissions {
                match self.routes.get(e.meter as usize) {
                    Some(Route::Concentrator(c)) => {
                        if e.delivery == crate::engine::Delivery::Lost {
                            add(&self.counters.lost, 1);
                        }
                        if e.delivery == Delivery::Corrupt && !frames_format {
                            add(&self.counters.corrupted, 1);
                        }
                        if frames_format {
                            if let Some(buf) = frame_buffers.get_mut(*c as usize) {
                                buf.extend(self.concentrator_frames(e, step));
                            }
                        } else if let (Some(buf), Some(id)) =
                            (buffers.get_mut(*c as usize), ids.get(e.meter as usize))
                        {
                            buf.extend(concentrator_entries(id, e));
                        }
                    }
                    Some(Route::Wmbus) => self.send_wmbus(e, step).await,
                    Some(Route::Mbus) => {
                        // Polled devices answer with their latest reading; a lost reading
                        // (comm loss) leaves the previous one in place.
                        if e.delivery == Delivery::Lost {
                            add(&self.counters.lost, 1);
                        } else {
                            lock(&self.latest).insert(e.meter, *e);
                        }
                    }
                    Some(Route::Coap | Route::Http) => {}
                    Some(Route::None) | None => {}
                }
            }
            self.exchanges(&emissions, step).await;
            if let Some(m) = &self.modbus {
                let engine = lock(&self.engine);
                modbus_tcp::update(&m.images, &m.devices, &m.maps, |d| {
                    dma_measurement(&engine, d)
                });
            }
            if self.config.wmbus_dma_inlets {
                self.send_dma_inlets(now, step).await;
            }
            if let Some(c) = &conc {
                let midnight = (now + offset).rem_euclid(86_400) == 0;
                if c.upload == Upload::EveryStep || midnight {
                    self.upload(&mut buffers, now).await?;
                    self.upload_frames(&mut frame_buffers).await?;
                }
            }
            if let Some(bank) = &self.hydrants {
                let ups: Vec<_> = lock(bank)
                    .iter_mut()
                    .map(|h| h.tick(now, seed, step))
                    .collect();
                {
                    let mut truth = lock(&self.hydrant_truth);
                    for up in &ups {
                        for ev in &up.events {
                            let kind = match ev.as_str() {
                                "illegal_use" => TruthKind::HydrantIllegalUse,
                                "tilt" => TruthKind::HydrantTilt,
                                _ => continue,
                            };
                            // The gateway names hydrant readings and alarms `hydrant:{id}`.
                            let id = format!("hydrant:{}", up.hydrant);
                            truth.push(TruthEvent::new(kind, id, unix(now), None));
                        }
                    }
                }
                if let Some(client) = &self.mqtt
                    && let Some(mqtt) = &self.config.mqtt
                {
                    for up in ups {
                        let topic = mqtt.topic(&format!("hydrant/{}/up", up.hydrant));
                        let body = serde_json::to_vec(&up)?;
                        client
                            .publish(topic, QoS::AtLeastOnce, false, body)
                            .await
                            .context("publishing hydrant status")?;
                        add(&self.counters.hydrant_ups, 1);
                    }
                }
            }
            add(&self.counters.steps, 1);
        }
        let now = lock(&self.engine).now().unix_timestamp();
        self.upload(&mut buffers, now).await?;
        self.upload_frames(&mut frame_buffers).await?;
        Ok(())
    }

    /// Returns the raw frames a concentrator forwards for one reading (delivery faults applied).
    fn concentrator_frames(&self, e: &Emission, step: u64) -> Vec<Vec<u8>> {
        let Some(spec) = self.population.get(e.meter as usize) else {
            return Vec::new();
        };
        let offset_h = self.config.scenario.utc_offset_hours;
        let Some(mut frame) = cjt188_reply(spec, e, (step & 0xFF) as u8, offset_h) else {
            return Vec::new();
        };
        match e.delivery {
            Delivery::Lost => Vec::new(),
            Delivery::Normal => vec![frame],
            Delivery::Duplicate => {
                add(&self.counters.duplicated, 1);
                vec![frame.clone(), frame]
            }
            Delivery::Corrupt => {
                add(&self.counters.corrupted, 1);
                corrupt_checksummed(&mut frame);
                vec![frame]
            }
        }
    }

    async fn upload_frames(&self, buffers: &mut [Vec<Vec<u8>>]) -> anyhow::Result<()> {
        let (Some(client), Some(mqtt)) = (&self.mqtt, &self.config.mqtt) else {
            return Ok(());
        };
        for (k, buf) in buffers.iter_mut().enumerate() {
            let topic = mqtt.topic(&format!("concentrator/conc-{k:03}/frame"));
            for frame in std::mem::take(buf) {
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, frame)
                    .await
                    .context("publishing concentrator frame")?;
                add(&self.counters.concentrator_frames, 1);
            }
        }
        Ok(())
    }

    /// Runs the step's CoAP and HTTP exchanges concurrently and waits for all of them, so a
    /// meter's readings always leave in time order.
    async fn exchanges(&self, emissions: &[Emission], step: u64) {
        let semaphore = Arc::new(Semaphore::new(MAX_CONCURRENT_EXCHANGES));
        let mut set = JoinSet::new();
        for e in emissions {
            let route = self.routes.get(e.meter as usize).copied();
            if !matches!(route, Some(Route::Coap | Route::Http)) {
                continue;
            }
            let Some(spec) = self.population.get(e.meter as usize).cloned() else {
                continue;
            };
            let Some((frame, copies, e)) = self.nbiot_uplink(&spec, e, step) else {
                continue;
            };
            let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else {
                break;
            };
            let counters = Arc::clone(&self.counters);
            match route {
                Some(Route::Coap) => {
                    let Some(c) = &self.config.coap else { continue };
                    let key = self
                        .config
                        .nbiot_key_seed
                        .as_deref()
                        .map(|seed| crate::nbiot::meter_key(seed, spec.id.as_str()));
                    let job = CoapJob {
                        gateway: c.gateway,
                        engine: Arc::clone(&self.engine),
                        message_id: Arc::clone(&self.message_id),
                        counters,
                        spec,
                        e,
                        frame,
                        copies,
                        valve: !self.config.nbiot_without_valve.contains(&e.meter),
                        key,
                        token: (crate::profile::mix(u64::from(e.meter) ^ (step << 32)) as u32)
                            .to_be_bytes(),
                    };
                    set.spawn(async move {
                        job.run().await;
                        drop(permit);
                    });
                }
                Some(Route::Http) => {
                    let Some(h) = self.config.http_push.clone() else {
                        continue;
                    };
                    let mut envelope =
                        Envelope::new(h.platform, format!("nb-{:08}", e.meter), frame);
                    envelope.imei = Some(format!("86{:013}", e.meter));
                    envelope.received_at = Some(unix(e.ts));
                    let body = encode_envelope(h.platform, &envelope);
                    set.spawn(async move {
                        for _ in 0..copies {
                            match http_push(h.gateway, &h.path, h.secret.as_bytes(), &body).await {
                                Ok(202) => add(&counters.http_pushes, 1),
                                Ok(status) => {
                                    tracing::warn!(status, "http push refused");
                                    add(&counters.http_rejected, 1);
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "http push failed");
                                    add(&counters.errors, 1);
                                }
                            }
                        }
                        drop(permit);
                    });
                }
                _ => {}
            }
        }
        while set.join_next().await.is_some() {}
    }

    /// Returns the payload an NB-IoT meter sends at this step (if it sends), how many times
    /// (duplicate faults) and its newest reading; counts lost, corrupted and duplicated.
    fn nbiot_uplink(
        &self,
        spec: &MeterSpec,
        e: &Emission,
        step: u64,
    ) -> Option<(Vec<u8>, u32, Emission)> {
        let offset_h = self.config.scenario.utc_offset_hours;
        let ser = (step & 0xFF) as u8;
        let readings = match self.config.nbiot_uplink {
            NbiotUplink::Hourly => {
                let every = u64::from(self.config.nbiot_report_every.max(1));
                if !(step + u64::from(e.meter)).is_multiple_of(every) {
                    // Between uplinks the meter is asleep (PSM); the register keeps counting.
                    return None;
                }
                if e.delivery == Delivery::Lost {
                    add(&self.counters.lost, 1);
                    return None;
                }
                vec![(*e, ser)]
            }
            NbiotUplink::Daily => {
                let mut history = lock(&self.nbiot_history);
                let taken = history.entry(e.meter).or_default();
                if e.delivery == Delivery::Lost {
                    add(&self.counters.lost, 1);
                } else {
                    taken.push((*e, ser));
                }
                // 60-minute steps (checked at start): 24 steps a day.
                if !(step + u64::from(e.meter)).is_multiple_of(24) {
                    return None;
                }
                std::mem::take(taken)
            }
        };
        let newest = readings.last()?.0;
        let mut payload = Vec::new();
        let mut copies = 1;
        for (r, ser) in &readings {
            let mut frame = cjt188_reply(spec, r, *ser, offset_h)?;
            match r.delivery {
                Delivery::Corrupt => {
                    corrupt_checksummed(&mut frame);
                    add(&self.counters.corrupted, 1);
                }
                Delivery::Duplicate => {
                    add(&self.counters.duplicated, 1);
                    copies = 2;
                }
                Delivery::Normal | Delivery::Lost => {}
            }
            payload.extend(frame);
        }
        add(
            &self.counters.nbiot_frames,
            readings.len() as u64 * u64::from(copies),
        );
        Some((payload, copies, newest))
    }

    /// Sends each DMA inlet bulk meter's telegram: its totaliser (the DMA's inflow so far)
    /// stamped with its own clock at the step's end, as the fleet's wM-Bus meters do.
    async fn send_dma_inlets(&self, now: i64, step: u64) {
        let (Some(socket), Some(w)) = (&self.wmbus_socket, &self.config.wmbus) else {
            return;
        };
        let measurements: Vec<(u32, modbus_tcp::DmaMeasurement)> = {
            let engine = lock(&self.engine);
            (0..engine.population().dmas)
                .filter_map(|d| Some((d, dma_measurement(&engine, d)?)))
                .collect()
        };
        for (d, m) in measurements {
            let spec = crate::engine::dma_inlet_meter(d);
            let mut e = Emission::idle(crate::engine::dma_inlet_key_index(d));
            e.ts = now;
            e.meter_ts = now;
            e.register_ml = u64::try_from(m.inflow_ml).unwrap_or(0);
            e.flow_lph = m.flow_lph;
            e.battery_pct = 100;
            let key = w
                .encrypted
                .then(|| wmbus_key(self.config.scenario.seed, e.meter));
            let Some(telegram) = crate::frames::wmbus_telegram(
                &spec,
                (step & 0xFF) as u8,
                key,
                &e,
                self.config.scenario.utc_offset_hours,
            ) else {
                continue;
            };
            match socket.send_to(&telegram, w.gateway).await {
                Ok(_) => add(&self.counters.wmbus_telegrams, 1),
                Err(err) => {
                    tracing::warn!(error = %err, dma = d, "inlet wm-bus datagram not sent");
                    add(&self.counters.errors, 1);
                }
            }
        }
    }

    async fn send_wmbus(&self, e: &Emission, step: u64) {
        let (Some(socket), Some(w)) = (&self.wmbus_socket, &self.config.wmbus) else {
            return;
        };
        if e.delivery == Delivery::Lost {
            add(&self.counters.lost, 1);
            return;
        }
        let Some(spec) = self.population.get(e.meter as usize) else {
            return;
        };
        let key = w
            .encrypted
            .then(|| wmbus_key(self.config.scenario.seed, e.meter));
        let Some(mut telegram) = crate::frames::wmbus_telegram(
            spec,
            (step & 0xFF) as u8,
            key,
            e,
            self.config.scenario.utc_offset_hours,
        ) else {
            return;
        };
        if e.delivery == Delivery::Corrupt {
            corrupt_wmbus(&mut telegram, w.encrypted);
            add(&self.counters.corrupted, 1);
        }
        let copies = if e.delivery == Delivery::Duplicate {
            add(&self.counters.duplicated, 1);
            2
        } else {
            1
        };
        for _ in 0..copies {
            match socket.send_to(&telegram, w.gateway).await {
                Ok(_) => add(&self.counters.wmbus_telegrams, 1),
                Err(err) => {
                    tracing::warn!(error = %err, "wm-bus datagram not sent");
                    add(&self.counters.errors, 1);
                }
            }
        }
    }

    async fn upload(
        &self,
        buffers: &mut [Vec<ConcentratorReading>],
        now: i64,
    ) -> anyhow::Result<()> {
        let (Some(client), Some(mqtt)) = (&self.mqtt, &self.config.mqtt) else {
            return Ok(());
        };
        let sent_at = unix(now).format(&Rfc3339)?;
        for (k, buf) in buffers.iter_mut().enumerate() {
            let cid = format!("conc-{k:03}");
            let readings = std::mem::take(buf);
            // Large concentrators split their upload so one message stays well under 1 MB.
            for chunk in readings.chunks(1000) {
                let batch = ConcentratorBatch {
                    v: 1,
                    concentrator: cid.clone(),
                    sent_at: sent_at.clone(),
                    readings: chunk.to_vec(),
                };
                client
                    .publish(
                        mqtt.topic(&format!("concentrator/{cid}/readings")),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&batch)?,
                    )
                    .await
                    .context("publishing concentrator batch")?;
                add(&self.counters.concentrator_batches, 1);
                add(&self.counters.concentrator_readings, chunk.len() as u64);
            }
        }
        Ok(())
    }
}

/// One NB-IoT meter's uplink (and the valve command it may get back).
struct CoapJob {
    gateway: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    message_id: Arc<AtomicU16>,
    counters: Arc<Counters>,
    spec: MeterSpec,
    e: Emission,
    frame: Vec<u8>,
    copies: u32,
    /// The meter has a valve; without one it refuses valve commands.
    valve: bool,
    /// The meter's key: uplinks sealed, downlinks checked.
    key: Option<[u8; 16]>,
    token: [u8; 4],
}

impl CoapJob {
    /// The payload as sent: sealed with a fresh counter when the meter has a key.
    fn seal(&self, payload: &[u8]) -> (Vec<u8>, Option<u64>) {
        match &self.key {
            Some(key) => {
                let (sealed, counter) =
                    crate::nbiot::seal_uplink(key, self.spec.id.as_str(), payload);
                (sealed, Some(counter))
            }
            None => (payload.to_vec(), None),
        }
    }

    async fn run(self) {
        let socket = match UdpSocket::bind(unspecified(self.gateway)).await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "cannot bind a coap socket");
                add(&self.counters.errors, 1);
                return;
            }
        };
        let model::MeterAddress::Cjt188 {
            meter_type,
            address,
        } = self.spec.address
        else {
            return;
        };
        for _ in 0..self.copies {
            let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
            let (payload, counter) = self.seal(&self.frame);
            let response = match coap_post(&socket, self.gateway, mid, self.token, payload).await {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(meter = %self.spec.id, error = %err, "coap uplink failed");
                    add(&self.counters.errors, 1);
                    continue;
                }
            };
            add(&self.counters.coap_uplinks, 1);
            let response = match (&self.key, counter) {
                (Some(key), Some(counter)) => {
                    match crate::nbiot::open_downlink(
                        key,
                        self.spec.id.as_str(),
                        counter,
                        &response,
                    ) {
                        Some(body) => body,
                        None => {
                            add(&self.counters.errors, 1);
                            continue;
                        }
                    }
                }
                _ => response,
            };
            let Some(cmd) = downlink_valve(&response, &address) else {
                continue;
            };
            if !self.valve {
                let refusal = valve_refusal(meter_type, address, cmd, cjt188_status(&self.e));
                let (refusal, _) = self.seal(&refusal);
                let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
                match coap_post(&socket, self.gateway, mid, self.token, refusal).await {
                    Ok(_) => add(&self.counters.coap_valve_refused, 1),
                    Err(err) => {
                        tracing::warn!(meter = %self.spec.id, error = %err, "valve refusal failed");
                        add(&self.counters.errors, 1);
                    }
                }
                continue;
            }
            lock(&self.engine).set_valve(self.e.meter, cmd.open);
            add(&self.counters.coap_valve_commands, 1);
            let mut after = self.e;
            after.status.valve_closed = !cmd.open;
            let reply = valve_reply(meter_type, address, cmd, cjt188_status(&after));
            let (reply, _) = self.seal(&reply);
            let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
            match coap_post(&socket, self.gateway, mid, self.token, reply).await {
                Ok(_) => add(&self.counters.coap_valve_replies, 1),
                Err(err) => {
                    tracing::warn!(meter = %self.spec.id, error = %err, "valve reply failed");
                    add(&self.counters.errors, 1);
                }
            }
        }
    }
}

pub(super) async fn hydrant_commands(
    mut incoming: mpsc::Receiver<rumqttc::Publish>,
    client: AsyncClient,
    mqtt: MqttConfig,
    bank: Arc<Mutex<Vec<Hydrant>>>,
    clock: Arc<AtomicI64>,
    counters: Arc<Counters>,
) {
    while let Some(p) = incoming.recv().await {
        // Topic: {prefix}hydrant/{hid}/cmd
        let Some(rest) = p.topic.strip_prefix(&mqtt.topic("hydrant/")) else {
            continue;
        };
        let Some(hid) = rest.strip_suffix("/cmd") else {
            continue;
        };
        let cmd: HydrantCommand = match serde_json::from_slice(&p.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(hydrant = hid, error = %e, "bad hydrant command ignored");
                continue;
            }
        };
        let ack = {
            let mut bank = lock(&bank);
            let Some(h) = bank.iter_mut().find(|h| h.id == hid) else {
                continue;
            };
            let before = h.executed;
            let ack = h.handle(&cmd, clock.load(Ordering::Relaxed));
            add(&counters.hydrant_commands_executed, h.executed - before);
            ack
        };
        let body = match serde_json::to_vec(&ack) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode hydrant ack");
                continue;
            }
        };
        let topic = mqtt.topic(&format!("hydrant/{hid}/ack"));
        if client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            return;
        }
        add(&counters.hydrant_acks, 1);
    }
}
