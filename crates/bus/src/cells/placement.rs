//! The power of two choices: of two cells picked at random, the one with
//! more free slots for the model. Close to the best cell's load without
//! every gateway piling onto the same "best" cell between two summaries.

use rand::Rng;

/// Of `pool` (a cell and its free slots), the freer of two distinct random
/// entries (the first on a tie); the only entry of a pool of one.
pub(super) fn two_choices<'a, C, R: Rng>(pool: &'a [(C, u32)], rng: &mut R) -> Option<&'a C> {
    match pool.len() {
        0 => None,
        1 => Some(&pool[0].0),
        len => {
            let first = rng.gen_range(0..len);
            // A second index uniform over the others.
            let second = (first + rng.gen_range(1..len)) % len;
            let (a, b) = (&pool[first], &pool[second]);
            Some(if b.1 > a.1 { &b.0 } else { &a.0 })
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

    #[test]
    fn an_empty_pool_has_no_choice_and_a_pool_of_one_its_only_cell() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(two_choices::<&str, _>(&[], &mut rng), None);
        assert_eq!(two_choices(&[("a", 0)], &mut rng), Some(&"a"));
    }
}
