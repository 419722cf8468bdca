//! `stats` counts the runtime's live tokio tasks (`tasks`), so a soak can
//! see a task leak: open connections add tasks, and closing them gives
//! every one back.

mod common;

use common::{Daemon, Raw, SOON, wait_until_blocking};
use serde_json::json;

#[test]
fn tasks_rise_with_connections_and_fall_back_when_they_close() {
    let d = Daemon::start("");
    let mut watcher = Raw::connect(&d.socket());
    let base = watcher.counters()["tasks"];
    assert!(base > 0, "the watcher's own connection is a task: {base}");
    let mut conns: Vec<Raw> = (0..20).map(|_| Raw::connect(&d.socket())).collect();
    for c in &mut conns {
        // Answered, so accepted and served by a task of its own.
        c.send(json!({"id": 1, "op": "hello"}));
        assert_eq!(c.recv().unwrap()["ok"], json!(true));
    }
    let busy = watcher.counters()["tasks"];
    assert!(
        busy >= base + 20,
        "20 connections more, {base} → {busy} tasks"
    );
    drop(conns);
    wait_until_blocking("the closed connections' tasks to end", SOON, || {
        watcher.counters()["tasks"] <= base
    });
}
