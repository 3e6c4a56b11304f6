//! The standalone disk store seen from outside: a SIGKILL loses nothing that was answered
//! with `sent`, a restart keeps groups, cursors and the dedupe window, a wiped data
//! directory is a new epoch that every transport reports as a gap, and a data directory
//! that cannot be served stops the start with an error naming it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imgate_client::{ClientBuilder, Encoding};
use serde_json::{json, Value};

use crate::support::{
    auth, curl, fixed_ports, messages, token, url, within, Gateway, RawTcp, Via, WAIT,
};

/// A gateway on `dir` and `ports`, with `extra` flags.
async fn on_dir(dir: &std::path::Path, ports: &[String; 4], extra: &[&str]) -> Gateway {
    let mut args: Vec<&str> = ports.iter().map(String::as_str).collect();
    args.extend(["--data-dir", dir.to_str().unwrap()]);
    args.extend(extra);
    Gateway::start(&args).await.expect("gateway starts")
}

/// Every message of `uid`'s inbox, oldest first, read with short polls.
async fn inbox(gw: &Gateway, uid: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = curl(&[
            "-H",
            &auth(uid),
            &url(
                gw,
                &format!("/v1/messages?device=audit&after={after}&limit=1000"),
            ),
        ])
        .await
        .json();
        let msgs = page["messages"].as_array().unwrap().clone();
        if msgs.is_empty() {
            return all;
        }
        after = msgs.last().unwrap()["seq"].as_u64().unwrap();
        all.extend(msgs);
    }
}

/// alice streams 5,000 messages to bob, 32 at a time, while the gateway is SIGKILLed three
/// times and restarted on the same data directory and ports. Every message answered with
/// `sent` is in bob's inbox exactly once; seqs only grow across restarts; bob's tablet,
/// which acked and closed before each kill, resumes from its stored cursor.
#[tokio::test]
async fn sigkill_under_load_loses_nothing_answered_with_sent() {
    const TOTAL: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let mut gw = on_dir(dir.path(), &ports, &[]).await;
    let tcp = format!("tcp://{}", ports[3]);
    let (alice, _a) = within(
        WAIT,
        "alice connects",
        ClientBuilder::new(&tcp, token("alice"))
            .device("laptop")
            .encoding(Encoding::Msgpack)
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .unwrap();
    let alice = Arc::new(alice);
    // id -> seq, for every send answered with `sent`.
    let answered: Arc<Mutex<BTreeMap<usize, u64>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    // Held while bob's tablet acks and closes, so the kill comes with sends still to do.
    let paused = Arc::new(AtomicBool::new(true));
    let senders: Vec<_> = (0..32)
        .map(|_| {
            let (alice, answered, next) = (alice.clone(), answered.clone(), next.clone());
            let paused = paused.clone();
            tokio::spawn(async move {
                loop {
                    while paused.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        return;
                    }
                    // A send refused or cut off by the kill is sent again with its id.
                    loop {
                        let send = imgate_proto::Send {
                            id: Some(format!("m{i}")),
                            to: Some("bob".into()),
                            group: None,
                            body: json!({ "i": i }),
                        };
                        match alice.send(send).await {
                            Ok(sent) => {
                                answered.lock().unwrap().insert(i, sent.seq);
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
            })
        })
        .collect();

    let mut tablet_cursor = None;
    for kill in 1..=3 {
        // Bob's tablet acks one message and closes.
        paused.store(true, Ordering::Relaxed);
        let mut tablet = RawTcp::connect(&gw).await;
        let w = tablet.login(&token("bob"), "tablet").await;
        if let Some(c) = tablet_cursor {
            assert_eq!(
                w["resume"].as_u64(),
                Some(c),
                "the tablet resumes from its cursor"
            );
        }
        // carol's message is the one the tablet acks.
        let carol = curl(&[
            "-X",
            "POST",
            "-H",
            &auth("carol"),
            "-H",
            "content-type: application/json",
            "-d",
            &format!(r#"{{"id":"carol{kill}","to":"bob","body":{{"carol":{kill}}}}}"#),
            &url(&gw, "/v1/messages"),
        ])
        .await
        .json();
        assert!(carol["seq"].as_u64().is_some(), "{carol}");
        // `sent` carries carol's own copy's seq; the tablet gets bob's copy.
        let seq = loop {
            let m = tablet.recv_type("msg").await;
            if m["id"] == format!("carol{kill}") {
                break m["seq"].as_u64().unwrap();
            }
        };
        tablet.send(json!({"type": "ack", "seq": seq})).await;
        // Frames are handled in order: the pong means the ack was taken.
        tablet.send(json!({"type": "ping"})).await;
        tablet.recv_type("pong").await;
        drop(tablet);
        tablet_cursor = Some(seq);
        // The cursor is written when the connection ends; a new login shows it stored.
        within(WAIT, "the tablet's cursor to be stored", async {
            loop {
                let mut t = RawTcp::connect(&gw).await;
                if t.login(&token("bob"), "tablet").await["resume"].as_u64() == Some(seq) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        paused.store(false, Ordering::Relaxed);
        let start = answered.lock().unwrap().len();
        // Let a fifth of the messages through, then kill while sends are in flight.
        within(Duration::from_secs(60), "sends to progress", async {
            while answered.lock().unwrap().len() < start + TOTAL / 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        gw.signal("KILL").unwrap();
        let at_kill = answered.lock().unwrap().len();
        assert!(at_kill < TOTAL, "killed while sending ({at_kill} answered)");
        gw.wait(WAIT).await.unwrap();
        gw = on_dir(dir.path(), &ports, &[]).await;
        // The tablet's cursor came through the kill.
        let w = {
            let mut raw = RawTcp::connect(&gw).await;
            raw.login(&token("bob"), "tablet").await
        };
        assert_eq!(w["resume"].as_u64(), tablet_cursor, "{w}");
    }
    for s in senders {
        within(Duration::from_secs(120), "every send answered", s)
            .await
            .unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert_eq!(answered.len(), TOTAL);
    // Seqs kept increasing: a store that started over would give a new message a seq
    // already answered for another.
    let distinct: HashSet<u64> = answered.values().copied().collect();
    assert_eq!(distinct.len(), TOTAL, "every message has its own seq");

    let mut stored = inbox(&gw, "bob").await;
    let carols = stored.iter().filter(|m| m["from"] == "carol").count();
    assert_eq!(carols, 3, "the tablet's messages are kept too");
    stored.retain(|m| m["from"] == "alice");
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in seq order");
    let ids: Vec<&str> = stored.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no message stored twice");
    for i in answered.keys() {
        assert!(
            unique.contains(format!("m{i}").as_str()),
            "m{i} was answered with sent but is not in bob's inbox"
        );
    }
    // `sent` carries the seq of alice's own copy: that is where each one is.
    let own: BTreeMap<u64, String> = inbox(&gw, "alice")
        .await
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (i, seq) in &answered {
        assert_eq!(
            own.get(seq),
            Some(&format!("m{i}")),
            "alice's copy of m{i} at seq {seq}"
        );
    }
    assert_eq!(stored.len(), TOTAL, "exactly the messages sent");
}

/// Groups, the dedupe window and cursors survive a SIGTERM restart: a re-sent id answers
/// the original seq, and the group still delivers to its members.
/// A revocation (admin kick with `revoke`) is stored in the data directory: after a restart
/// the revoked token is still refused, and one issued later is accepted.
#[tokio::test]
async fn a_restart_keeps_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let mut gw = on_dir(dir.path(), &ports, &[]).await;
    let old = token("bob");
    let poll = |gw: &Gateway, token: &str| {
        let (u, h) = (
            url(gw, "/v1/messages"),
            format!("Authorization: Bearer {token}"),
        );
        async move { curl(&["-H", &h, &u]).await.status }
    };
    assert_eq!(poll(&gw, &old).await, 200);
    let r = curl(&[
        "-H",
        &format!(
            "Authorization: Bearer {}",
            crate::support::admin_token("ops")
        ),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"uid":"bob","revoke":true}"#,
        &url(&gw, "/v1/admin/kick"),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = r.json()["revoked_before"].as_u64().unwrap();
    assert_eq!(poll(&gw, &old).await, 401);
    gw.signal("TERM").unwrap();
    assert!(gw.wait(WAIT).await.unwrap().success());
    let gw = on_dir(dir.path(), &ports, &[]).await;
    let refused = curl(&[
        "-H",
        &format!("Authorization: Bearer {old}"),
        &url(&gw, "/v1/messages"),
    ])
    .await;
    assert_eq!(
        (refused.status, refused.json()["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert!(refused.body.contains("revoked"), "{}", refused.body);
    while imgate_gateway::auth::unix_now() <= before {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(poll(&gw, &token("bob")).await, 200);
}

#[tokio::test]
async fn a_restart_keeps_groups_and_the_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let mut gw = on_dir(dir.path(), &ports, &[]).await;
    let created = curl(&[
        "-X",
        "POST",
        "-H",
        &auth("alice"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"id":"team","members":["bob","carol"]}"#,
        &url(&gw, "/v1/groups"),
    ])
    .await;
    assert!(created.status < 300, "{}", created.body);
    let send = |gw: &Gateway| {
        let u = url(gw, "/v1/messages");
        async move {
            curl(&[
                "-X",
                "POST",
                "-H",
                &auth("alice"),
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"id":"once","to":"bob","body":{"text":"hi"}}"#,
                &u,
            ])
            .await
            .json()
        }
    };
    let first = send(&gw).await;
    gw.signal("TERM").unwrap();
    assert!(gw.wait(WAIT).await.unwrap().success());
    let gw = on_dir(dir.path(), &ports, &[]).await;
    let again = send(&gw).await;
    assert_eq!(again["seq"], first["seq"], "{again} after {first}");
    assert_eq!(inbox(&gw, "bob").await.len(), 1, "stored once");

    let (carol, mut carol_events) = crate::support::connect(&gw, "carol", "phone", Via::Tcp).await;
    crate::support::welcome(&mut carol_events).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    let sent = alice
        .send(imgate_proto::Send {
            id: None,
            to: None,
            group: Some("team".into()),
            body: json!({"text": "to the team"}),
        })
        .await
        .expect("the group survived the restart");
    let m = messages(&mut carol_events, 1).await;
    assert_eq!(m[0].group.as_deref(), Some("team"));
    assert!(sent.seq > first["seq"].as_u64().unwrap());
    drop(carol);
}

/// After a restart on an empty data directory (a new epoch), a device resuming with its old
/// epoch and seq gets `gap: true` and every message stored after the reset, over TCP,
/// WebSocket, SSE (`Last-Event-ID`) and long poll; so does a TCP client that names no
/// epoch but a seq above anything the new store assigned.
#[tokio::test]
async fn a_wiped_data_directory_is_a_new_epoch_reported_as_a_gap_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let mut gw = on_dir(dir.path(), &ports, &[]).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    for i in 0..10 {
        alice.send_to("bob", json!({ "old": i })).await.unwrap();
    }
    let before = inbox(&gw, "bob").await;
    let old_seq = before.last().unwrap()["seq"].as_u64().unwrap();
    let poll = curl(&[
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/messages?device=x&after=0"),
    ])
    .await
    .json();
    let old_epoch = poll["epoch"].as_str().unwrap().to_owned();
    drop(alice);
    gw.signal("TERM").unwrap();
    gw.wait(WAIT).await.unwrap();
    std::fs::remove_dir_all(dir.path()).unwrap();

    let gw = on_dir(dir.path(), &ports, &[]).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    for i in 0..2 {
        alice.send_to("bob", json!({ "new": i })).await.unwrap();
    }
    let new_seqs: Vec<u64> = inbox(&gw, "bob")
        .await
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(new_seqs.len(), 2);
    assert!(
        new_seqs[1] < old_seq,
        "the new store's seqs are below the old resume point"
    );

    // TCP, naming the old epoch.
    let mut raw = RawTcp::connect(&gw).await;
    raw.send(json!({"type":"login","token":token("bob"),"device":"phone",
        "resume": old_seq, "epoch": old_epoch}))
        .await;
    let w = raw.recv_type("welcome").await;
    assert_eq!(w["gap"], json!(true), "{w}");
    assert_ne!(w["epoch"].as_str().unwrap(), old_epoch);
    for seq in &new_seqs {
        assert_eq!(raw.recv_type("msg").await["seq"].as_u64(), Some(*seq));
    }

    // TCP without an epoch, with a seq above anything the new store assigned.
    let mut raw = RawTcp::connect(&gw).await;
    raw.send(json!({"type":"login","token":token("bob"),"device":"phone2","resume": old_seq}))
        .await;
    let w = raw.recv_type("welcome").await;
    assert_eq!(w["gap"], json!(true), "{w}");
    for seq in &new_seqs {
        assert_eq!(raw.recv_type("msg").await["seq"].as_u64(), Some(*seq));
    }

    // WebSocket, through the client crate holding the old epoch.
    let (_ws, mut events) = within(
        WAIT,
        "ws connect",
        ClientBuilder::new(gw.ws_url(), token("bob"))
            .device("web")
            .resume(Some(old_seq))
            .epoch(Some(old_epoch.clone()))
            .connect(),
    )
    .await
    .unwrap();
    let (resume, gap) = crate::support::welcome(&mut events).await;
    assert!(gap, "ws welcome says gap (resume {resume})");
    let got: Vec<u64> = messages(&mut events, 2)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(got, new_seqs);

    // SSE: a browser's automatic reconnect carries `<epoch>:<seq>`.
    let last = format!("Last-Event-ID: {old_epoch}:{old_seq}");
    let out = curl(&[
        "-N",
        "--max-time",
        "2",
        "-H",
        &auth("bob"),
        "-H",
        &last,
        &url(&gw, "/v1/events?device=browser"),
    ])
    .await;
    assert!(out.body.contains("\"gap\":true"), "{}", out.body);
    for seq in &new_seqs {
        assert!(out.body.contains(&format!(":{seq}\n")), "{}", out.body);
    }

    // Long poll naming the old epoch: answered at once with the gap.
    let r = curl(&[
        "-H",
        &auth("bob"),
        &url(
            &gw,
            &format!("/v1/messages?device=lp&after={old_seq}&epoch={old_epoch}&wait=10"),
        ),
    ])
    .await
    .json();
    assert_eq!(r["gap"], json!(true), "{r}");
    let got: Vec<u64> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, new_seqs);
}

/// A data directory that cannot be opened ends the start with an error naming it: a path
/// under a regular file, one held by another running gateway, and a damaged store.
#[tokio::test]
async fn a_data_directory_that_cannot_be_served_stops_the_start_naming_it() {
    let run = |dir: String| async move {
        within(
            Duration::from_secs(30),
            "a refused gateway to exit",
            tokio::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
                .args(["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
                .args(["--data-dir", &dir])
                .env("RUST_LOG", "error")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
    };
    let refused = |out: &std::process::Output, dir: &str, what: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "never serves"
        );
        assert!(stderr.contains(dir), "names {dir}: {stderr}");
        assert!(stderr.contains(what), "says {what:?}: {stderr}");
    };

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("data").display().to_string();
    refused(&run(under_file.clone()).await, &under_file, "cannot open");

    let held = tmp.path().join("held");
    let ports = fixed_ports();
    let _running = on_dir(&held, &ports, &[]).await;
    let held_s = held.display().to_string();
    refused(
        &run(held_s.clone()).await,
        &held_s,
        "in use by another running gateway",
    );
    drop(_running);

    let damaged = tmp.path().join("damaged");
    let mut gw = on_dir(&damaged, &fixed_ports(), &[]).await;
    gw.signal("TERM").unwrap();
    gw.wait(WAIT).await.unwrap();
    std::fs::write(damaged.join("version"), b"garbage").unwrap();
    let damaged_s = damaged.display().to_string();
    refused(&run(damaged_s.clone()).await, &damaged_s, "damaged");
}

both_modes! {
/// History pages are newest first, `next` chains to the oldest retained message, and
/// reading history moves no cursor.
async fn history_pages_newest_first_down_to_the_oldest_without_moving_the_cursor(env) {
    let gw = env.gateway(&[]).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    for i in 0..120 {
        alice.send_to("bob", json!({ "i": i })).await.unwrap();
    }
    let cursor = || async {
        curl(&["-H", &auth("bob"), &url(&gw, "/v1/messages?device=web&limit=1")])
            .await
            .json()["cursor"]
            .clone()
    };
    let before_history = cursor().await;
    let mut pages = Vec::new();
    let mut before = String::new();
    loop {
        let page = curl(&[
            "-H",
            &auth("bob"),
            &url(&gw, &format!("/v1/messages?before={before}&limit=50")),
        ])
        .await
        .json();
        assert!(page["epoch"].as_str().is_some(), "{page}");
        let is: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"]["i"].as_u64().unwrap())
            .collect();
        pages.push(is);
        match page.get("next") {
            Some(next) => before = next.to_string(),
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [50, 50, 20]);
    let all: Vec<u64> = pages.concat();
    assert_eq!(all, (0..120).rev().collect::<Vec<u64>>(), "newest first, each once");
    assert_eq!(cursor().await, before_history, "history moved no cursor");
}
}

/// Cluster mode: the stream deleted and created again while gateways run is a new epoch.
/// A device resuming with the old epoch and seq, or with no epoch and a seq above the new
/// stream's, gets `gap: true` and every message stored since.
#[tokio::test]
async fn a_recreated_stream_is_a_new_epoch_reported_as_a_gap() {
    let env = crate::support::Env::new(crate::support::Mode::Cluster).await;
    let gws = env.gateways(2, &[]).await;
    let (alice, _a) = crate::support::connect(&gws[0], "alice", "laptop", Via::Tcp).await;
    for i in 0..10 {
        alice.send_to("bob", json!({ "old": i })).await.unwrap();
    }
    let old = inbox(&gws[1], "bob").await;
    let old_seq = old.last().unwrap()["seq"].as_u64().unwrap();
    let epoch_of = |gw: &Gateway| {
        let u = url(gw, "/v1/messages?device=probe&limit=1");
        async move {
            curl(&["-H", &auth("bob"), &u]).await.json()["epoch"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let old_epoch = epoch_of(&gws[1]).await;

    let nats_url = env.nats.as_ref().unwrap().url();
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await.unwrap());
    js.delete_stream("IMGATE").await.unwrap();
    // A gateway starting now creates the stream again, as a deployment's next start would.
    let third = env.gateway(&[]).await;
    within(
        Duration::from_secs(30),
        "both gateways to follow the new stream",
        async {
            for gw in &gws {
                while epoch_of(gw).await == old_epoch {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        },
    )
    .await;
    let new_epoch = epoch_of(&third).await;
    for gw in &gws {
        assert_eq!(
            epoch_of(gw).await,
            new_epoch,
            "one epoch across the cluster"
        );
    }
    let new_seqs: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..2 {
            let sent = within(WAIT, "a send to the new stream", async {
                loop {
                    match alice.send_to("bob", json!({ "new": i })).await {
                        Ok(s) => return s,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            })
            .await;
            v.push(sent.seq);
        }
        inbox(&gws[1], "bob")
            .await
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(new_seqs.len(), 2, "{new_seqs:?}");
    assert!(new_seqs[1] < old_seq);

    for (device, epoch) in [("phone", Some(old_epoch.as_str())), ("phone2", None)] {
        let mut raw = RawTcp::connect(&gws[1]).await;
        let mut login =
            json!({"type":"login","token":token("bob"),"device":device,"resume":old_seq});
        if let Some(e) = epoch {
            login["epoch"] = e.into();
        }
        raw.send(login).await;
        let w = raw.recv_type("welcome").await;
        assert_eq!(w["gap"], json!(true), "{device}: {w}");
        assert_eq!(w["epoch"], json!(new_epoch));
        for seq in &new_seqs {
            assert_eq!(
                raw.recv_type("msg").await["seq"].as_u64(),
                Some(*seq),
                "{device}"
            );
        }
    }
}

/// A tmpfs of its own, unmounted when dropped (the test runs as root, as `tests/run` does).
#[cfg(feature = "external")]
struct SmallDisk {
    dir: tempfile::TempDir,
}

#[cfg(feature = "external")]
impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            ok.success(),
            "mounting a tmpfs needs root (tests/run runs as root)"
        );
        SmallDisk { dir }
    }

    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

#[cfg(feature = "external")]
impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk: sends are answered `unavailable` and `/readyz` fails while it lasts; once
/// the filesystem has room again the store writes by itself, without a restart, the refused
/// send goes through when retried with its id, and every send answered `sent` is in the
/// inbox exactly once.
#[cfg(feature = "external")]
#[tokio::test]
async fn a_full_disk_fails_readiness_and_the_store_writes_again_once_there_is_room() {
    let disk = SmallDisk::mount("2m");
    let data = disk.dir.path().join("data");
    let gw = on_dir(&data, &fixed_ports(), &[]).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    let ready = |gw: &Gateway| {
        let u = url(gw, "/readyz");
        async move { curl(&[&u]).await.status }
    };
    assert_eq!(ready(&gw).await, 200);
    let send = |i: usize| imgate_proto::Send {
        id: Some(format!("m{i}")),
        to: Some("bob".into()),
        group: None,
        body: json!({ "i": i, "pad": "x".repeat(2000) }),
    };
    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..5_000 {
        match alice.send(send(i)).await {
            Ok(s) => answered.push((i, s.seq)),
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    imgate_client::ErrorKind::Server(imgate_proto::ErrorCode::Unavailable),
                    "{e}"
                );
                refused = Some(i);
                break;
            }
        }
    }
    let refused = refused.expect("a 2 MB disk fills up");
    assert!(!answered.is_empty());
    // Not ready for as long as the disk is full (the store tries about once a second).
    for _ in 0..15 {
        assert_eq!(
            ready(&gw).await,
            503,
            "not ready while the store cannot write"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    disk.grow("64m");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ready(&gw).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "ready again within 20 s of the disk growing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retried = alice
        .send(send(refused))
        .await
        .expect("the retry is stored");
    answered.push((refused, retried.seq));
    for i in refused + 1..refused + 5 {
        let s = alice.send(send(i)).await.expect("stored");
        answered.push((i, s.seq));
    }
    let stored = inbox(&gw, "bob").await;
    let ids: Vec<String> = stored
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no message stored twice");
    // `sent` carries the seq of the sender's own copy.
    let own = inbox(&gw, "alice").await;
    for (i, seq) in &answered {
        let id = format!("m{i}");
        assert!(ids.contains(&id), "{id}, answered sent, is in bob's inbox");
        let m = own
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is in alice's inbox"));
        assert_eq!(m["seq"].as_u64(), Some(*seq), "{id}");
    }
    assert_eq!(
        ids.len(),
        answered.len(),
        "bob holds what was answered, nothing else"
    );
}

/// A journal cut in half while the gateway is stopped: the next start is refused, naming
/// the damage and `--repair`; `--repair` serves what is left under a new epoch, a device
/// resuming from the old epoch is told of the gap, and the next seq is above every one the
/// old store made known.
#[tokio::test]
async fn a_cut_journal_stops_the_start_and_repair_serves_the_rest_under_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let mut gw = on_dir(dir.path(), &ports, &[]).await;
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    let mut last = 0;
    for i in 0..300 {
        last = alice
            .send_to("bob", json!({ "i": i, "pad": "x".repeat(100) }))
            .await
            .unwrap()
            .seq;
    }
    let old_epoch = curl(&["-H", &auth("bob"), &url(&gw, "/v1/messages?device=x")])
        .await
        .json()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // bob's tablet polled up to seq 10: its cursor is stored.
    let tab = curl(&[
        "-H",
        &auth("bob"),
        &url(&gw, "/v1/messages?device=tab&after=10"),
    ])
    .await;
    assert_eq!(tab.status, 200);
    drop(alice);
    gw.signal("TERM").unwrap();
    gw.wait(WAIT).await.unwrap();

    let jnl = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jnl"))
        .expect("a journal");
    let bytes = std::fs::read(&jnl).unwrap();
    let written = bytes.iter().rposition(|b| *b != 0).unwrap() as u64 + 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&jnl)
        .unwrap()
        .set_len(written / 2)
        .unwrap();

    let stderr = crate::support::serve_refused(&["--data-dir", dir.path().to_str().unwrap()]).await;
    assert!(stderr.contains("lost acknowledged messages"), "{stderr}");
    assert!(
        stderr.contains(&format!("seqs up to {last} were made known")),
        "{stderr}"
    );
    assert!(stderr.contains("--repair"), "{stderr}");

    let gw = on_dir(dir.path(), &ports, &["--repair"]).await;
    let mut raw = RawTcp::connect(&gw).await;
    raw.send(json!({"type":"login","token":token("bob"),"device":"phone",
        "resume": last, "epoch": old_epoch}))
        .await;
    let w = raw.recv_type("welcome").await;
    assert_eq!(w["gap"], json!(true), "{w}");
    assert_ne!(w["epoch"].as_str().unwrap(), old_epoch);
    // The tablet resumes from its stored cursor, naming no epoch: told of the gap too.
    let tab = curl(&["-H", &auth("bob"), &url(&gw, "/v1/messages?device=tab")])
        .await
        .json();
    assert_eq!(tab["gap"], json!(true), "{tab}");
    let kept = inbox(&gw, "bob").await.len();
    assert!(kept > 0 && kept < 300, "what is left is served: {kept}");
    let (alice, _a) = crate::support::connect(&gw, "alice", "laptop", Via::Tcp).await;
    let next = alice
        .send_to("bob", json!({"after": "repair"}))
        .await
        .unwrap();
    assert!(next.seq > last, "seq {} is above {last}", next.seq);
}
