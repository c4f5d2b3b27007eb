//! Forming the ring: each rank publishes where it listens, connects to the next rank, accepts
//! the previous one, and both sides prove they hold the job token without sending it (HMAC over
//! nonces, `auth`). Same-node links then move to shared
//! memory when asked.

use super::link::{connect_until, Endpoint, Link, Listener};
use super::{CommError, RingOptions};
use crate::rendezvous::Store;
use crate::wire::*;
use std::io;
use std::time::{Duration, Instant};

const HELLO_MAGIC: u64 = 0x5254_5249_4e47_3032; // "RTRING02"

/// Joins the ring of `world` > 1 ranks; returns the links to the next rank and from the previous.
pub(super) fn join(store: &dyn Store, rank: usize, world: usize, opts: &RingOptions) -> Result<(Link, Link), CommError> {
    let setup = |detail: String| CommError::Setup { rank, detail };
    let store_err = |source| CommError::Store { rank, source };
    let next = (rank + 1) % world;
    let prev = (rank + world - 1) % world;
    let deadline = Instant::now() + opts.timeout;

    let node = opts.node_id.clone().unwrap_or_else(|| format!("tcp-only-{rank}"));
    // Abstract socket names are per network namespace, as nodes are; pid and token keep
    // concurrent jobs and restarts apart.
    let unix_name =
        opts.node_id.as_ref().map(|_| format!("ringtrain-{}{}-{rank}-{}", token_tag(&opts.token), opts.label, std::process::id()));
    let listener = Listener::bind(opts.bind_ip, &node, unix_name).map_err(|e| setup(format!("cannot listen on {}: {e}", opts.bind_ip)))?;
    store.set(&format!("ring/addr/{rank}"), listener.endpoint.encode().as_bytes()).map_err(store_err)?;
    // Every rank waits for every address, so a rank that never started is named by all the
    // others (not only by its neighbour, while the rest time out on a connection).
    let keys: Vec<String> = (0..world).map(|r| format!("ring/addr/{r}")).collect();
    match store.wait(&keys, opts.timeout) {
        Ok(()) => {}
        Err(crate::rendezvous::StoreError::Timeout { keys: missing, secs }) => {
            let ranks: Vec<usize> = missing.iter().filter_map(|k| k.rsplit('/').next()?.parse().ok()).collect();
            return Err(setup(format!(
                "rank(s) {ranks:?} of {world} did not join within {secs:.0}s (are they started, with the same \
                 MASTER_ADDR/MASTER_PORT and job?)"
            )));
        }
        Err(e) => return Err(store_err(e)),
    }
    let next_raw = store.get(&format!("ring/addr/{next}"), opts.timeout).map_err(store_err)?;
    let next_ep = Endpoint::decode(&String::from_utf8_lossy(&next_raw))
        .ok_or_else(|| setup(format!("rank {next} published a bad address: {:?}", String::from_utf8_lossy(&next_raw))))?;

    // Connect and say hello first, accept second, read the ack last: waiting for our ack
    // before accepting would deadlock the whole ring.
    let mut to_next = connect_until(&next_ep, &node, deadline)
        .map_err(|e| setup(format!("cannot connect to rank {next} at {}: {e}", next_ep.encode())))?;
    to_next.configure(opts.timeout).map_err(|e| setup(e.to_string()))?;
    // The hello proves we hold the job token without sending it: HMAC over our nonce, rank and
    // world size (auth). The accepting side answers with a proof over both nonces.
    let c = crate::auth::nonce().map_err(|e| setup(format!("nonce: {e}")))?;
    (|| {
        write_u64(&mut to_next, HELLO_MAGIC)?;
        write_blob(&mut to_next, &c)?;
        write_u64(&mut to_next, rank as u64)?;
        write_u64(&mut to_next, world as u64)?;
        write_blob(
            &mut to_next,
            &crate::auth::proof(&opts.token, b"ring-connect", &[&c, &(rank as u64).to_le_bytes(), &(world as u64).to_le_bytes()]),
        )
    })()
    .map_err(|e| setup(format!("hello to rank {next}: {e}")))?;

    let from_prev = accept_prev(&listener, rank, prev, world, &opts.token, deadline, opts.timeout)?;

    match read_u8(&mut to_next) {
        Ok(1) => {
            let answer = (|| -> io::Result<(Vec<u8>, Vec<u8>)> { Ok((read_blob(&mut to_next)?, read_blob(&mut to_next)?)) })();
            let (s, p) = answer.map_err(|e| setup(format!("ack from rank {next}: {e}")))?;
            if !crate::auth::verify(&opts.token, b"ring-accept", &[&c, &s], &p) {
                return Err(setup(format!("rank {next} at {} could not prove it holds the job token", next_ep.encode())));
            }
        }
        Ok(_) => return Err(setup(format!("rank {next} refused our connection"))),
        Err(e) if is_closed(&e) => {
            return Err(setup(format!("rank {next} at {} closed our connection (job token mismatch?)", next_ep.encode())))
        }
        Err(e) if is_timeout(&e) => {
            return Err(setup(format!("timed out after {:.0}s waiting for rank {next} to accept", opts.timeout.as_secs_f64())))
        }
        Err(e) => return Err(setup(format!("ack from rank {next}: {e}"))),
    }
    let (to_next, from_prev) = if opts.shm {
        // Hand over our sending segment first, then take the one from prev: neither blocks.
        let name = format!("ringtrain-{}{}-{rank}to{next}", token_tag(&opts.token), opts.label);
        let to_next = to_next.upgrade_to_shm(true, &name, opts.timeout).map_err(|e| setup(format!("shared memory to rank {next}: {e}")))?;
        let from_prev =
            from_prev.upgrade_to_shm(false, "", opts.timeout).map_err(|e| setup(format!("shared memory from rank {prev}: {e}")))?;
        (to_next, from_prev)
    } else {
        (to_next, from_prev)
    };
    tracing::debug!("ring: to rank {next} over {}, from rank {prev} over {}", to_next.kind(), from_prev.kind());
    Ok((to_next, from_prev))
}

/// Accepts connections until the previous rank presents the job token; strangers are logged and
/// dropped, not fatal.
fn accept_prev(
    listener: &Listener,
    rank: usize,
    prev: usize,
    world: usize,
    token: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Link, CommError> {
    let setup = |detail: String| CommError::Setup { rank, detail };
    loop {
        let Some((mut conn, from)) = listener.accept_until(deadline).map_err(|e| setup(format!("accept: {e}")))? else {
            return Err(setup(format!("timed out waiting for rank {prev} to connect")));
        };
        conn.configure(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))).map_err(|e| setup(e.to_string()))?;
        let hello = (|| -> io::Result<(u64, Vec<u8>, u64, u64, Vec<u8>)> {
            let magic = read_u64(&mut conn)?;
            if magic != HELLO_MAGIC {
                return Ok((magic, vec![], 0, 0, vec![]));
            }
            Ok((magic, read_blob(&mut conn)?, read_u64(&mut conn)?, read_u64(&mut conn)?, read_blob(&mut conn)?))
        })();
        let (magic, c, their_rank, their_world, presented) = match hello {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("ring: dropped a connection from {from} that sent no valid hello: {e}");
                continue;
            }
        };
        let expected = [c.as_slice(), &their_rank.to_le_bytes(), &their_world.to_le_bytes()];
        if magic != HELLO_MAGIC || !crate::auth::verify(token, b"ring-connect", &expected, &presented) {
            tracing::warn!("ring: refused a connection from {from}: no proof of the job token");
            continue;
        }
        if their_world as usize != world {
            return Err(setup(format!("rank {their_rank} at {from} has world size {their_world}, this rank {world}")));
        }
        if their_rank as usize != prev {
            return Err(setup(format!("expected rank {prev} to connect, rank {their_rank} did (from {from})")));
        }
        let s = crate::auth::nonce().map_err(|e| setup(format!("nonce: {e}")))?;
        (|| {
            write_u8(&mut conn, 1)?;
            write_blob(&mut conn, &s)?;
            write_blob(&mut conn, &crate::auth::proof(token, b"ring-accept", &[&c, &s]))
        })()
        .map_err(|e| setup(format!("ack to rank {prev}: {e}")))?;
        conn.configure(timeout).map_err(|e| setup(e.to_string()))?;
        return Ok(conn);
    }
}

/// A short tag for names others can see (Unix socket and memfd names): a hash of the job token,
/// so any token works (a byte slice of a non-ASCII token would split a character) and the token
/// itself is not shown in /proc.
pub(super) fn token_tag(token: &str) -> String {
    format!("{:016x}", crate::wire::fnv1a(crate::wire::FNV_OFFSET, token.as_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_token_gives_a_tag() {
        for t in ["", "abc", "abcdefghiééééééééééé", "ジョブ"] {
            let tag = super::token_tag(t);
            assert_eq!(tag.len(), 16);
            assert!(tag.chars().all(|c| c.is_ascii_hexdigit()));
        }
        assert_ne!(super::token_tag("a"), super::token_tag("b"));
    }
}
