//! Elastic membership (`ringrun --nnodes MIN:MAX`): which nodes form each generation of a job.
//!
//! The node whose address is the master address serves the store, and is node 0 of every
//! generation: rank 0, whose checkpoints every other rank resumes from, stays there. Other nodes
//! arrive per generation by adding to a counter, so node ranks are dense and follow arrival
//! order. Node 0 closes a generation when MAX nodes are in, or when at least MIN are and the
//! settle time has passed since MIN was reached (torchrun's last call). A node that arrives after
//! the close waits; node 0 then has every node stop its workers at a checkpoint and re-forms the
//! job with it (torchrun restarts at once and loses the steps since the last checkpoint).
//! Members heartbeat through the store; node 0 counts a member whose heartbeat stops for the node
//! timeout as lost.
//!
//! Keys: `nodes/base` (the first generation: restarts count from it), `nodes/current`,
//! `nodes/gen<G>/open`, `nodes/gen<G>/arrivals` (a counter), `nodes/gen<G>/arrival/<i>` (who),
//! `nodes/gen<G>/closed` (the members), `nodes/gen<G>/hb/<node>`, `nodes/gen<G>/reform`,
//! `nodes/finished`.

use super::nodes::{key, store_lost, Remote, RemoteFailure, RemoteKind};
use crate::rendezvous::{Store, StoreError, TcpStore};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ElasticOptions {
    pub min: usize,
    pub max: usize,
    /// After MIN nodes are in, how long more may still join before the generation closes.
    pub settle: Duration,
    /// A member whose heartbeat stops this long is lost.
    pub node_timeout: Duration,
    /// Whether this node serves the store; `None`: the node whose address the master address is.
    pub host: Option<bool>,
}

/// One generation's members: `ids[k]` is node k.
#[derive(Clone, Debug, PartialEq)]
pub struct Members {
    pub gen: u32,
    pub ids: Vec<String>,
    /// Who joined and who left since the generation before, as people read it ("" at the start).
    pub news: String,
}

impl Members {
    fn encode(&self) -> String {
        format!("{}\n{}\n{}", self.ids.len(), self.news, self.ids.join("\n"))
    }

    fn decode(gen: u32, v: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(v);
        let mut lines = text.split('\n');
        let n: usize = lines.next().and_then(|l| l.parse().ok()).ok_or_else(|| format!("generation {gen}: bad member list {text:?}"))?;
        let news = lines.next().unwrap_or_default().to_string();
        let ids: Vec<String> = lines.map(String::from).collect();
        if ids.len() != n {
            return Err(format!("generation {gen}: member list names {} of {n} nodes", ids.len()));
        }
        Ok(Self { gen, ids, news })
    }
}

fn err(e: StoreError) -> String {
    store_lost(&e)
}

/// "joined: a, b; left: c" between two member lists (node 0 is in both).
fn news(previous: &[String], now: &[String]) -> String {
    if previous.is_empty() {
        return String::new();
    }
    let joined: Vec<&str> = now.iter().filter(|i| !previous.contains(i)).map(String::as_str).collect();
    let left: Vec<&str> = previous.iter().filter(|i| !now.contains(i)).map(String::as_str).collect();
    let part = |what: &str, l: &[&str]| if l.is_empty() { None } else { Some(format!("{what}: {}", l.join(", "))) };
    [part("left", &left), part("joined", &joined)].into_iter().flatten().collect::<Vec<_>>().join("; ")
}

/// Node 0: opens generation `gen`, admits the nodes that arrive, closes it.
pub fn host_round(
    store: &TcpStore,
    gen: u32,
    o: &ElasticOptions,
    me: &str,
    previous: &[String],
    timeout: Duration,
) -> Result<Members, String> {
    store.set(&key(gen, "open"), b"1").map_err(err)?;
    store.set("nodes/current", gen.to_string().as_bytes()).map_err(err)?;
    let start = Instant::now();
    let mut enough_since: Option<Instant> = None;
    let n = loop {
        let n = 1 + store.add(&key(gen, "arrivals"), 0).map_err(err)? as usize;
        if n >= o.max {
            break o.max;
        }
        if n >= o.min {
            if enough_since.get_or_insert_with(Instant::now).elapsed() >= o.settle {
                break n;
            }
        } else if start.elapsed() >= timeout {
            return Err(format!(
                "only {n} node(s) of at least {} joined generation {gen} within {:.0}s (is ringrun running on the others, with the \
                 same --master-addr/--master-port?)",
                o.min,
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut ids = vec![me.to_string()];
    for i in 1..n {
        // Each node names itself right after taking its number.
        let id = store.get(&key(gen, &format!("arrival/{i}")), Duration::from_secs(30)).map_err(err)?;
        ids.push(String::from_utf8_lossy(&id).into_owned());
    }
    let m = Members { gen, news: news(previous, &ids), ids };
    store.set(&key(gen, "closed"), m.encode().as_bytes()).map_err(err)?;
    Ok(m)
}

/// Any other node: arrives at the newest generation (at least `gen`) and waits to be admitted.
/// `None` when the job finished while this node waited.
pub fn join_round(store: &TcpStore, gen: u32, me: &str, timeout: Duration) -> Result<Option<(usize, Members)>, String> {
    let current = store.get("nodes/current", timeout).map_err(|e| match e {
        StoreError::Timeout { .. } => format!("node 0 opened no generation within {:.0}s", timeout.as_secs_f64()),
        e => err(e),
    })?;
    let mut gen = gen.max(String::from_utf8_lossy(&current).parse().unwrap_or(0));
    loop {
        let i = store.add(&key(gen, "arrivals"), 1).map_err(err)? as usize;
        store.set(&key(gen, &format!("arrival/{i}")), me.as_bytes()).map_err(err)?;
        let closed = store.get(&key(gen, "closed"), timeout).map_err(|e| match e {
            StoreError::Timeout { .. } => {
                format!(
                    "node 0 did not close generation {gen} within {:.0}s (fewer than the minimum of nodes came?)",
                    timeout.as_secs_f64()
                )
            }
            e => err(e),
        })?;
        let m = Members::decode(gen, &closed)?;
        if i < m.ids.len() {
            return Ok(Some((i, m)));
        }
        super::status::message(&format!(
            "ringrun: generation {gen} runs with {} node(s); this node waits to join the next (node 0 re-forms the job at a checkpoint \
             when restarts and room remain)",
            m.ids.len()
        ));
        // Wait for the next generation, or the job's end; a lost store ends the wait.
        loop {
            if store.get("nodes/finished", Duration::from_millis(1)).is_ok() {
                return Ok(None);
            }
            match store.get(&key(gen + 1, "open"), Duration::from_millis(500)) {
                Ok(_) => break,
                Err(StoreError::Timeout { .. }) => {}
                Err(e) => return Err(err(e)),
            }
        }
        gen += 1;
    }
}

/// Watches generation `m.gen` on a connection of its own: heartbeats for node `node_rank`; on
/// node 0 also checks the others' heartbeats and, when `admit` and nodes wait to join, asks every
/// node to stop at a checkpoint so the job re-forms with them.
pub fn watch(addr: &str, token: &str, node_rank: usize, m: &Members, o: &ElasticOptions, admit: bool) -> RemoteFailure {
    let flag = RemoteFailure::default();
    let out = flag.clone();
    let (addr, token, m, o) = (addr.to_string(), token.to_string(), m.clone(), o.clone());
    std::thread::spawn(move || {
        let store = match TcpStore::connect(&addr, &token, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => return flag.set(Remote { reason: store_lost(&e), kind: RemoteKind::StoreLost }),
        };
        let gen = m.gen;
        let n = m.ids.len();
        let mut last_beat = Instant::now() - Duration::from_secs(1);
        // Node 0: each member's last heartbeat count, and when it last changed.
        let mut beats: Vec<(i64, Instant)> = vec![(-1, Instant::now()); n];
        let mut asked_reform = false;
        let result = (|| -> Result<Option<Remote>, StoreError> {
            while !flag.stopped() {
                if last_beat.elapsed() >= Duration::from_secs(1) {
                    last_beat = Instant::now();
                    store.add(&key(gen, &format!("hb/{node_rank}")), 1)?;
                    if node_rank == 0 {
                        for (k, (count, since)) in beats.iter_mut().enumerate().skip(1) {
                            let now = store.add(&key(gen, &format!("hb/{k}")), 0)?;
                            if now != *count {
                                *count = now;
                                *since = Instant::now();
                            } else if since.elapsed() >= o.node_timeout {
                                let reason = format!(
                                    "node {k} ({}) sent no heartbeat for {:.0}s (--node-timeout-secs): counted as lost",
                                    m.ids[k],
                                    o.node_timeout.as_secs_f64()
                                );
                                store.set(&key(gen, "failed"), reason.as_bytes())?;
                                return Ok(Some(Remote { reason, kind: RemoteKind::Failed }));
                            }
                        }
                        let arrived = 1 + store.add(&key(gen, "arrivals"), 0)? as usize;
                        if admit && !asked_reform && arrived > n && n < o.max {
                            let mut waiting = Vec::new();
                            for i in n..arrived {
                                if let Ok(id) = store.get(&key(gen, &format!("arrival/{i}")), Duration::from_secs(1)) {
                                    waiting.push(String::from_utf8_lossy(&id).into_owned());
                                }
                            }
                            asked_reform = true;
                            store.set(&key(gen, "reform"), format!("{} waiting to join", waiting.join(", ")).as_bytes())?;
                        }
                    }
                }
                match store.get(&key(gen, "failed"), Duration::from_millis(200)) {
                    Ok(v) => return Ok(Some(Remote { reason: String::from_utf8_lossy(&v).into_owned(), kind: RemoteKind::Failed })),
                    Err(StoreError::Timeout { .. }) => {}
                    Err(e) => return Err(e),
                }
                match store.get(&key(gen, "reform"), Duration::from_millis(1)) {
                    Ok(v) => return Ok(Some(Remote { reason: String::from_utf8_lossy(&v).into_owned(), kind: RemoteKind::Reform })),
                    Err(StoreError::Timeout { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(None)
        })();
        match result {
            Ok(Some(r)) => flag.set(r),
            Ok(None) => {}
            Err(e) if !flag.stopped() => flag.set(Remote { reason: store_lost(&e), kind: RemoteKind::StoreLost }),
            Err(_) => {}
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_names_who_left_and_who_joined() {
        let ids = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(news(&[], &ids(&["a", "b"])), "");
        assert_eq!(news(&ids(&["a", "b", "c"]), &ids(&["a", "c"])), "left: b");
        assert_eq!(news(&ids(&["a", "b"]), &ids(&["a", "b", "d"])), "joined: d");
        assert_eq!(news(&ids(&["a", "b"]), &ids(&["a", "d"])), "left: b; joined: d");
    }

    #[test]
    fn member_lists_round_trip_and_bad_ones_are_refused() {
        let m = Members { gen: 3, ids: vec!["10.0.0.1 (pid 5)".into(), "10.0.0.2 (pid 7)".into()], news: "joined: x".into() };
        assert_eq!(Members::decode(3, m.encode().as_bytes()).unwrap(), m);
        assert!(Members::decode(3, b"3\n\na\nb").unwrap_err().contains("names 2 of 3"));
    }
}
