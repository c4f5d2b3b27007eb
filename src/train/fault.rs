//! Test-only fault injection, so tests can make a real worker fail at a chosen point:
//! `RINGTRAIN_FAULT="rank=1,step=5,action=exit:3"` (or `action=hang`, `action=abort`, `action=kill`,
//! `action=panic`: a libtorch error inside a panicking tch call, as CUDA running out of memory is).
//! The step is the global step about to run (0-based).

use std::time::Duration;

/// Test aid: `RINGTRAIN_TEST_STEP_MS=N` makes every step N ms longer (a sleep), so a test can act
/// on a run while it trains (nodes joining or leaving it) whatever the machine's speed.
pub fn test_step_pause() -> Option<Duration> {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| std::env::var("RINGTRAIN_TEST_STEP_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis))
}

#[derive(Clone, Debug, PartialEq)]
pub enum FaultAction {
    Exit(i32),
    Hang,
    Abort,
    /// SIGKILL to itself: as `kill -9` from outside, no cleanup at all.
    Kill,
    /// A panic worded as tch's for a libtorch error.
    Panic,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub rank: usize,
    pub step: u64,
    pub action: FaultAction,
}

impl Fault {
    pub fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var("RINGTRAIN_FAULT") {
            Ok(s) if !s.is_empty() => Fault::parse(&s).map(Some),
            _ => Ok(None),
        }
    }

    pub fn parse(s: &str) -> Result<Fault, String> {
        let err = |m: &str| format!("RINGTRAIN_FAULT={s:?}: {m} (expected rank=R,step=S,action=exit:C|hang|abort|kill|panic)");
        let (mut rank, mut step, mut action) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| err("missing '='"))?;
            match k.trim() {
                "rank" => rank = Some(v.parse().map_err(|_| err("bad rank"))?),
                "step" => step = Some(v.parse().map_err(|_| err("bad step"))?),
                "action" => {
                    action = Some(match v {
                        "hang" => FaultAction::Hang,
                        "abort" => FaultAction::Abort,
                        "kill" => FaultAction::Kill,
                        "panic" => FaultAction::Panic,
                        _ => match v.strip_prefix("exit:") {
                            Some(c) => FaultAction::Exit(c.parse().map_err(|_| err("bad exit code"))?),
                            None => return Err(err("unknown action")),
                        },
                    })
                }
                _ => return Err(err("unknown key")),
            }
        }
        Ok(Fault {
            rank: rank.ok_or_else(|| err("rank missing"))?,
            step: step.ok_or_else(|| err("step missing"))?,
            action: action.ok_or_else(|| err("action missing"))?,
        })
    }

    /// Fires if this is the chosen rank and step.
    pub fn check(&self, rank: usize, step: u64) {
        if rank != self.rank || step != self.step {
            return;
        }
        tracing::warn!("fault injection: {:?} at step {step}", self.action);
        match self.action {
            FaultAction::Exit(code) => std::process::exit(code),
            FaultAction::Abort => std::process::abort(),
            // The shape of a tch panic: its Torch error's text, C++ backtrace lines after the first.
            FaultAction::Panic => panic!(
                "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB\\nException raised from malloc at CUDACachingAllocator.cpp (most recent call first):\")\nframe #0: c10::Error::Error"
            ),
            FaultAction::Kill => {
                // SAFETY: signalling our own pid.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL cannot be caught");
            }
            FaultAction::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(Fault::parse("rank=1,step=5,action=exit:3").unwrap(), Fault { rank: 1, step: 5, action: FaultAction::Exit(3) });
        assert_eq!(Fault::parse("action=hang,step=0,rank=0").unwrap().action, FaultAction::Hang);
        for bad in ["rank=1", "rank=x,step=1,action=hang", "rank=1,step=1,action=explode", "junk"] {
            assert!(Fault::parse(bad).is_err(), "{bad}");
        }
    }
}
