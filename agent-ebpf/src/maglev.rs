//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4): the lookup table of one backend set. Pure.
//!
//! Each backend's preference list is a permutation of the table's `M` slots (`M` prime):
//! `offset = h1(name) mod M`, `skip = h2(name) mod (M - 1) + 1`, the j-th preference is
//! `(offset + j * skip) mod M`. Backends take turns claiming their next preferred free
//! slot until the table is full, so each holds `M / N` slots give or take one, and
//! removing one of `N` backends moves little more than its own `1 / N` of the table.
//! Backends are identified by `ip:port`, so the table does not depend on the order of
//! the set, only on its members.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};

/// The default table size, a prime (as Cilium's default).
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// The largest table size accepted.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The size is not a prime in `2..=MAX_TABLE_SIZE`.
    #[error("Maglev table size {0} is not a prime between 2 and {MAX_TABLE_SIZE}")]
    Size(u32),
    /// More backends than the table has entries (or than a slot index can name).
    #[error("{backends} backends do not fit a Maglev table of {size} entries")]
    TooManyBackends { backends: usize, size: u32 },
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Checks a table size given on the command line.
pub fn table_size(size: u32) -> Result<u32, MaglevError> {
    if size <= MAX_TABLE_SIZE && is_prime(size) {
        Ok(size)
    } else {
        Err(MaglevError::Size(size))
    }
}

fn offset_and_skip(backend: &SocketAddr, size: u32) -> (u64, u64) {
    let digest = Sha256::digest(backend.to_string().as_bytes());
    let h1 = u64::from_be_bytes(digest[0..8].try_into().expect("8 bytes"));
    let h2 = u64::from_be_bytes(digest[8..16].try_into().expect("8 bytes"));
    let m = u64::from(size);
    (h1 % m, h2 % (m - 1) + 1)
}

/// The table of `size` entries for `backends`: entry `i` is an index into `backends`.
pub fn build(backends: &[SocketAddr], size: u32) -> Result<Vec<u16>, MaglevError> {
    table_size(size)?;
    let n = backends.len();
    if n == 0 || n > size as usize || n > usize::from(u16::MAX) {
        return Err(MaglevError::TooManyBackends { backends: n, size });
    }
    // Take turns in name order, so that the table depends only on the set.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| backends[i].to_string());
    let prefs: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| offset_and_skip(&backends[i], size))
        .collect();
    let m = u64::from(size);
    let mut next = vec![0u64; n];
    let mut table = vec![u16::MAX; size as usize];
    let mut filled = 0usize;
    loop {
        for (turn, &(offset, skip)) in prefs.iter().enumerate() {
            let mut slot = (offset + next[turn] * skip) % m;
            while table[slot as usize] != u16::MAX {
                next[turn] += 1;
                slot = (offset + next[turn] * skip) % m;
            }
            table[slot as usize] = order[turn] as u16;
            next[turn] += 1;
            filled += 1;
            if filled == size as usize {
                return Ok(table);
            }
        }
    }
}

/// A short digest of a table, for the read-back notation (`maglev 16381 3f2a…`).
pub fn digest(table: &[u16], backends: &[SocketAddr]) -> String {
    let mut hasher = Sha256::new();
    for entry in table {
        let name = backends
            .get(usize::from(*entry))
            .map_or_else(|| "?".to_string(), ToString::to_string);
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                format!("10.244.{}.{}:8080", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn shares(table: &[u16], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for entry in table {
            counts[usize::from(*entry)] += 1;
        }
        counts
    }

    #[test]
    fn each_backend_holds_its_fair_share_within_one_percent() {
        for n in [2, 3, 7, 10, 50, 100] {
            let table = build(&backends(n), DEFAULT_TABLE_SIZE).unwrap();
            let fair = f64::from(DEFAULT_TABLE_SIZE) / n as f64;
            let counts = shares(&table, n);
            for (i, count) in counts.iter().enumerate() {
                let off = (*count as f64 - fair).abs() / fair;
                assert!(
                    off <= 0.01,
                    "n={n}: backend {i} holds {count}, fair {fair:.1}"
                );
            }
            // The algorithm's own bound: shares differ by at most one entry.
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {min}..{max}");
        }
    }

    /// Fraction of entries that change owner between two tables, by backend name.
    fn moved(a: &[u16], a_backends: &[SocketAddr], b: &[u16], b_backends: &[SocketAddr]) -> f64 {
        let changed = a
            .iter()
            .zip(b)
            .filter(|(x, y)| a_backends[usize::from(**x)] != b_backends[usize::from(**y)])
            .count();
        changed as f64 / a.len() as f64
    }

    /// Disruption grows as the table shrinks relative to the set (the paper's §5.3): with
    /// `M >= 800 N` removing a backend moves at most 1.2 times its own share; smaller
    /// ratios are printed (16381 entries, 100 backends: 2.3 % for a 1 % share).
    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_table() {
        for (n, size) in [
            (5, DEFAULT_TABLE_SIZE),
            (10, DEFAULT_TABLE_SIZE),
            (20, DEFAULT_TABLE_SIZE),
            (100, DEFAULT_TABLE_SIZE),
            (100, 65537),
            (1000, 65537),
        ] {
            let before = backends(n);
            let table = build(&before, size).unwrap();
            let mut after = before.clone();
            after.remove(n / 2);
            let next = build(&after, size).unwrap();
            let fraction = moved(&table, &before, &next, &after);
            let own = 1.0 / n as f64;
            eprintln!(
                "n={n} M={size}: removing one backend moved {:.2}% (its own share {:.2}%)",
                100.0 * fraction,
                100.0 * own
            );
            assert!(fraction >= own * 0.99, "n={n}: {fraction}");
            if size as usize >= 800 * n {
                assert!(
                    fraction <= own * 1.2,
                    "n={n}: moved {fraction}, own share {own}"
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_new_share() {
        let before = backends(10);
        let mut after = before.clone();
        after.push("10.250.0.1:8080".parse().unwrap());
        let a = build(&before, DEFAULT_TABLE_SIZE).unwrap();
        let b = build(&after, DEFAULT_TABLE_SIZE).unwrap();
        let fraction = moved(&a, &before, &b, &after);
        assert!(fraction <= 1.5 / 11.0, "{fraction}");
    }

    #[test]
    fn the_table_depends_on_the_members_not_their_order() {
        let set = backends(7);
        let mut reversed = set.clone();
        reversed.reverse();
        let a = build(&set, 251).unwrap();
        let b = build(&reversed, 251).unwrap();
        let names = |t: &[u16], s: &[SocketAddr]| -> Vec<SocketAddr> {
            t.iter().map(|i| s[usize::from(*i)]).collect()
        };
        assert_eq!(names(&a, &set), names(&b, &reversed));
        assert_eq!(digest(&a, &set), digest(&b, &reversed));
    }

    #[test]
    fn sizes_must_be_primes_and_backends_must_fit() {
        assert_eq!(table_size(16381), Ok(16381));
        assert_eq!(table_size(65537), Ok(65537));
        assert_eq!(table_size(16384), Err(MaglevError::Size(16384)));
        assert_eq!(table_size(1), Err(MaglevError::Size(1)));
        assert!(table_size(MAX_TABLE_SIZE + 2).is_err());
        assert_eq!(
            build(&backends(5), 3),
            Err(MaglevError::TooManyBackends {
                backends: 5,
                size: 3
            })
        );
        assert!(build(&[], 251).is_err());
    }
}
