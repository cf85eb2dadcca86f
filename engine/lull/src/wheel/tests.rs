use super::level::{
    Expiration, LEVELS, Levels, SLOTS, TOP, level_for, level_range, slot_for, slot_width,
};
use super::*;

const R: u64 = 1 << 36; // the top level's range

/// Polls at `now` until nothing more is due.
fn drain(wheel: &mut TimingWheel, now: u64) -> Vec<Expired> {
    std::iter::from_fn(|| wheel.poll(now)).collect()
}

fn tokens(expired: &[Expired]) -> Vec<u32> {
    let mut tokens: Vec<u32> = expired.iter().map(|e| e.token).collect();
    tokens.sort_unstable();
    tokens
}

/// A small deterministic generator so the spread tests need no seed plumbing.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn level_table() {
    // Same numbers as the table in the module docs.
    let table: [(u64, u64); LEVELS] = [
        (1, 64),
        (64, 4_096),
        (4_096, 262_144),
        (262_144, 16_777_216),
        (16_777_216, 1_073_741_824),
        (1_073_741_824, 68_719_476_736),
    ];
    for (level, &(width, range)) in table.iter().enumerate() {
        assert_eq!(slot_width(level), width, "slot width of level {level}");
        assert_eq!(level_range(level), range, "range of level {level}");
        assert_eq!(width * SLOTS as u64, range);
    }
    assert_eq!(level_range(TOP), R);
    assert_eq!(ENTRY_BYTES, 24);
}

#[test]
fn level_for_table() {
    let cases: &[(u64, u64, usize)] = &[
        // (elapsed, when, level)
        (0, 0, 0),
        (0, 1, 0),
        (0, 63, 0),
        (0, 64, 1),
        (0, 4_095, 1),
        (0, 4_096, 2),
        (0, 262_143, 2),
        (0, 262_144, 3),
        (0, (1 << 24) - 1, 3),
        (0, 1 << 24, 4),
        (0, (1 << 30) - 1, 4),
        (0, 1 << 30, 5),
        (0, R - 1, 5),
        // Beyond the range: clamped to the top level.
        (0, R, 5),
        (0, 1 << 40, 5),
        (0, u64::MAX / 2, 5),
        (0, u64::MAX, 5),
        // The level follows the highest differing bit group, not the distance.
        (63, 64, 1),
        (64, 127, 0),
        (4_095, 4_096, 2),
        (262_143, 262_144, 3),
        (R - 1, R, 5),
        (R, R + 63, 0),
        (R + 64, R + 200, 1),
        (100, 100, 0),
        (1_000, 1_023, 0),
        (1_000, 1_024, 1),
        (u64::MAX - 1, u64::MAX, 0),
        (u64::MAX - 64, u64::MAX, 1),
        (u64::MAX / 2, u64::MAX, 5),
    ];
    for &(elapsed, when, level) in cases {
        assert_eq!(
            level_for(elapsed, when),
            level,
            "level_for({elapsed}, {when})"
        );
    }
}

#[test]
fn slot_for_table() {
    let cases: &[(u64, usize, usize)] = &[
        // (when, level, slot)
        (0, 0, 0),
        (63, 0, 63),
        (64, 0, 0),
        (64, 1, 1),
        (4_095, 1, 63),
        (4_096, 1, 0),
        (4_096, 2, 1),
        (262_144 * 5 + 7, 3, 5),
        (1 << 30, 5, 1),
        (R - 1, 5, 63),
        // Clamped far deadlines wrap around the top level.
        (R, 5, 0),
        ((1 << 40) + 3 * (1 << 30), 5, 3),
        (u64::MAX / 2, 5, 63),
        (u64::MAX, 5, 63),
        (u64::MAX, 0, 63),
    ];
    for &(when, level, slot) in cases {
        assert_eq!(slot_for(when, level), slot, "slot_for({when}, {level})");
    }
}

#[test]
fn levels_next_expiration_table() {
    // (elapsed, occupied (level, slot, when), expected (level, slot, deadline))
    type Case = (
        u64,
        &'static [(usize, usize, u64)],
        Option<(usize, usize, u64)>,
    );
    let cases: &[Case] = &[
        (0, &[], None),
        (0, &[(0, 5, 5)], Some((0, 5, 5))),
        (0, &[(0, 5, 5), (1, 2, 130)], Some((0, 5, 5))),
        (0, &[(1, 2, 130)], Some((1, 2, 128))),
        (70, &[(1, 3, 200)], Some((1, 3, 192))),
        (0, &[(TOP, 1, 1 << 30)], Some((TOP, 1, 1 << 30))),
        // A far deadline waits for its own rotation, not the slot's next turn.
        (0, &[(TOP, 0, 1 << 40)], Some((TOP, 0, 1 << 40))),
        (
            0,
            &[(TOP, 3, (1 << 40) + 3 * (1 << 30) + 9)],
            Some((TOP, 3, (1 << 40) + 3 * (1 << 30))),
        ),
        // Slot 2 is the current slot: its next start is in the next rotation.
        (
            2 << 30,
            &[(TOP, 2, R + (2 << 30) + 1)],
            Some((TOP, 2, R + (2 << 30))),
        ),
        // The later slot in ring order holds the earlier deadline.
        (
            0,
            &[(TOP, 1, (1 << 40) + (1 << 30)), (TOP, 2, 2 << 30)],
            Some((TOP, 2, 2 << 30)),
        ),
    ];
    for (elapsed, occupied, expected) in cases {
        let mut levels = Levels::new();
        for &(level, slot, when) in occupied.iter() {
            levels.occupy(level, slot, when);
        }
        let expected = expected.map(|(level, slot, deadline)| Expiration {
            level,
            slot,
            deadline,
        });
        assert_eq!(
            levels.next_expiration(*elapsed),
            expected,
            "at {elapsed}: {occupied:?}"
        );
    }
}

#[test]
fn past_deadline_fires_on_next_poll() {
    let mut wheel = TimingWheel::new();
    let zero = wheel.insert(0, 1);
    assert_eq!(wheel.next_expiration(), Some(0));
    assert_eq!(wheel.poll(0).map(|e| e.key), Some(zero));
    assert_eq!(wheel.poll(0), None);

    assert_eq!(wheel.poll(1_000), None);
    let past = wheel.insert(10, 2);
    let current = wheel.insert(1_000, 3);
    assert!(wheel.next_expiration().unwrap() <= 1_000);
    // An earlier `now` counts as the current tick.
    let fired = drain(&mut wheel, 5);
    assert_eq!(tokens(&fired), [2, 3]);
    assert_eq!(wheel.now(), 1_000);
    assert_eq!(fired.iter().find(|e| e.key == past).unwrap().deadline, 10);
    assert_eq!(
        fired.iter().find(|e| e.key == current).unwrap().deadline,
        1_000
    );
}

#[test]
fn fires_exactly_at_deadline_after_a_jump() {
    let deadlines = [
        1,
        63,
        64,
        65,
        127,
        128,
        4_095,
        4_096,
        4_097,
        262_143,
        262_144,
        262_145,
        300_000,
        16_777_215,
        16_777_216,
        1 << 30,
        (1 << 30) + 1,
        R - 1,
    ];
    for start in [0, 1, 63, 4_000, 1 << 29] {
        for &offset in &deadlines {
            let deadline = start + offset;
            let mut wheel = TimingWheel::new();
            assert_eq!(wheel.poll(start), None);
            let key = wheel.insert(deadline, 7);
            assert!(wheel.next_expiration().unwrap() <= deadline);
            assert_eq!(
                wheel.poll(deadline - 1),
                None,
                "early: start {start}, deadline {deadline}"
            );
            let fired = wheel.poll(deadline).expect("due");
            assert_eq!((fired.key, fired.token, fired.deadline), (key, 7, deadline));
            assert_eq!(wheel.poll(deadline), None);
            assert_eq!(wheel.armed(), 0);
            assert_eq!(wheel.next_expiration(), None);
        }
    }
}

#[test]
fn fires_exactly_at_deadline_tick_by_tick() {
    let mut wheel = TimingWheel::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let deadlines: Vec<u64> = (0..2_000).map(|_| xorshift(&mut seed) % 10_000).collect();
    for (token, &deadline) in deadlines.iter().enumerate() {
        wheel.insert(deadline, token as u32);
    }
    let mut fired_at = vec![None; deadlines.len()];
    let mut last_deadline = 0;
    for now in 0..=10_000 {
        while let Some(expired) = wheel.poll(now) {
            assert!(expired.deadline >= last_deadline, "out of order");
            last_deadline = expired.deadline;
            assert_eq!(
                fired_at[expired.token as usize].replace(now),
                None,
                "fired twice"
            );
        }
    }
    for (token, &deadline) in deadlines.iter().enumerate() {
        assert_eq!(fired_at[token], Some(deadline), "token {token}");
    }
    assert_eq!((wheel.len(), wheel.armed()), (2_000, 0));
}

#[test]
fn reset_moves_earlier_and_later() {
    let mut wheel = TimingWheel::new();
    let a = wheel.insert(5_000, 1);
    let b = wheel.insert(100, 2);
    assert!(wheel.reset(a, 50));
    assert!(wheel.reset(b, 300_000));
    assert_eq!(wheel.deadline(a), Some(50));
    assert_eq!(wheel.deadline(b), Some(300_000));
    assert_eq!(wheel.poll(49), None);
    assert_eq!(wheel.poll(50).map(|e| e.key), Some(a));
    assert_eq!(wheel.poll(299_999), None);
    assert_eq!(wheel.poll(300_000).map(|e| e.key), Some(b));
    // A fired timer can be re-armed through its key.
    assert!(wheel.reset(a, 300_010));
    assert_eq!(wheel.poll(300_009), None);
    assert_eq!(wheel.poll(300_010).map(|e| (e.key, e.token)), Some((a, 1)));
    assert_eq!((wheel.len(), wheel.armed()), (2, 0));
}

#[test]
fn disarm_and_remove_stop_firing() {
    let mut wheel = TimingWheel::new();
    let keep = wheel.insert(70, 1);
    let disarmed = wheel.insert(70, 2);
    let removed = wheel.insert(70, 3);
    let far = wheel.insert(1 << 40, 4);
    assert!(wheel.disarm(disarmed));
    assert!(wheel.disarm(far));
    assert_eq!(wheel.remove(removed), Some(3));
    assert_eq!(wheel.deadline(disarmed), None);
    assert_eq!(wheel.token(disarmed), Some(2));
    assert_eq!((wheel.len(), wheel.armed()), (3, 1));
    assert_eq!(tokens(&drain(&mut wheel, u64::MAX)), [1]);
    assert_eq!(wheel.next_expiration(), None);
    assert!(wheel.disarm(keep), "disarming a fired timer is fine");
    assert_eq!(wheel.remove(disarmed), Some(2));
    assert_eq!((wheel.len(), wheel.armed()), (2, 0));
}

#[test]
fn stale_keys_are_rejected() {
    let mut wheel = TimingWheel::with_capacity(4);
    let old = wheel.insert(10, 1);
    assert_eq!(wheel.remove(old), Some(1));
    let check_stale = |wheel: &mut TimingWheel| {
        assert!(!wheel.reset(old, 20));
        assert!(!wheel.disarm(old));
        assert_eq!(wheel.remove(old), None);
        assert_eq!(wheel.token(old), None);
        assert_eq!(wheel.deadline(old), None);
    };
    check_stale(&mut wheel);
    assert!(wheel.is_empty());

    // The slot is reused; the old key must not reach the new timer.
    let new = wheel.insert(30, 2);
    assert_eq!(new.index(), old.index());
    assert_ne!(new, old);
    check_stale(&mut wheel);
    assert_eq!(wheel.deadline(new), Some(30));
    assert_eq!(tokens(&drain(&mut wheel, 30)), [2]);
    check_stale(&mut wheel);
    assert_eq!(wheel.remove(new), Some(2));
    assert_eq!(wheel.remove(new), None);
    assert!(wheel.is_empty());
}

#[test]
fn far_deadlines_fire_exactly_and_never_early() {
    let far = [
        R - 1,
        R,
        R + 1,
        (1 << 40) - 1,
        1 << 40,
        1 << 40,
        (1 << 40) + 3 * (1 << 30) + 7,
        3 << 40,
        u64::MAX / 2,
        u64::MAX / 2 + 1,
        u64::MAX - R,
        u64::MAX - 1,
        u64::MAX,
    ];
    for start in [0, 12_345, (5 << 30) + 17] {
        let mut wheel = TimingWheel::new();
        assert_eq!(wheel.poll(start), None);
        // A near timer alongside must not disturb the far ones.
        wheel.insert(start + 10, u32::MAX);
        for (token, &deadline) in far.iter().enumerate() {
            wheel.insert(deadline, token as u32);
        }
        assert_eq!(tokens(&drain(&mut wheel, start + 10)), [u32::MAX]);

        let mut fired = 0;
        for &deadline in &far {
            // Big jumps then exact steps: every poll before the deadline finds nothing due.
            for back in [R + 5, R, 1 << 30, 1 << 24, 4_096, 64, 1] {
                let now = deadline.saturating_sub(back).max(wheel.now());
                assert_eq!(drain(&mut wheel, now), [], "fired early at {now}");
                let earliest = far.iter().find(|&&d| d > now).unwrap();
                let next = wheel.next_expiration();
                assert!(next.unwrap() <= *earliest, "{next:?} > {earliest} at {now}");
            }
            let due = drain(&mut wheel, deadline);
            assert!(
                due.iter().all(|e| e.deadline == deadline),
                "{due:?} at {deadline}"
            );
            fired += due.len();
            assert_eq!(fired, far.iter().filter(|&&d| d <= deadline).count());
        }
        assert_eq!((wheel.armed(), wheel.next_expiration()), (0, None));
    }
}

#[test]
fn far_deadline_alone_costs_few_cascades() {
    // Jumping straight to just before a deadline near 2^63 has to finish promptly: the top
    // level waits for the deadline's rotation instead of visiting all 2^27 of them.
    let mut wheel = TimingWheel::new();
    let key = wheel.insert(u64::MAX / 2, 9);
    assert_eq!(wheel.poll(u64::MAX / 2 - 1), None);
    assert_eq!(wheel.poll(u64::MAX / 2).map(|e| e.key), Some(key));
    let key = wheel.insert(u64::MAX, 10);
    assert_eq!(wheel.poll(u64::MAX - 1), None);
    assert_eq!(wheel.poll(u64::MAX).map(|e| e.key), Some(key));
    assert_eq!(wheel.poll(u64::MAX), None);
}

#[test]
fn interrupted_polling_loses_nothing() {
    let mut wheel = TimingWheel::new();
    let mut seed = 42;
    let mut keys = Vec::new();
    // About ten due per tick, three handed out per tick: a backlog builds up.
    for token in 0..3_000u32 {
        let deadline = xorshift(&mut seed) % 300;
        keys.push((wheel.insert(deadline, token), deadline));
    }
    let mut fired: Vec<Option<u64>> = vec![None; keys.len()];
    let mut gone = Vec::new();
    let mut moved = Vec::new();
    let mut last = 0;
    let mut now = 0;
    while wheel.armed() > 0 {
        assert!(now < 10_000, "backlog never drained");
        // Once a backlog has built up, act on timers that are due but not handed out yet: some
        // sit in the pending list (due at `elapsed`), some in slots not processed yet.
        let in_pending: Vec<TimerKey> = keys
            .iter()
            .filter(|&&(key, d)| d == wheel.elapsed && fired[key.index() as usize].is_none())
            .map(|&(key, _)| key)
            .collect();
        if now >= 150 && moved.is_empty() && in_pending.len() >= 4 {
            assert!(wheel.elapsed < 149, "no backlog at {}", wheel.elapsed);
            assert!(wheel.disarm(in_pending[0]));
            assert_eq!(wheel.remove(in_pending[1]), Some(in_pending[1].index()));
            gone.extend([in_pending[0], in_pending[1]]);
            assert!(wheel.reset(in_pending[2], 2_000));
            assert!(wheel.reset(in_pending[3], 0));
            let later = keys.iter().find(|&&(_, d)| d == 149).unwrap().0;
            assert!(wheel.reset(later, 2_001));
            moved.extend([(in_pending[2], 2_000), (later, 2_001)]);
        }
        for _ in 0..3 {
            let Some(e) = wheel.poll(now) else { break };
            assert!(e.deadline <= now, "{e:?} at {now}");
            if e.deadline != 0 {
                // The one reset to 0 mid-backlog may come out of order; nothing else may.
                assert!(e.deadline >= last, "{e:?} after {last}");
                last = e.deadline;
            }
            assert_eq!(fired[e.token as usize].replace(now), None, "fired twice");
        }
        now += 1;
    }
    for (token, &(key, _)) in keys.iter().enumerate() {
        assert_eq!(
            fired[token].is_some(),
            !gone.contains(&key),
            "token {token}"
        );
    }
    assert_eq!(moved.len(), 2, "never found a backlog to act on");
    for (key, deadline) in moved {
        assert_eq!(fired[key.index() as usize], Some(deadline));
    }
    assert_eq!((wheel.len(), wheel.armed()), (2_999, 0));
}

#[test]
fn next_expiration_is_never_later_than_the_earliest_deadline() {
    let mut wheel = TimingWheel::new();
    assert_eq!(wheel.next_expiration(), None);
    let mut seed = 7;
    let mut armed: Vec<(TimerKey, u64)> = Vec::new();
    let mut now = 0;
    for round in 0..3_000u64 {
        let scale = [70, 5_000, 300_000, 1 << 40][(round % 4) as usize];
        let deadline = now + xorshift(&mut seed) % scale;
        armed.push((wheel.insert(deadline, round as u32), deadline));
        now += xorshift(&mut seed) % 200;
        for e in drain(&mut wheel, now) {
            armed.retain(|&(key, _)| key != e.key);
        }
        let earliest = armed.iter().map(|&(_, d)| d).min();
        match (wheel.next_expiration(), earliest) {
            (Some(next), Some(earliest)) => {
                assert!(
                    next <= earliest && next > now,
                    "next {next}, earliest {earliest}"
                )
            }
            (next, earliest) => assert_eq!(next, earliest.map(|_| 0)),
        }
    }
    // With something due and not yet handed out, it reports at most `now`.
    wheel.insert(now, 0);
    wheel.insert(now + 1, 0);
    assert!(wheel.next_expiration().unwrap() <= now);
}

#[test]
fn counts_track_every_operation() {
    let mut wheel = TimingWheel::default();
    assert!(wheel.is_empty());
    let a = wheel.insert(10, 1);
    let b = wheel.insert(20, 2);
    assert_eq!((wheel.len(), wheel.armed()), (2, 2));
    wheel.disarm(a);
    assert_eq!((wheel.len(), wheel.armed()), (2, 1));
    wheel.reset(a, 5);
    wheel.reset(a, 15);
    assert_eq!((wheel.len(), wheel.armed()), (2, 2));
    assert_eq!(wheel.poll(15).map(|e| e.key), Some(a));
    assert_eq!((wheel.len(), wheel.armed()), (2, 1));
    wheel.remove(b);
    assert_eq!((wheel.len(), wheel.armed()), (1, 0));
    assert!(!wheel.is_empty());
}

/// A herd in one slot is cascaded in pieces: every piece does at most the budget's work, a
/// timer can be cancelled or re-armed while it waits in the cascade, and nothing is lost or
/// comes out of order.
#[test]
fn a_herd_cascades_in_budgeted_pieces() {
    let mut wheel = TimingWheel::new();
    // 100k timers in one level-1 slot (ticks 4096..4160), inserted at tick 0.
    let keys: Vec<TimerKey> = (0..100_000u32)
        .map(|i| wheel.insert(4_096 + u64::from(i % 64), i))
        .collect();
    wheel.poll(4_000);
    let (mut yields, mut fired, mut last) = (0, 0u32, 0u64);
    let mut cancelled = false;
    loop {
        match wheel.poll_within(4_200, 1_000) {
            Poll::Yield => {
                yields += 1;
                assert!(
                    wheel.next_expiration().is_some_and(|t| t <= 4_200),
                    "a cascade under way is due work"
                );
                if !cancelled {
                    // These are still waiting in the cascade.
                    assert!(wheel.disarm(keys[99_999]));
                    assert!(wheel.reset(keys[99_998], 10_000));
                    cancelled = true;
                }
            }
            Poll::Expired(e) => {
                assert!(e.deadline >= last, "in order");
                last = e.deadline;
                fired += 1;
            }
            Poll::Idle => break,
        }
    }
    assert!(
        yields >= 99,
        "100k re-filings at 1000 per call: {yields} yields"
    );
    assert_eq!(fired, 99_998, "all but the disarmed and the re-armed one");
    assert_eq!(wheel.deadline(keys[99_998]), Some(10_000));
    assert_eq!(wheel.poll(10_000).map(|e| e.token), Some(99_998));
}
