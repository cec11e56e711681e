//! Masking of secret values in job output (sans-IO, shared by the agent and the control plane's
//! SSH fallback).
//!
//! A [`Masker`] holds the values of an event's secret environment variables and replaces every
//! occurrence of one with [`MASK`]. Output arrives in chunks, so a value may be split across
//! two of them: a [`StreamMasker`] (one per output stream) holds back the tail of a chunk while
//! it could still be the start of a value — at most (longest value − 1) bytes, and only when
//! that tail really is a prefix of a value — and [`StreamMasker::finish`] flushes it at the
//! end. Where several values match at one position the longest wins.
//!
//! Values shorter than [`MIN_SECRET_LEN`] bytes are not masked: masking `1` or `on` everywhere
//! would destroy the output while hiding nothing.
//!
//! Matching is a plain scan that only compares at positions whose byte starts some value, so it
//! costs about one byte comparison per output byte for ordinary output.

use std::fmt;
use std::sync::Arc;

/// What a masked value is replaced with.
pub const MASK: &[u8] = b"***";

/// Values shorter than this (in bytes) are not masked.
pub const MIN_SECRET_LEN: usize = 4;

/// The secret values to mask. Cheap to clone; its `Debug` never shows a value.
#[derive(Clone, Default)]
pub struct Masker {
    inner: Arc<MaskerInner>,
}

#[derive(Default)]
struct MaskerInner {
    /// Distinct values of at least [`MIN_SECRET_LEN`] bytes, longest first.
    secrets: Vec<Vec<u8>>,
    /// `starts[b]`: some value starts with byte `b`.
    starts: Vec<bool>,
    longest: usize,
}

impl fmt::Debug for Masker {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Masker({} values)", self.inner.secrets.len())
    }
}

impl Masker {
    /// A masker for `values`; those shorter than [`MIN_SECRET_LEN`] bytes are ignored.
    pub fn new<I, V>(values: I) -> Masker
    where
        I: IntoIterator<Item = V>,
        V: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> = values
            .into_iter()
            .map(|value| value.as_ref().to_vec())
            .filter(|value| value.len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let mut starts = vec![false; 256];
        for secret in &secrets {
            starts[usize::from(secret[0])] = true;
        }
        let longest = secrets.first().map_or(0, Vec::len);
        Masker {
            inner: Arc::new(MaskerInner {
                secrets,
                starts,
                longest,
            }),
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.inner.secrets.is_empty()
    }

    /// Masks a complete text (no value continues past its end).
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        self.scan(data, true, &mut out);
        out
    }

    /// Masks a complete UTF-8 text.
    pub fn mask_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        // Masking replaces whole values (valid UTF-8 of their own, or not matching a UTF-8
        // text at a character boundary) with ASCII, but a value that is not UTF-8 could match
        // inside a character; the lossy conversion keeps the result valid either way.
        String::from_utf8_lossy(&self.mask(text.as_bytes())).into_owned()
    }

    /// Whether `data` contains one of the values.
    pub fn contains_secret(&self, data: &[u8]) -> bool {
        (0..data.len()).any(|at| self.full_match(data, at).is_some())
    }

    /// A masker for one output stream whose chunks may split a value.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker {
            masker: self.clone(),
            carry: Vec::new(),
        }
    }

    /// The longest value matching at `at`, entirely inside `data`.
    fn full_match(&self, data: &[u8], at: usize) -> Option<usize> {
        if !self.inner.starts[usize::from(data[at])] {
            return None;
        }
        let rest = &data[at..];
        self.inner
            .secrets
            .iter()
            .find(|secret| rest.starts_with(secret))
            .map(Vec::len)
    }

    /// Whether a value longer than `longer_than` bytes could start at `at` and continue past the
    /// end of `data` (`data[at..]` is a proper prefix of it).
    fn partial_match(&self, data: &[u8], at: usize, longer_than: usize) -> bool {
        if !self.inner.starts[usize::from(data[at])] {
            return false;
        }
        let rest = &data[at..];
        self.inner.secrets.iter().any(|secret| {
            secret.len() > rest.len() && secret.len() > longer_than && secret.starts_with(rest)
        })
    }

    /// Masks `data` into `out`. Unless `complete`, stops at the first position where a value
    /// could still continue past the end and returns it (the bytes from there on are not
    /// written); otherwise returns `data.len()`.
    fn scan(&self, data: &[u8], complete: bool, out: &mut Vec<u8>) -> usize {
        if self.is_empty() {
            out.extend_from_slice(data);
            return data.len();
        }
        // Only the last (longest − 1) positions can start a value that continues past the end.
        let tail_from = data
            .len()
            .saturating_sub(self.inner.longest.saturating_sub(1));
        let mut at = 0;
        let mut plain_from = 0;
        while at < data.len() {
            let matched = self.full_match(data, at);
            if !complete && at >= tail_from && self.partial_match(data, at, matched.unwrap_or(0)) {
                out.extend_from_slice(&data[plain_from..at]);
                return at;
            }
            match matched {
                Some(len) => {
                    out.extend_from_slice(&data[plain_from..at]);
                    out.extend_from_slice(MASK);
                    at += len;
                    plain_from = at;
                }
                None => at += 1,
            }
        }
        out.extend_from_slice(&data[plain_from..]);
        data.len()
    }
}

/// Masks one stream of output chunk by chunk, holding back a tail that could be the start of a
/// value until the next chunk (or [`finish`](StreamMasker::finish)) shows whether it is.
#[derive(Debug, Clone, Default)]
pub struct StreamMasker {
    masker: Masker,
    carry: Vec<u8>,
}

impl StreamMasker {
    /// Masks the next chunk; returns what may be written now (possibly empty).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.masker.is_empty() {
            return data.to_vec();
        }
        let mut buffer = std::mem::take(&mut self.carry);
        buffer.extend_from_slice(data);
        let mut out = Vec::with_capacity(buffer.len());
        let done = self.masker.scan(&buffer, false, &mut out);
        self.carry = buffer.split_off(done);
        out
    }

    /// The end of the stream: returns the held-back tail, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        self.masker.mask(&carry)
    }

    /// Bytes held back.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    fn streamed(masker: &Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut stream = masker.stream();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(stream.push(chunk));
        }
        out.extend(stream.finish());
        out
    }

    #[test]
    fn values_are_replaced_and_short_ones_ignored() {
        let masker = Masker::new(["hunter22", "abc", "s3cr3t-value"]);
        assert_eq!(
            masker.mask(b"pw=hunter22 abc s3cr3t-value!"),
            b"pw=*** abc ***!".to_vec()
        );
        assert_eq!(masker.mask_str("hunter22hunter22"), "******");
        assert!(masker.contains_secret(b"xx hunter22"));
        assert!(!masker.contains_secret(b"hunter2 abc"));
        assert!(!format!("{masker:?}").contains("hunter"));
        let empty = Masker::new(Vec::<String>::new());
        assert!(empty.is_empty());
        assert_eq!(empty.mask(b"hunter22"), b"hunter22".to_vec());
    }

    #[test]
    fn the_longest_value_wins_and_waits_for_more_input() {
        let masker = Masker::new(["pass", "password1"]);
        assert_eq!(
            masker.mask(b"password1 pass passwo"),
            b"*** *** ***wo".to_vec()
        );
        // "passw" could still become "password1": held back, not masked as "pass" + "w".
        assert_eq!(
            streamed(&masker, &[b"a passw", b"ord1 b"]),
            b"a *** b".to_vec()
        );
        assert_eq!(streamed(&masker, &[b"a passw", b"x"]), b"a ***wx".to_vec());
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let masker = Masker::new(["CANARY-1234567890"]);
        let mut stream = masker.stream();
        assert_eq!(stream.push(b"start CANARY-12"), b"start ".to_vec());
        assert_eq!(stream.pending(), 9);
        assert_eq!(stream.push(b"34567890 end"), b"*** end".to_vec());
        assert_eq!(stream.pending(), 0);
        // A tail that cannot start the value is not held back.
        assert_eq!(
            stream.push(b"no secret here\n"),
            b"no secret here\n".to_vec()
        );
        assert_eq!(stream.push(b"CANARY"), Vec::<u8>::new());
        assert_eq!(stream.finish(), b"CANARY".to_vec());
    }

    #[test]
    fn random_chunking_never_leaks_a_value() {
        let secrets = ["0123456789abcdef", "abcdXYZ", "zzzz"];
        let masker = Masker::new(secrets);
        let mut rng = rand::thread_rng();
        for _ in 0..500 {
            let mut text = Vec::new();
            for _ in 0..rng.gen_range(0..20) {
                match rng.gen_range(0..4) {
                    0 => text.extend_from_slice(secrets[rng.gen_range(0..3)].as_bytes()),
                    1 => text.extend_from_slice(b"0123"),
                    2 => text.push(b'z'),
                    _ => text.extend((0..rng.gen_range(0..8)).map(|_| rng.gen_range(b'a'..=b'z'))),
                }
            }
            let whole = masker.mask(&text);
            let mut chunks = Vec::new();
            let mut rest = text.as_slice();
            while !rest.is_empty() {
                let cut = rng.gen_range(1..=rest.len());
                chunks.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            let pieces = streamed(&masker, &chunks);
            assert_eq!(pieces, whole, "chunking changed the result of {text:?}");
            assert!(!masker.contains_secret(&whole), "{whole:?} leaks a value");
        }
    }
}
