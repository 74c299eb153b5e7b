//! The runner's slots (`worker.max_runs`, or fewer when the executors allow fewer), shared
//! between the sources of runs.
//!
//! Each source (requests, schedules, conversation turns) claims its own work in its own loop, and asks here for
//! room first: a reservation of free slots, which the runs it claims then occupy and which
//! is given back for what it did not claim. A source that holds no slot may always start
//! one run, beyond capacity if the other source holds every slot (unless capacity is 1): so the first
//! run of one source never waits for the other's runs to end, and a replica whose runs all
//! come from one source still runs capacity of them. When several sources have
//! work waiting, free slots are split between them, and a single free slot goes to each in
//! turn, so no source can starve another: a flood of requests cannot hold back a schedule
//! that is due, nor the other way round.

use std::sync::Mutex;

use tokio::sync::watch;

/// Where runs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `request_run`, the CLI's `trigger`.
    Requests,
    /// Due schedules.
    Schedules,
    /// Conversation turns.
    Conversations,
}

impl Source {
    /// Every source, in the order single slots go round.
    const ALL: [Source; 3] = [Source::Requests, Source::Schedules, Source::Conversations];

    fn index(self) -> usize {
        match self {
            Source::Requests => 0,
            Source::Schedules => 1,
            Source::Conversations => 2,
        }
    }
}

/// The slot accounting of one runner.
pub struct Slots {
    state: Mutex<State>,
    /// Counts runs that ended: a source waiting for room watches it.
    freed: watch::Sender<u64>,
}

struct State {
    capacity: usize,
    /// Runs occupying a slot, by source.
    running: [usize; Source::ALL.len()],
    /// Slots reserved and not occupied yet, by source.
    reserved: [usize; Source::ALL.len()],
    waiting: [bool; Source::ALL.len()],
    /// The source whose turn it is when there are fewer free slots than sources waiting.
    turn: usize,
}

impl Slots {
    /// `capacity` slots, none in use.
    pub fn new(capacity: usize) -> Slots {
        Slots {
            state: Mutex::new(State {
                capacity: capacity.max(1),
                running: [0; Source::ALL.len()],
                reserved: [0; Source::ALL.len()],
                waiting: [false; Source::ALL.len()],
                turn: 0,
            }),
            freed: watch::Sender::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Says whether `source` has work waiting for room (it then gets its share).
    pub fn set_waiting(&self, source: Source, waiting: bool) {
        self.state().waiting[source.index()] = waiting;
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.state().capacity
    }

    /// Slots neither running nor reserved.
    pub fn available(&self) -> usize {
        self.state().free()
    }

    /// Runs occupying a slot.
    pub fn running(&self) -> usize {
        self.state().running.iter().sum()
    }

    /// Reserves up to `at_most` slots for `source`: all free slots when no other source is
    /// waiting, otherwise an even share (rounded up), or a single slot in turn when there
    /// are fewer than sources waiting. A source that holds no slot gets one whenever it
    /// asks, whoever's turn it is, beyond capacity if no slot is free (with more than one
    /// slot).
    pub fn reserve(&self, source: Source, at_most: usize) -> Reservation<'_> {
        let mut state = self.state();
        let free = state.free();
        let others = Source::ALL
            .iter()
            .filter(|other| **other != source && state.waiting[other.index()])
            .count();
        // With a single slot (a limit of 1) one run means one: no run beyond it.
        let first = state.held(source) == 0 && state.capacity > 1;
        let share = if free == 0 {
            usize::from(first)
        } else if others == 0 {
            free
        } else if free > others {
            free.div_ceil(others + 1)
        } else if first {
            1
        } else {
            let turn = Source::ALL[state.turn % Source::ALL.len()];
            if turn == source || !state.waiting[turn.index()] {
                state.turn = (source.index() + 1) % Source::ALL.len();
                1
            } else {
                0
            }
        };
        let granted = share.min(at_most);
        state.reserved[source.index()] += granted;
        Reservation {
            slots: self,
            source,
            left: granted,
        }
    }

    /// A run of `source` started without a reservation (claimed beyond it): it occupies a
    /// slot all the same, over capacity if need be.
    pub fn occupy_extra(&self, source: Source) {
        self.state().running[source.index()] += 1;
    }

    /// A run of `source` needs its slot no more (its executor ended): the slot is free.
    pub fn release_running(&self, source: Source) {
        {
            let mut state = self.state();
            let running = &mut state.running[source.index()];
            *running = running.saturating_sub(1);
        }
        self.freed
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that changes whenever a run ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.freed.subscribe()
    }
}

impl State {
    /// Slots neither running nor reserved.
    fn free(&self) -> usize {
        let used: usize = self.running.iter().chain(&self.reserved).sum();
        self.capacity.saturating_sub(used)
    }

    /// Slots `source` runs in or has reserved.
    fn held(&self, source: Source) -> usize {
        self.running[source.index()] + self.reserved[source.index()]
    }
}

/// Reserved slots; each run started with it occupies one, and whatever is left is given
/// back when it is dropped.
pub struct Reservation<'a> {
    slots: &'a Slots,
    source: Source,
    left: usize,
}

impl<'a> Reservation<'a> {
    /// The source the slots are reserved for.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Slots still reserved.
    pub fn len(&self) -> usize {
        self.left
    }

    /// Whether nothing is reserved.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Moves up to `count` of these slots into a reservation of their own (for runs that
    /// start later: slots claimed ahead of their instant).
    pub fn split_off(&mut self, count: usize) -> Reservation<'a> {
        let moved = count.min(self.left);
        self.left -= moved;
        Reservation {
            slots: self.slots,
            source: self.source,
            left: moved,
        }
    }

    /// Takes over the slots of `other` (of the same source).
    pub fn absorb(&mut self, mut other: Reservation<'a>) {
        self.left += other.left;
        other.left = 0;
    }

    /// Turns one reserved slot into a running run; false when none is left.
    pub fn occupy(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        let mut state = self.slots.state();
        state.reserved[self.source.index()] -= 1;
        state.running[self.source.index()] += 1;
        true
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.left > 0 {
            let mut state = self.slots.state();
            state.reserved[self.source.index()] -= self.left;
            drop(state);
            self.slots
                .freed
                .send_modify(|count| *count = count.wrapping_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_alone_gets_every_slot_and_the_other_one_more() {
        let slots = Slots::new(16);
        slots.set_waiting(Source::Requests, true);
        let mut reservation = slots.reserve(Source::Requests, 500);
        assert_eq!(reservation.len(), 16);
        while reservation.occupy() {}
        drop(reservation);
        assert_eq!(slots.running(), 16);
        assert_eq!(slots.available(), 0);
        assert!(slots.reserve(Source::Requests, 500).is_empty());
        // The other source, holding none, starts one run at once, beyond capacity.
        slots.set_waiting(Source::Schedules, true);
        let mut schedules = slots.reserve(Source::Schedules, 500);
        assert!(schedules.occupy());
        assert!(!schedules.occupy());
        drop(schedules);
        assert_eq!(slots.running(), 17);
        assert!(
            slots.reserve(Source::Schedules, 500).is_empty(),
            "one beyond, no more"
        );
        // Its run ended: it may start one again, the requests still may not.
        slots.release_running(Source::Schedules);
        assert!(slots.reserve(Source::Requests, 500).is_empty());
        assert_eq!(slots.reserve(Source::Schedules, 500).len(), 1);
    }

    #[test]
    fn a_single_slot_goes_to_whoever_asks_and_no_run_beyond_it() {
        let slots = Slots::new(1);
        let mut requests = slots.reserve(Source::Requests, 500);
        assert!(requests.occupy());
        drop(requests);
        slots.set_waiting(Source::Schedules, true);
        assert!(slots.reserve(Source::Schedules, 500).is_empty());
    }

    #[test]
    fn waiting_sources_split_free_slots_and_take_single_ones_in_turn() {
        let slots = Slots::new(16);
        slots.set_waiting(Source::Requests, true);
        slots.set_waiting(Source::Schedules, true);
        let mut requests = slots.reserve(Source::Requests, 500);
        assert_eq!(requests.len(), 8, "half of the 16");
        while requests.occupy() {}
        drop(requests);
        let mut schedules = slots.reserve(Source::Schedules, 500);
        assert_eq!(schedules.len(), 4, "half of the 8 left");
        while schedules.occupy() {}
        drop(schedules);
        // Fill up, then free one slot at a time: it goes to each source in turn.
        slots.set_waiting(Source::Schedules, false);
        let mut rest = slots.reserve(Source::Requests, 500);
        while rest.occupy() {}
        drop(rest);
        slots.set_waiting(Source::Schedules, true);
        assert_eq!(slots.available(), 0);
        let mut winners = Vec::new();
        for _ in 0..6 {
            slots.release_running(Source::Requests);
            let mut requests = slots.reserve(Source::Requests, 500);
            if requests.occupy() {
                winners.push(Source::Requests);
                continue;
            }
            drop(requests);
            let mut schedules = slots.reserve(Source::Schedules, 500);
            assert!(schedules.occupy(), "{winners:?}");
            winners.push(Source::Schedules);
        }
        use Source::{Requests, Schedules};
        assert_eq!(
            winners,
            [
                Requests, Schedules, Requests, Schedules, Requests, Schedules
            ]
        );
    }

    #[test]
    fn unused_reservations_are_given_back() {
        let slots = Slots::new(4);
        let reservation = slots.reserve(Source::Schedules, 3);
        assert_eq!(slots.available(), 1);
        drop(reservation);
        assert_eq!(slots.available(), 4);
    }
}
