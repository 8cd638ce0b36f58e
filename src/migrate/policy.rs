//! When to stop the pre-copy rounds.
//!
//! Each pre-dump round sends the pages dirtied since the round before (the first: all of
//! them) while the container runs. The final dump — the freeze — then carries what was
//! dirtied during the last round. More rounds help only while each one gets smaller, which
//! depends on two rates ferry measures as it goes: how fast the link carries pages (bytes of
//! a round over the time CRIU spent writing them) and how fast the workload dirties them
//! (pages of round k over the time since round k-1 started). From those it predicts the
//! freeze of stopping now and decides after every round:
//!
//! 1. `--max-rounds` reached → stop;
//! 2. the predicted freeze fits `--target-downtime-ms` → stop (after round 1, when even the
//!    whole memory fits);
//! 3. another round would not shrink the freeze by at least [`MIN_SHRINK`] (the workload
//!    dirties about as fast as the link carries, or faster) → stop now instead of looping
//!    to the cap;
//! 4. otherwise → another round.
//!
//! Whatever the rule (these and the anchors' below), a round is started only if the
//! destination's work dir keeps room for it and for a final dump of the whole working set
//! after it (see [`Policy::room_check`]): rounds write their pages there as well, and a final
//! dump that runs out of room fails with the container frozen. (A lazy final dump, hybrid's,
//! writes no pages there: only the round must fit.)
//!
//! The anchors' fixed rules are here too, for the benchmark to compare against: P.Haul's
//! (stop at ≤ 64 pages, at > 10 % growth over the previous round, or after 9 rounds) and
//! go-criu phaul's as used in practice (one round).

use serde::Serialize;

use crate::runtime::memroom::size;

/// Page size the predictions use (CRIU's pages on x86-64).
pub const PAGE: u64 = 4096;
/// A round must be predicted to cut the freeze to this fraction or less to be worth it.
pub const MIN_SHRINK: f64 = 0.8;
/// What the room rule keeps over its estimates of the pages still to come (the images
/// besides the pages, a round larger than predicted).
pub const ROOM_MARGIN: f64 = 1.25;

/// `pages` as a size in words ("64.0 MiB").
fn pages_size(pages: f64) -> String {
    size((pages * PAGE as f64) as u64)
}

/// What ferry measured of one pre-dump round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundFacts {
    pub pages_written: u64,
    /// Milliseconds CRIU spent writing the round's pages (its memwrite time).
    pub write_ms: f64,
    /// Wall milliseconds of the whole round (freeze, drain, write).
    pub wall_ms: f64,
    /// Milliseconds from the start of the previous round to the start of this one (0 for the
    /// first).
    pub since_previous_ms: f64,
    /// Bytes the destination's work dir can still take after this round, when it said.
    pub room_after: Option<u64>,
    /// Pages the container wrote since this round froze it (its soft-dirty bits, counted as
    /// the round ended), when they could be counted.
    pub dirty_now: Option<u64>,
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub stop: bool,
    /// Why, in words for the report.
    pub reason: String,
    /// The freeze predicted if the rounds stop now, when it could be predicted.
    pub predicted_freeze_ms: Option<f64>,
}

/// Which rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// ferry's: predicted freeze against the target, convergence, cap.
    Adaptive,
    /// P.Haul's fixed thresholds.
    PHaul,
    /// One round, then the final dump (go-criu phaul in practice).
    OneRound,
}

impl PolicyKind {
    pub fn parse(s: &str) -> Option<PolicyKind> {
        Some(match s {
            "adaptive" => PolicyKind::Adaptive,
            "p.haul" | "phaul-fixed" => PolicyKind::PHaul,
            "one-round" => PolicyKind::OneRound,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Adaptive => "adaptive",
            PolicyKind::PHaul => "p.haul",
            PolicyKind::OneRound => "one-round",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub kind: PolicyKind,
    pub max_rounds: u32,
    pub target_downtime_ms: u64,
    /// Whether the final dump writes its pages into the destination's work dir (all modes
    /// but hybrid, whose final dump is lazy).
    final_on_disk: bool,
    rounds: Vec<RoundFacts>,
}

/// Fixed per-freeze cost (freezing, parasite, non-page images) assumed before ferry has
/// measured any: the part of a round's wall time that is not page writing.
fn overhead_ms(rounds: &[RoundFacts]) -> f64 {
    rounds
        .iter()
        .map(|r| (r.wall_ms - r.write_ms).max(0.0))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.0, 1000.0)
}

impl Policy {
    pub fn new(kind: PolicyKind, max_rounds: u32, target_downtime_ms: u64) -> Policy {
        Policy {
            kind,
            max_rounds: max_rounds.max(1),
            target_downtime_ms,
            final_on_disk: true,
            rounds: Vec::new(),
        }
    }

    /// The final dump will be lazy: its pages go straight into the restored container.
    pub fn with_lazy_final(self) -> Policy {
        Policy {
            final_on_disk: false,
            ..self
        }
    }

    pub fn rounds(&self) -> &[RoundFacts] {
        &self.rounds
    }

    /// Link rate in pages per millisecond, from the largest round measured (small rounds
    /// are dominated by fixed costs and understate it).
    pub fn link_pages_per_ms(&self) -> Option<f64> {
        self.rounds
            .iter()
            .filter(|r| r.pages_written > 0)
            .max_by_key(|r| r.pages_written)
            .map(|r| r.pages_written as f64 / r.write_ms.max(0.5))
    }

    /// Workload dirty rate in pages per millisecond, from the latest round after the first.
    pub fn dirty_pages_per_ms(&self) -> Option<f64> {
        let last = self.rounds.last()?;
        if self.rounds.len() < 2 || last.since_previous_ms <= 0.0 {
            return None;
        }
        Some(last.pages_written as f64 / last.since_previous_ms)
    }

    /// Pages the next round would carry, which are also the pages the final dump would carry
    /// if the rounds stopped now: what the workload dirties during one round, never more than
    /// the first round wrote. Known from round 2 on.
    pub fn next_pages(&self) -> Option<f64> {
        let dirty = self.dirty_pages_per_ms()?;
        let last = self.rounds.last()?;
        let working_set = self.rounds[0].pages_written.max(1) as f64;
        Some((dirty * last.wall_ms.max(1.0)).min(working_set))
    }

    /// What the next round — or the final dump, if the rounds stop now — would carry, for the
    /// room rules: [`Policy::next_pages`], or after round 1 the pages written since it froze
    /// the container (about what the workload writes during one round).
    fn pages_to_come(&self) -> Option<f64> {
        self.next_pages()
            .or_else(|| Some(self.rounds.last()?.dirty_now? as f64))
    }

    /// Records a finished round and decides whether to stop.
    pub fn after_round(&mut self, facts: RoundFacts) -> Decision {
        self.rounds.push(facts);
        let d = self.by_kind();
        if d.stop {
            return d;
        }
        match self.room_check() {
            Some(reason) => Decision {
                stop: true,
                reason,
                ..d
            },
            None => d,
        }
    }

    /// Why another round must not start, when the destination's work dir would be left with
    /// too little room: it must take the next round (as predicted, or the whole working set
    /// when nothing predicts it) and after it a final dump of the whole working set
    /// (unless that is lazy), with [`ROOM_MARGIN`] over both.
    pub fn room_check(&self) -> Option<String> {
        let room = self.rounds.last()?.room_after?;
        let whole = self.rounds[0].pages_written as f64;
        let next = self.pages_to_come().unwrap_or(whole);
        let last = if self.final_on_disk { whole } else { 0.0 };
        let need = (next + last) * PAGE as f64 * ROOM_MARGIN;
        ((room as f64) < need).then(|| {
            let after = if self.final_on_disk {
                format!(
                    " and a final dump of the whole {} after it",
                    pages_size(whole)
                )
            } else {
                String::new()
            };
            format!(
                "the destination's work dir has room for {} more: not enough for another round \
                 (~{}){after}",
                size(room),
                pages_size(next),
            )
        })
    }

    /// When the final dump is predicted to write more than the destination's work dir can
    /// take after the last round: why the migration should not freeze the container.
    pub fn final_room_shortfall(&self) -> Option<String> {
        if !self.final_on_disk {
            return None;
        }
        let room = self.rounds.last()?.room_after?;
        let next = self.pages_to_come()?;
        ((room as f64) < next * PAGE as f64).then(|| {
            format!(
                "the final dump is predicted to write ~{} of pages into the destination's work \
                 dir, which has room for only {} after the pre-dump rounds",
                pages_size(next),
                size(room)
            )
        })
    }

    fn by_kind(&self) -> Decision {
        match self.kind {
            PolicyKind::Adaptive => self.adaptive(),
            PolicyKind::PHaul => self.phaul(),
            PolicyKind::OneRound => Decision {
                stop: true,
                reason: "one-round policy: a single pre-dump, then the final dump".into(),
                predicted_freeze_ms: None,
            },
        }
    }

    fn cap_reached(&self) -> Option<Decision> {
        (self.rounds.len() as u32 >= self.max_rounds).then(|| Decision {
            stop: true,
            reason: format!("reached --max-rounds {}", self.max_rounds),
            predicted_freeze_ms: None,
        })
    }

    fn adaptive(&self) -> Decision {
        let n = self.rounds.len();
        let last = self.rounds[n - 1];
        let target = self.target_downtime_ms as f64;
        let Some(link) = self.link_pages_per_ms() else {
            // Nothing was written: nothing is being dirtied either.
            return Decision {
                stop: true,
                reason: "the round wrote no pages".into(),
                predicted_freeze_ms: Some(overhead_ms(&self.rounds)),
            };
        };
        let overhead = overhead_ms(&self.rounds);
        let freeze_for = |pages: f64| overhead + pages / link;
        let (Some(dirty), Some(next_pages)) = (self.dirty_pages_per_ms(), self.next_pages()) else {
            // After the first round only the link is known. If even all of the memory fits
            // into the target, what is dirtied during one round surely does.
            let whole = freeze_for(last.pages_written as f64);
            if whole <= target {
                return Decision {
                    stop: true,
                    reason: format!(
                        "all {} pages would move within the target ({whole:.0} ms ≤ {target:.0} ms)",
                        last.pages_written
                    ),
                    predicted_freeze_ms: Some(whole),
                };
            }
            if let Some(d) = self.cap_reached() {
                return Decision {
                    predicted_freeze_ms: None,
                    ..d
                };
            }
            return Decision {
                stop: false,
                reason: "first round: measuring how fast the workload dirties memory".into(),
                predicted_freeze_ms: None,
            };
        };
        // The final dump would carry `next_pages` if the rounds stop now.
        let predicted = freeze_for(next_pages);
        if predicted <= target {
            return Decision {
                stop: true,
                reason: format!("predicted freeze {predicted:.0} ms ≤ target {target:.0} ms"),
                predicted_freeze_ms: Some(predicted),
            };
        }
        if let Some(d) = self.cap_reached() {
            return Decision {
                predicted_freeze_ms: Some(predicted),
                ..d
            };
        }
        let freeze_now = freeze_for(last.pages_written as f64);
        if predicted > freeze_now * MIN_SHRINK {
            let mib_s = |pages_per_ms: f64| pages_per_ms * PAGE as f64 * 1000.0 / (1 << 20) as f64;
            return Decision {
                stop: true,
                reason: format!(
                    "not converging: the workload dirties {:.1} MiB/s, the link carries {:.1} MiB/s; \
                     another round would leave ~{:.0} ms of freeze (now ~{:.0} ms)",
                    mib_s(dirty),
                    mib_s(link),
                    predicted,
                    freeze_now
                ),
                predicted_freeze_ms: Some(predicted),
            };
        }
        Decision {
            stop: false,
            reason: format!(
                "predicted freeze {predicted:.0} ms > target {target:.0} ms and still shrinking"
            ),
            predicted_freeze_ms: Some(predicted),
        }
    }

    fn phaul(&self) -> Decision {
        let n = self.rounds.len();
        let last = self.rounds[n - 1];
        let stop = |reason: String| Decision {
            stop: true,
            reason,
            predicted_freeze_ms: None,
        };
        if last.pages_written <= 64 {
            return stop(format!("p.haul rule: {} pages ≤ 64", last.pages_written));
        }
        if n >= 2 {
            let prev = self.rounds[n - 2].pages_written.max(1);
            if last.pages_written * 10 > prev * 11 {
                return stop(format!(
                    "p.haul rule: round grew more than 10 % ({} → {} pages)",
                    prev, last.pages_written
                ));
            }
        }
        if n as u32 >= self.max_rounds.min(9) {
            return stop(format!("p.haul rule: {} rounds", n));
        }
        Decision {
            stop: false,
            reason: "p.haul rule: keep going".into(),
            predicted_freeze_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 GiB/s-ish link: 256 pages per ms; 10 ms fixed cost.
    fn round(pages: u64, since: f64) -> RoundFacts {
        let write = pages as f64 / 256.0;
        RoundFacts {
            pages_written: pages,
            write_ms: write,
            wall_ms: write + 10.0,
            since_previous_ms: since,
            room_after: None,
            dirty_now: None,
        }
    }

    #[test]
    fn small_memory_stops_after_one_round() {
        let mut p = Policy::new(PolicyKind::Adaptive, 8, 300);
        let d = p.after_round(round(10_000, 0.0)); // ~49 ms for everything
        assert!(d.stop, "{d:?}");
        assert!(d.reason.contains("within the target"), "{}", d.reason);
    }

    #[test]
    fn converging_workload_runs_rounds_until_the_target() {
        let mut p = Policy::new(PolicyKind::Adaptive, 8, 50);
        // 256 MiB working set: ~266 ms per full round; dirties 20 pages/ms.
        let d1 = p.after_round(round(65_536, 0.0));
        assert!(!d1.stop, "{d1:?}");
        let d2 = p.after_round(round(5_300, 266.0));
        // dirty 5300/266 ≈ 20 pages/ms × 30.7 ms ≈ 613 pages → 12 ms + 10 ms fixed ≤ 50 ms.
        assert!(d2.stop, "{d2:?}");
        assert!(d2.reason.contains("predicted freeze"), "{}", d2.reason);
        let pf = d2.predicted_freeze_ms.unwrap();
        assert!(pf < 50.0, "{pf}");
    }

    #[test]
    fn dirtying_faster_than_the_link_stops_early() {
        let mut p = Policy::new(PolicyKind::Adaptive, 20, 10);
        // Link 256 pages/ms, workload dirties 400 pages/ms over a 65 536-page working set.
        let d1 = p.after_round(round(65_536, 0.0));
        assert!(!d1.stop);
        let d2 = p.after_round(round(65_536, 266.0));
        assert!(d2.stop, "{d2:?}");
        assert!(d2.reason.starts_with("not converging"), "{}", d2.reason);
        assert_eq!(p.rounds().len(), 2, "stopped long before the cap of 20");
    }

    #[test]
    fn the_cap_is_respected() {
        let mut p = Policy::new(PolicyKind::Adaptive, 2, 1);
        assert!(!p.after_round(round(65_536, 0.0)).stop);
        let d = p.after_round(round(20_000, 266.0));
        assert!(d.stop);
        assert!(d.reason.contains("--max-rounds 2"), "{}", d.reason);
        let mut one = Policy::new(PolicyKind::Adaptive, 1, 1);
        assert!(one.after_round(round(65_536, 0.0)).stop);
    }

    #[test]
    fn an_idle_workload_stops_at_once() {
        let mut p = Policy::new(PolicyKind::Adaptive, 8, 1);
        let d = p.after_round(RoundFacts {
            pages_written: 0,
            write_ms: 0.0,
            wall_ms: 5.0,
            since_previous_ms: 0.0,
            room_after: None,
            dirty_now: None,
        });
        assert!(d.stop);
    }

    fn with_room(mut r: RoundFacts, room: u64) -> RoundFacts {
        r.room_after = Some(room);
        r
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn rounds_stop_while_the_destination_keeps_room_for_a_whole_final_dump() {
        // 256 MiB working set; round 1 leaves 400 MiB: a second round of up to 256 MiB and a
        // final dump of 256 MiB after it need 640 MiB.
        let mut p = Policy::new(PolicyKind::Adaptive, 8, 1);
        let d = p.after_round(with_room(round(65_536, 0.0), 400 * MIB));
        assert!(d.stop, "{d:?}");
        assert!(
            d.reason
                .starts_with("the destination's work dir has room for 400.0 MiB more"),
            "{}",
            d.reason
        );
        assert!(
            d.reason.ends_with(
                "not enough for another round (~256.0 MiB) and a final dump of the whole 256.0 \
                 MiB after it"
            ),
            "{}",
            d.reason
        );
        // A lazy final dump (hybrid) needs no room there: only the round must fit.
        let mut l = Policy::new(PolicyKind::Adaptive, 8, 1).with_lazy_final();
        assert!(!l.after_round(with_room(round(65_536, 0.0), 400 * MIB)).stop);
        let d = l.after_round(with_room(round(40_000, 266.0), 100 * MIB));
        assert!(
            d.stop && d.reason.ends_with("another round (~97.7 MiB)"),
            "{d:?}"
        );
        assert_eq!(l.final_room_shortfall(), None);
        // With 700 MiB left the rounds go on as without the rule.
        let mut q = Policy::new(PolicyKind::Adaptive, 8, 1);
        assert!(!q.after_round(with_room(round(65_536, 0.0), 700 * MIB)).stop);
        // Round 2 (40 000 pages since round 1 began 266 ms before: ~150 pages/ms, ~98 MiB over
        // its 166 ms) leaves 330 MiB: the next round and a whole final dump need (98 + 256) ×
        // 1.25 = 442 MiB.
        let d = q.after_round(with_room(round(40_000, 266.0), 330 * MIB));
        assert!(d.stop && d.reason.contains("another round (~"), "{d:?}");
        // 500 MiB would have done.
        let mut r = Policy::new(PolicyKind::Adaptive, 8, 1);
        r.after_round(with_room(round(65_536, 0.0), 700 * MIB));
        assert!(
            !r.after_round(with_room(round(40_000, 266.0), 500 * MIB))
                .stop
        );
        // The rule holds for the anchors' rules too.
        let mut h = Policy::new(PolicyKind::PHaul, 8, 0);
        let d = h.after_round(with_room(round(65_536, 0.0), 100 * MIB));
        assert!(d.stop && d.reason.contains("room"), "{d:?}");
    }

    #[test]
    fn a_stop_for_another_reason_keeps_its_reason() {
        let mut p = Policy::new(PolicyKind::Adaptive, 8, 300);
        let d = p.after_round(with_room(round(10_000, 0.0), 0));
        assert!(d.stop && d.reason.contains("within the target"), "{d:?}");
    }

    #[test]
    fn a_final_dump_predicted_beyond_the_room_left_is_told() {
        let mut p = Policy::new(PolicyKind::Adaptive, 2, 1);
        p.after_round(with_room(round(65_536, 0.0), 700 * MIB));
        assert_eq!(
            p.final_room_shortfall(),
            None,
            "no prediction before round 2"
        );
        // The final dump would carry ~98 MiB (as above); 50 MiB are left.
        let d = p.after_round(with_room(round(40_000, 266.0), 50 * MIB));
        assert!(d.stop, "{d:?}");
        let why = p.final_room_shortfall().expect("a shortfall");
        assert!(
            why.starts_with("the final dump is predicted to write ~")
                && why.ends_with("which has room for only 50.0 MiB after the pre-dump rounds"),
            "{why}"
        );
        let mut q = Policy::new(PolicyKind::Adaptive, 2, 1);
        q.after_round(with_room(round(65_536, 0.0), 700 * MIB));
        q.after_round(with_room(round(40_000, 266.0), 200 * MIB));
        assert_eq!(q.final_room_shortfall(), None);
        // After round 1 the pages written since it froze the container stand in for a
        // prediction: all 256 MiB rewritten, 100 MiB of room left.
        let mut f = Policy::new(PolicyKind::Adaptive, 8, 1);
        let mut r1 = with_room(round(65_536, 0.0), 100 * MIB);
        r1.dirty_now = Some(65_536);
        let d = f.after_round(r1);
        assert!(
            d.stop && d.reason.contains("another round (~256.0 MiB)"),
            "{d:?}"
        );
        let why = f.final_room_shortfall().expect("a shortfall");
        assert!(
            why.starts_with("the final dump is predicted to write ~256.0 MiB"),
            "{why}"
        );
        // 10 MiB rewritten: no further round (10 + 256 MiB would not fit), but the final dump
        // fits.
        let mut g = Policy::new(PolicyKind::Adaptive, 8, 1);
        r1.dirty_now = Some(2_560);
        assert!(g.after_round(r1).stop);
        assert_eq!(g.final_room_shortfall(), None);
        // Without word from the destination nothing is told.
        let mut r = Policy::new(PolicyKind::Adaptive, 2, 1);
        r.after_round(round(65_536, 0.0));
        r.after_round(round(40_000, 266.0));
        assert_eq!(r.final_room_shortfall(), None);
    }

    #[test]
    fn phaul_fixed_rules() {
        let mut p = Policy::new(PolicyKind::PHaul, 20, 0);
        assert!(!p.after_round(round(65_536, 0.0)).stop);
        assert!(!p.after_round(round(30_000, 266.0)).stop);
        let d = p.after_round(round(34_000, 130.0));
        assert!(d.stop && d.reason.contains("10 %"), "{d:?}");

        let mut q = Policy::new(PolicyKind::PHaul, 20, 0);
        let mut last = None;
        for i in 0..20 {
            let d = q.after_round(round(65_536 - i * 100, 266.0));
            if d.stop {
                last = Some((i, d));
                break;
            }
        }
        let (i, d) = last.unwrap();
        assert_eq!(i, 8, "nine rounds");
        assert!(d.reason.contains("9 rounds"), "{}", d.reason);

        let mut r = Policy::new(PolicyKind::PHaul, 20, 0);
        assert!(r.after_round(round(64, 0.0)).stop);
    }

    #[test]
    fn one_round_policy() {
        let mut p = Policy::new(PolicyKind::OneRound, 8, 0);
        assert!(p.after_round(round(65_536, 0.0)).stop);
    }

    #[test]
    fn names_parse_back() {
        for k in [
            PolicyKind::Adaptive,
            PolicyKind::PHaul,
            PolicyKind::OneRound,
        ] {
            assert_eq!(PolicyKind::parse(k.name()), Some(k));
        }
        assert_eq!(PolicyKind::parse("nope"), None);
    }
}
