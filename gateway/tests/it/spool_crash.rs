//! kill -9 of a process writing to the spool loses nothing that was acknowledged.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use gateway::spool::{Cursor, Spool, SpoolConfig};

#[test]
fn sigkill_mid_write_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway-spool-torture"))
        .arg(dir.path())
        .arg("4")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start torture helper");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // Highest acknowledged n per task.
    let mut acked: BTreeMap<usize, i64> = BTreeMap::new();
    let mut count = 0;
    while count < 3000 {
        let line = lines.next().expect("helper alive").expect("line");
        let (t, n) = line.split_once(' ').expect("`task n`");
        acked.insert(t.parse().unwrap(), n.parse().unwrap());
        count += 1;
    }
    // SIGKILL (std's kill is SIGKILL on Unix) while the writers are busy.
    child.kill().expect("kill -9");
    // Lines already written to the pipe before death were acknowledged too.
    for line in lines {
        let line = line.expect("line");
        let (t, n) = line.split_once(' ').expect("`task n`");
        acked.insert(t.parse().unwrap(), n.parse().unwrap());
        count += 1;
    }
    child.wait().expect("reaped");

    let (spool, _writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).expect("reopen");
    let entries = spool.read(&mut Cursor::start(), usize::MAX).expect("read");
    let mut per_task: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for e in &entries {
        let entry: model::BatchEntry = serde_json::from_slice(&e.json).expect("entry json");
        let task: usize = e.meter.strip_prefix("torture:").unwrap().parse().unwrap();
        per_task
            .entry(task)
            .or_default()
            .push(entry.reading.value.try_into().unwrap());
    }
    assert_eq!(acked.len(), 4);
    for (task, last) in &acked {
        let got = per_task.get(task).expect("task present");
        // Every acknowledged reading 0..=last is there, in order, without gaps; at most the
        // one in flight at the kill may follow.
        let expected: Vec<i64> = (0..=*last).collect();
        assert_eq!(&got[..expected.len()], &expected[..], "task {task}");
        assert!(
            got.len() <= expected.len() + 1,
            "task {task}: {}",
            got.len()
        );
    }
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert!(count >= 3000);
}
