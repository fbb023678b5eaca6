//! Choosing a cell. Prefix affinity first: a cell whose vehicles hold a head
//! of the prompt (its summary's `prompt_heads`) and that has a free slot
//! gets it, the longest head first, so the vehicle holding the head can
//! reuse its KV cells. Otherwise the power of two choices: of two cells
//! picked at random, the one with more free slots for the model, or, as
//! free, the shorter queue for it. Close to
//! the best cell's load without every gateway piling onto the same "best"
//! cell between two summaries.

use std::cmp::Reverse;

use rand::Rng;

/// A cell that may be asked: its free slots and queue for the model and
/// how many blocks of the prompt's head its vehicles hold (0: none, or
/// affinity off).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Candidate<C> {
    pub(super) cell: C,
    pub(super) free_slots: u32,
    pub(super) queued: u32,
    pub(super) head_levels: usize,
}

/// The cell for a prompt: of the candidates with a free slot holding a head
/// of it, the longest head, then the most free slots, then the first; else
/// the power of two choices over all of them.
pub(super) fn choose<'a, C, R: Rng>(pool: &'a [Candidate<C>], rng: &mut R) -> Option<&'a C> {
    let holder = pool
        .iter()
        .filter(|candidate| candidate.free_slots > 0 && candidate.head_levels > 0)
        .min_by_key(|candidate| {
            (
                Reverse(candidate.head_levels),
                Reverse(candidate.free_slots),
            )
        });
    if let Some(holder) = holder {
        return Some(&holder.cell);
    }
    two_choices_by(
        pool,
        |candidate| (candidate.free_slots, Reverse(candidate.queued)),
        rng,
    )
    .map(|candidate| &candidate.cell)
}

/// Of `pool` (a cell and its free slots), the freer of two distinct random
/// entries (the first on a tie); the only entry of a pool of one.
#[cfg(test)]
fn two_choices<'a, C, R: Rng>(pool: &'a [(C, u32)], rng: &mut R) -> Option<&'a C> {
    two_choices_by(pool, |entry| entry.1, rng).map(|entry| &entry.0)
}

/// Of `pool`, the entry with more `free` of two distinct random entries (the
/// first on a tie); the only entry of a pool of one.
fn two_choices_by<'a, T, K: Ord, R: Rng>(
    pool: &'a [T],
    free: impl Fn(&T) -> K,
    rng: &mut R,
) -> Option<&'a T> {
    match pool.len() {
        0 => None,
        1 => Some(&pool[0]),
        len => {
            let first = rng.gen_range(0..len);
            // A second index uniform over the others.
            let second = (first + rng.gen_range(1..len)) % len;
            let (a, b) = (&pool[first], &pool[second]);
            Some(if free(b) > free(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn of_two_cells_the_freer_is_always_chosen() {
        let mut rng = StdRng::seed_from_u64(7);
        let pool = [("a", 1), ("b", 5)];
        for _ in 0..100 {
            assert_eq!(two_choices(&pool, &mut rng), Some(&"b"));
        }
    }

    #[test]
    fn the_fullest_cell_is_never_chosen_and_the_freest_most_often() {
        let mut rng = StdRng::seed_from_u64(11);
        let pool = [("a", 0), ("b", 4), ("c", 8), ("d", 2)];
        let mut counts = [0_u32; 4];
        for _ in 0..4_000 {
            let chosen = two_choices(&pool, &mut rng).unwrap();
            let at = pool.iter().position(|(cell, _)| cell == chosen).unwrap();
            counts[at] += 1;
        }
        assert_eq!(counts[0], 0, "the full cell loses every pair it is in");
        assert!(counts[2] > counts[1] && counts[1] > counts[3], "{counts:?}");
    }

    fn candidate(
        cell: &'static str,
        free_slots: u32,
        head_levels: usize,
    ) -> Candidate<&'static str> {
        Candidate {
            cell,
            free_slots,
            queued: 0,
            head_levels,
        }
    }

    #[test]
    fn of_two_full_cells_the_shorter_queue_is_always_chosen() {
        let mut rng = StdRng::seed_from_u64(13);
        let queued = |cell, queued| Candidate {
            queued,
            ..candidate(cell, 0, 0)
        };
        let pool = [queued("a", 9), queued("b", 2)];
        for _ in 0..100 {
            assert_eq!(choose(&pool, &mut rng), Some(&"b"));
        }
        // A free slot counts before any queue.
        let free_but_queued = Candidate {
            queued: 5,
            ..candidate("b", 1, 0)
        };
        let pool = [queued("a", 0), free_but_queued];
        for _ in 0..100 {
            assert_eq!(choose(&pool, &mut rng), Some(&"b"));
        }
    }

    #[test]
    fn the_cell_holding_the_longest_head_with_a_free_slot_is_chosen() {
        let mut rng = StdRng::seed_from_u64(3);
        let pool = [
            candidate("a", 9, 0),
            candidate("b", 1, 2),
            candidate("c", 5, 1),
            candidate("d", 0, 4),
        ];
        for _ in 0..100 {
            // d holds more but is full; b holds the longest head of the rest.
            assert_eq!(choose(&pool, &mut rng), Some(&"b"));
        }
    }

    #[test]
    fn without_a_free_holder_the_freer_of_two_is_chosen() {
        let mut rng = StdRng::seed_from_u64(5);
        let pool = [
            candidate("a", 1, 0),
            candidate("b", 5, 0),
            candidate("c", 0, 3),
        ];
        let mut counts = [0_u32; 3];
        for _ in 0..3_000 {
            let chosen = choose(&pool, &mut rng).unwrap();
            counts[pool.iter().position(|c| &c.cell == chosen).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "the full cell loses every pair it is in");
        assert!(counts[1] > counts[0] && counts[0] > 0, "{counts:?}");
    }

    #[test]
    fn an_empty_pool_has_no_choice_and_a_pool_of_one_its_only_cell() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(two_choices::<&str, _>(&[], &mut rng), None);
        assert_eq!(two_choices(&[("a", 0)], &mut rng), Some(&"a"));
    }
}
