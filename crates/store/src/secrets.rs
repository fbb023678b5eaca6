//! API keys and node credentials: generation and hashing.
//!
//! Both are 192-bit random secrets shown once; only their SHA-256 is stored.
//! A fast hash is enough because the secrets are random, not chosen by people.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of tenant API keys, so a leaked key is recognisable.
pub const API_KEY_PREFIX: &str = "fg-";

/// Prefix of node credentials.
pub const NODE_CREDENTIAL_PREFIX: &str = "fgn-";

const SECRET_BYTES: usize = 24;

/// A new random secret with the given prefix.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// The stored form of a secret.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |acc, (l, r)| acc | (l ^ r))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_prefixed() {
        let first = generate(API_KEY_PREFIX);
        let second = generate(API_KEY_PREFIX);
        assert_ne!(first, second);
        assert!(first.starts_with(API_KEY_PREFIX));
        assert_eq!(first.len(), API_KEY_PREFIX.len() + 2 * SECRET_BYTES);
    }

    #[test]
    fn hash_comparison() {
        let key = generate(NODE_CREDENTIAL_PREFIX);
        assert!(hashes_equal(&hash(&key), &hash(&key)));
        assert!(!hashes_equal(&hash(&key), &hash("other")));
        assert!(!hashes_equal("ab", "abc"));
    }
}
