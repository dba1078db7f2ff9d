//! Deterministic bulk data and streaming hashes.
//!
//! Tests push 100+ MB bodies through the proxy; generating them from `(seed, offset)` lets
//! the sender and the verifier agree on content in constant memory, and the byte at a given
//! offset does not depend on how the stream was chunked.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};

/// Default chunk size of [`PatternStream`] (64 KiB).
pub const CHUNK: usize = 64 * 1024;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn word(seed: u64, index: u64) -> [u8; 8] {
    splitmix64(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes()
}

/// Fills `buf` with the pattern bytes for `seed` starting at absolute `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let w = word(seed, pos / 8);
        let start = (pos % 8) as usize;
        let take = (8 - start).min(buf.len() - i);
        buf[i..i + take].copy_from_slice(&w[start..start + take]);
        i += take;
        pos += take as u64;
    }
}

/// `len` bytes of deterministic pseudo-random data for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, 0, &mut v);
    v
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Incremental length + SHA-256, for verifying streamed bodies in constant memory.
#[derive(Clone, Default)]
pub struct StreamDigest {
    hasher: Sha256,
    len: u64,
}

impl StreamDigest {
    /// A fresh digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hex SHA-256 of everything fed so far (does not consume the digest).
    pub fn hex(&self) -> String {
        hex(&self.hasher.clone().finalize())
    }
}

/// SHA-256 (hex) of `pattern(seed, len)` computed in constant memory.
pub fn pattern_sha256(seed: u64, len: u64) -> String {
    let mut d = StreamDigest::new();
    for chunk in PatternStream::new(seed, len) {
        d.update(&chunk);
    }
    d.hex()
}

/// The pattern for `seed` as a sequence of [`Bytes`] chunks, `len` bytes in total.
///
/// It is both an [`Iterator`] and an [`http_body::Body`] with an exact size hint (so a
/// hyper client sends it with `Content-Length`).
#[derive(Clone, Debug)]
pub struct PatternStream {
    seed: u64,
    len: u64,
    pos: u64,
    chunk: usize,
}

impl PatternStream {
    /// `len` bytes of pattern `seed` in [`CHUNK`]-sized pieces.
    pub fn new(seed: u64, len: u64) -> Self {
        Self::with_chunk(seed, len, CHUNK)
    }

    /// Same with a custom chunk size (at least 1).
    pub fn with_chunk(seed: u64, len: u64, chunk: usize) -> Self {
        PatternStream {
            seed,
            len,
            pos: 0,
            chunk: chunk.max(1),
        }
    }

    /// Bytes not yet produced.
    pub fn remaining(&self) -> u64 {
        self.len - self.pos
    }
}

impl Iterator for PatternStream {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let left = self.remaining();
        if left == 0 {
            return None;
        }
        let n = left.min(self.chunk as u64) as usize;
        let mut buf = vec![0u8; n];
        fill(self.seed, self.pos, &mut buf);
        self.pos += n as u64;
        Some(Bytes::from(buf))
    }
}

impl Body for PatternStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().next().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_content() {
        let whole = pattern(7, 100_003);
        let mut joined = Vec::new();
        for c in PatternStream::with_chunk(7, 100_003, 999) {
            joined.extend_from_slice(&c);
        }
        assert_eq!(whole, joined);
        assert_eq!(pattern_sha256(7, 100_003), sha256_hex(&whole));
        assert_ne!(pattern(8, 64), pattern(7, 64));
    }

    #[test]
    fn sha_known_value() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
