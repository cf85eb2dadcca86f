//! The wheel against a `BTreeSet` reference model over random operation sequences.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::*;

const R: u64 = 1 << 36; // the top level's range

/// A deadline, relative to the tick at which the operation runs, drawn from several scales.
#[derive(Clone, Copy, Debug)]
enum When {
    Past(u64),
    After(u64),
    At(u64),
}

impl When {
    fn resolve(self, now: u64) -> u64 {
        match self {
            Self::Past(back) => now.saturating_sub(back),
            Self::After(ahead) => now.saturating_add(ahead),
            Self::At(tick) => tick,
        }
    }
}

fn huge() -> impl Strategy<Value = When> {
    prop_oneof![
        Just(When::After(R - 1)),
        Just(When::After(R)),
        (0..R).prop_map(|x| When::After(R + x)),
        (0u64..1 << 20).prop_map(|x| When::After((1 << 40) + x)),
        (0u64..1 << 20).prop_map(|x| When::At(u64::MAX / 2 + x)),
        (0u64..4).prop_map(|x| When::At(u64::MAX - x)),
    ]
}

fn when() -> BoxedStrategy<When> {
    prop_oneof![
        1 => (0u64..100).prop_map(When::Past),
        4 => (0u64..70).prop_map(When::After),
        3 => (0u64..5_000).prop_map(When::After),
        2 => (0u64..300_000).prop_map(When::After),
        1 => huge(),
    ]
    .boxed()
}

fn small_when() -> BoxedStrategy<When> {
    prop_oneof![
        1 => (0u64..10).prop_map(When::Past),
        6 => (0u64..70).prop_map(When::After),
        2 => (0u64..300).prop_map(When::After),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
enum Op {
    Insert(When),
    Reset(usize, When),
    Disarm(usize),
    Remove(usize),
    /// Polls at every one of the next `ticks` ticks, at most `bound` timers per tick.
    Step {
        ticks: u64,
        bound: Option<usize>,
    },
    /// Moves `ticks` ahead at once and polls there.
    Jump {
        ticks: u64,
        bound: Option<usize>,
    },
}

fn bound() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 1 => (1usize..4).prop_map(Some)]
}

fn ops(
    when: BoxedStrategy<When>,
    jump: impl Strategy<Value = u64>,
) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => when.clone().prop_map(Op::Insert),
        4 => (any::<usize>(), when).prop_map(|(pick, when)| Op::Reset(pick, when)),
        1 => any::<usize>().prop_map(Op::Disarm),
        2 => any::<usize>().prop_map(Op::Remove),
        4 => (1u64..150, bound()).prop_map(|(ticks, bound)| Op::Step { ticks, bound }),
        2 => (jump, bound()).prop_map(|(ticks, bound)| Op::Jump { ticks, bound }),
    ];
    prop::collection::vec(op, 1..100)
}

fn jumps() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..5_000,
        3 => 1u64..300_000,
        1 => prop_oneof![Just(R), Just(1 << 40), Just(1 << 62), 1u64..R],
    ]
}

#[derive(Clone, Copy, Debug)]
struct ModelEntry {
    key: TimerKey,
    token: u32,
    deadline: Option<u64>,
    /// Armed for a deadline after the tick it was armed at. Such timers must come out in
    /// deadline order; a timer armed in the past only has to come out on the next poll.
    future: bool,
}

struct Harness {
    wheel: TimingWheel,
    live: HashMap<u32, ModelEntry>,
    /// (deadline, index) of every armed timer.
    armed: BTreeSet<(u64, u32)>,
    keys: Vec<TimerKey>,
    now: u64,
    next_token: u32,
    last_future: u64,
    /// Work budget per `poll_within` call (`usize::MAX`: cascades finish in one call).
    budget: usize,
}

impl Harness {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            wheel: TimingWheel::new(),
            live: HashMap::new(),
            armed: BTreeSet::new(),
            keys: Vec::new(),
            now: 0,
            next_token: 0,
            last_future: 0,
        }
    }

    fn pick(&self, pick: usize) -> Option<TimerKey> {
        (!self.keys.is_empty()).then(|| self.keys[pick % self.keys.len()])
    }

    fn live(&self, key: TimerKey) -> Option<ModelEntry> {
        self.live
            .get(&key.index())
            .copied()
            .filter(|m| m.key == key)
    }

    fn model_disarm(&mut self, index: u32) {
        let entry = self.live.get_mut(&index).unwrap();
        if let Some(deadline) = entry.deadline.take() {
            self.armed.remove(&(deadline, index));
        }
    }

    fn model_arm(&mut self, index: u32, deadline: u64) {
        self.model_disarm(index);
        let entry = self.live.get_mut(&index).unwrap();
        entry.deadline = Some(deadline);
        entry.future = deadline > self.now;
        self.armed.insert((deadline, index));
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Insert(when) => {
                let deadline = when.resolve(self.now);
                let token = self.next_token;
                self.next_token += 1;
                let key = self.wheel.insert(deadline, token);
                prop_assert!(self.live(key).is_none() && !self.keys.contains(&key));
                let entry = ModelEntry {
                    key,
                    token,
                    deadline: None,
                    future: false,
                };
                self.live.insert(key.index(), entry);
                self.model_arm(key.index(), deadline);
                self.keys.push(key);
            }
            Op::Reset(pick, when) => {
                let Some(key) = self.pick(pick) else {
                    return Ok(());
                };
                let deadline = when.resolve(self.now);
                let live = self.live(key).is_some();
                prop_assert_eq!(self.wheel.reset(key, deadline), live);
                if live {
                    self.model_arm(key.index(), deadline);
                }
            }
            Op::Disarm(pick) => {
                let Some(key) = self.pick(pick) else {
                    return Ok(());
                };
                let live = self.live(key).is_some();
                prop_assert_eq!(self.wheel.disarm(key), live);
                if live {
                    self.model_disarm(key.index());
                }
            }
            Op::Remove(pick) => {
                let Some(key) = self.pick(pick) else {
                    return Ok(());
                };
                let expected = self.live(key).map(|m| m.token);
                prop_assert_eq!(self.wheel.remove(key), expected);
                if expected.is_some() {
                    self.model_disarm(key.index());
                    self.live.remove(&key.index());
                }
            }
            Op::Step { ticks, bound } => {
                for _ in 0..ticks {
                    self.poll_at(self.now.saturating_add(1), bound)?;
                }
            }
            Op::Jump { ticks, bound } => self.poll_at(self.now.saturating_add(ticks), bound)?,
        }
        self.check_state()
    }

    /// Polls at `now` until nothing is due, or `bound` times.
    fn poll_at(&mut self, now: u64, bound: Option<usize>) -> Result<(), TestCaseError> {
        self.now = now;
        let mut polls = 0;
        while bound.is_none_or(|b| polls < b) {
            polls += 1;
            // A yield counts against the bound too, so a bounded caller may stop part-way
            // through a cascade and the next operations hit timers still waiting in it.
            let expired = match self.wheel.poll_within(now, self.budget) {
                Poll::Expired(expired) => Some(expired),
                Poll::Yield => continue,
                Poll::Idle => None,
            };
            let Some(expired) = expired else {
                // Nothing due may be left: every timer comes out at the first poll at or after
                // its deadline (unless an earlier bound held it back, and then it is still due
                // now and must come out now).
                let first = self.armed.first().copied();
                prop_assert!(
                    first.is_none_or(|(d, _)| d > now),
                    "{first:?} missed at {now}"
                );
                break;
            };
            let entry = self.live(expired.key);
            prop_assert!(entry.is_some(), "stale or unknown {expired:?}");
            let entry = entry.unwrap();
            prop_assert_eq!(entry.deadline, Some(expired.deadline), "not armed so");
            prop_assert_eq!(entry.token, expired.token);
            prop_assert!(expired.deadline <= now, "{expired:?} early at {now}");
            if entry.future {
                prop_assert!(
                    expired.deadline >= self.last_future,
                    "{expired:?} after {}",
                    self.last_future
                );
                self.last_future = expired.deadline;
            }
            self.model_disarm(expired.key.index());
        }
        prop_assert_eq!(self.wheel.now(), now);
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.wheel.len(), self.live.len());
        prop_assert_eq!(self.wheel.armed(), self.armed.len());
        for &key in &self.keys {
            let model = self.live(key);
            prop_assert_eq!(self.wheel.token(key), model.map(|m| m.token));
            prop_assert_eq!(self.wheel.deadline(key), model.and_then(|m| m.deadline));
        }
        let next = self.wheel.next_expiration();
        match self.armed.first() {
            None => prop_assert_eq!(next, None),
            Some(&(earliest, _)) => {
                let next = next.unwrap_or(u64::MAX);
                prop_assert!(
                    next <= earliest.max(self.now),
                    "next {next}, earliest {earliest}, now {}",
                    self.now
                );
            }
        }
        Ok(())
    }

    /// Everything still armed must come out, each at its deadline or right away if overdue.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.poll_at(self.now, None)?;
        while let Some(&(deadline, _)) = self.armed.first() {
            if deadline > self.now {
                prop_assert_eq!(self.wheel.poll(deadline - 1), None);
                self.now = deadline - 1;
            }
            self.poll_at(deadline, None)?;
        }
        self.check_state()
    }
}

fn run(ops: &[Op], budget: usize) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(budget);
    for op in ops {
        harness.apply(op)?;
    }
    harness.finish()
}

proptest! {
    // Failing cases are kept next to this file (`proptests.regressions`), inside the wheel's
    // own directory.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn matches_model_at_mixed_scales(ops in ops(when(), jumps())) {
        run(&ops, usize::MAX)?;
    }

    #[test]
    fn matches_model_around_low_level_boundaries(ops in ops(small_when(), 1u64..200)) {
        run(&ops, usize::MAX)?;
    }

    #[test]
    fn matches_model_with_cascades_in_pieces(ops in ops(when(), jumps()), budget in 1usize..4) {
        run(&ops, budget)?;
    }
}
