//! The TLS 1.3 record layer after the handshake (RFC 8446 section 5), run per direction with
//! `ring::aead`, as kernel TLS offload runs it: rustls does the handshake, then hands over the
//! negotiated traffic keys and sequence numbers, and each half of the channel seals or opens
//! its own records with no lock shared between the directions.
//!
//! A record on the wire is a 5-byte header (outer type `application_data`, legacy version
//! 0x0303, length) and the AEAD ciphertext of `content || inner type || zero padding` plus a
//! 16-byte tag; the nonce is the traffic IV XOR the 64-bit record sequence number, the
//! additional data is the header. Everything a peer can get wrong is a [`RecordError`].

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Record header: outer type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// AEAD tag length of every TLS 1.3 suite.
pub const TAG_LEN: usize = 16;
/// Largest record body a peer may send (2^14 + 256, RFC 8446 section 5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest whole record on the wire.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// Bytes a record adds to its content when sealed: header, inner type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// `ContentType.alert`.
pub const CONTENT_ALERT: u8 = 21;
/// `ContentType.handshake`.
pub const CONTENT_HANDSHAKE: u8 = 22;
/// `ContentType.application_data`.
pub const CONTENT_APPLICATION_DATA: u8 = 23;
/// `AlertDescription.close_notify`.
pub const ALERT_CLOSE_NOTIFY: u8 = 0;
/// `AlertLevel.warning` (close_notify is sent at this level).
const ALERT_LEVEL_WARNING: u8 = 1;
/// The `close_notify` alert's content.
pub const CLOSE_NOTIFY: [u8; 2] = [ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY];
/// `legacy_record_version` of every TLS 1.3 record.
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// Records one AES-GCM key may seal before its confidentiality bound (2^24.5 full-size
/// records, RFC 8446 section 5.5; rustls stops at 2^24 too): 256 GiB of 16 KiB records.
const AES_GCM_RECORD_LIMIT: u64 = 1 << 24;

/// A record the peer sent (or the channel was asked to send) that TLS 1.3 does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record's outer type is not `application_data` (every record after a TLS 1.3
    /// handshake is).
    #[error("TLS record: outer content type {0} (expected application_data, 23)")]
    WrongOuterType(u8),
    /// The record's legacy version is not 0x0303.
    #[error("TLS record: legacy version {0:#06x} (expected 0x0303)")]
    WrongVersion(u16),
    /// The record's length is over 2^14 + 256.
    #[error("TLS record: {0} bytes of ciphertext (at most 16640): record_overflow")]
    Oversized(usize),
    /// The record is too short to hold a tag and an inner content type.
    #[error("TLS record: {0} bytes of ciphertext is shorter than a tag and a content type")]
    Undersized(usize),
    /// The record does not decrypt with the peer's key at this sequence number (altered,
    /// replayed, reordered or forged): bad_record_mac.
    #[error("TLS record {seq}: authentication failed (bad_record_mac)")]
    BadRecordMac {
        /// The sequence number it was expected at.
        seq: u64,
    },
    /// The decrypted record is all padding, with no content type.
    #[error("TLS record: no inner content type (all padding)")]
    NoContentType,
    /// The decrypted content is over 2^14 bytes.
    #[error("TLS record: {0} bytes of plaintext (at most 16384): record_overflow")]
    PlaintextOverflow(usize),
    /// An inner content type the channel does not accept after the handshake.
    #[error("TLS record: unexpected content type {0} after the handshake")]
    UnexpectedContent(u8),
    /// A handshake message after the handshake (a key update or a session ticket; this
    /// channel sends neither and accepts neither).
    #[error("TLS record: post-handshake message type {0} is not supported on this channel")]
    PostHandshake(u8),
    /// An alert other than close_notify, or a malformed alert.
    #[error("TLS: the peer sent alert {description} (level {level})")]
    Alert {
        /// AlertLevel.
        level: u8,
        /// AlertDescription (e.g. 42 bad_certificate, 48 unknown_ca, 20 bad_record_mac).
        description: u8,
    },
    /// The connection ended inside a record.
    #[error("TLS: the connection ended inside a record ({0} bytes of it received)")]
    Truncated(usize),
    /// The connection ended without close_notify (a truncation attack cannot pass for the
    /// end of the stream).
    #[error("TLS: the peer closed the connection without sending close_notify")]
    NoCloseNotify,
    /// This direction's key sealed as many records as its cipher allows; this channel does
    /// not update keys.
    #[error(
        "TLS: {0} records sealed with one key: the cipher's limit (no key update on this channel)"
    )]
    KeyLimit(u64),
    /// The negotiated cipher suite has no implementation here.
    #[error("TLS: the negotiated cipher suite is not supported by the record layer")]
    UnsupportedSuite,
    /// The channel was used after it failed or was closed.
    #[error("TLS: the channel is {0}")]
    Unusable(&'static str),
}

impl From<RecordError> for std::io::Error {
    fn from(e: RecordError) -> Self {
        let kind = match e {
            RecordError::Truncated(_) | RecordError::NoCloseNotify => {
                std::io::ErrorKind::UnexpectedEof
            }
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

/// One direction's traffic key, IV and next sequence number.
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    limit: u64,
}

impl DirectionKey {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, AES_GCM_RECORD_LIMIT)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, AES_GCM_RECORD_LIMIT)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        Self::with(alg, key.as_ref(), iv.as_ref(), seq, limit)
    }

    fn with(
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        let key = UnboundKey::new(alg, key).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(DirectionKey {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The nonce for the current sequence number: the IV XOR the number, right-aligned.
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// Seals records for one direction.
pub struct Sealer(DirectionKey);

impl Sealer {
    /// The sealing side of negotiated traffic secrets, starting at sequence number `seq`.
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        DirectionKey::new(seq, secrets).map(Sealer)
    }

    /// The next record's sequence number.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Appends one record of inner type `content_type` carrying `plain` (at most
    /// [`MAX_PLAINTEXT`] bytes) to `out`, encrypted in place there; `out` grows by
    /// `plain.len() + OVERHEAD`.
    pub fn seal(
        &mut self,
        content_type: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(RecordError::PlaintextOverflow(plain.len()));
        }
        let k = &mut self.0;
        if k.seq >= k.limit {
            return Err(RecordError::KeyLimit(k.seq));
        }
        // At most 2^14 + 17: fits the u16 length field.
        let len = (plain.len() + 1 + TAG_LEN) as u16;
        let start = out.len();
        out.push(CONTENT_APPLICATION_DATA);
        out.extend_from_slice(&LEGACY_VERSION);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(plain);
        out.push(content_type);
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        let tag = k
            .key
            .seal_in_place_separate_tag(k.nonce(), Aad::from(&*header), body)
            // ring refuses only inputs over the AEAD's size limit, far above one record.
            .map_err(|_| RecordError::PlaintextOverflow(plain.len()))?;
        out.extend_from_slice(tag.as_ref());
        k.seq += 1;
        Ok(())
    }
}

/// Opens records of one direction.
pub struct Opener(DirectionKey);

/// What [`Opener::open`] found in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Application data: the plaintext is `record[HEADER_LEN..HEADER_LEN + len]`.
    Data(usize),
    /// The peer's close_notify: the stream ends here.
    CloseNotify,
}

/// The length of the whole record that starts with `header`, checked (outer type, version,
/// length bounds) before anything waits for or allocates its body.
pub fn record_len(header: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    if header[0] != CONTENT_APPLICATION_DATA {
        return Err(RecordError::WrongOuterType(header[0]));
    }
    if header[1..3] != LEGACY_VERSION {
        return Err(RecordError::WrongVersion(u16::from_be_bytes([
            header[1], header[2],
        ])));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Oversized(len));
    }
    if len < TAG_LEN + 1 {
        return Err(RecordError::Undersized(len));
    }
    Ok(HEADER_LEN + len)
}

impl Opener {
    /// The opening side of negotiated traffic secrets, starting at sequence number `seq`.
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        DirectionKey::new(seq, secrets).map(Opener)
    }

    /// The next record's sequence number.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Decrypts one whole record (`record.len()` must be what [`record_len`] returned for
    /// its header) in place. Application data stays in `record` after the header.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let Some(header) = record.first_chunk::<HEADER_LEN>() else {
            return Err(RecordError::Truncated(record.len()));
        };
        let expect = record_len(header)?;
        if expect != record.len() {
            return Err(RecordError::Truncated(record.len()));
        }
        let k = &mut self.0;
        let seq = k.seq;
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let plain = k
            .key
            .open_in_place(k.nonce(), Aad::from(&*header), body)
            .map_err(|_| RecordError::BadRecordMac { seq })?;
        // A record that authenticated is consumed, whatever it holds.
        k.seq += 1;
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        if end > MAX_PLAINTEXT {
            return Err(RecordError::PlaintextOverflow(end));
        }
        match plain[end] {
            CONTENT_APPLICATION_DATA => Ok(Opened::Data(end)),
            CONTENT_ALERT => match plain[..end] {
                [_, ALERT_CLOSE_NOTIFY] => Ok(Opened::CloseNotify),
                [level, description] => Err(RecordError::Alert { level, description }),
                _ => Err(RecordError::UnexpectedContent(CONTENT_ALERT)),
            },
            CONTENT_HANDSHAKE => Err(RecordError::PostHandshake(plain[0])),
            other => Err(RecordError::UnexpectedContent(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(suite: u8) -> DirectionKey {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + suite);
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8 * 13 + 1);
        let (alg, len) = match suite {
            0 => (&aead::AES_128_GCM, 16),
            1 => (&aead::AES_256_GCM, 32),
            _ => (&aead::CHACHA20_POLY1305, 32),
        };
        DirectionKey::with(alg, &key[..len], &iv, 0, u64::MAX).unwrap()
    }

    fn pair(suite: u8) -> (Sealer, Opener) {
        (Sealer(key(suite)), Opener(key(suite)))
    }

    fn sealed(s: &mut Sealer, ct: u8, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(ct, plain, &mut out).unwrap();
        out
    }

    #[test]
    fn records_of_every_size_round_trip_in_every_suite() {
        for suite in 0..3 {
            let (mut s, mut o) = pair(suite);
            for len in [0, 1, 15, 16, 17, 255, 4096, 16383, MAX_PLAINTEXT] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
                let mut rec = sealed(&mut s, CONTENT_APPLICATION_DATA, &plain);
                assert_eq!(rec.len(), len + OVERHEAD);
                let header: [u8; HEADER_LEN] = rec[..HEADER_LEN].try_into().unwrap();
                assert_eq!(record_len(&header), Ok(rec.len()));
                if len > 0 {
                    assert_ne!(&rec[HEADER_LEN..HEADER_LEN + len], &plain[..], "encrypted");
                }
                assert_eq!(o.open(&mut rec), Ok(Opened::Data(len)));
                assert_eq!(&rec[HEADER_LEN..HEADER_LEN + len], &plain[..]);
            }
            assert_eq!(s.seq(), 9);
            assert_eq!(o.seq(), 9);
        }
    }

    #[test]
    fn a_plaintext_over_16_kib_is_refused_before_sealing() {
        let (mut s, _) = pair(0);
        let mut out = Vec::new();
        let e = s.seal(CONTENT_APPLICATION_DATA, &[0; MAX_PLAINTEXT + 1], &mut out);
        assert_eq!(e, Err(RecordError::PlaintextOverflow(MAX_PLAINTEXT + 1)));
        assert!(out.is_empty());
        assert_eq!(s.seq(), 0);
    }

    #[test]
    fn sequence_numbers_continue_and_a_reordered_or_replayed_record_fails() {
        let (mut s, mut o) = pair(1);
        let recs: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| sealed(&mut s, CONTENT_APPLICATION_DATA, &i.to_le_bytes()))
            .collect();
        for (i, r) in recs.iter().take(998).enumerate() {
            let mut r = r.clone();
            assert_eq!(o.open(&mut r), Ok(Opened::Data(4)));
            assert_eq!(r[HEADER_LEN..HEADER_LEN + 4], (i as u32).to_le_bytes());
        }
        // Record 999 where 998 is expected, and a replay of 997.
        let mut late = recs[999].clone();
        assert_eq!(
            o.open(&mut late),
            Err(RecordError::BadRecordMac { seq: 998 })
        );
        let mut replay = recs[997].clone();
        assert_eq!(
            o.open(&mut replay),
            Err(RecordError::BadRecordMac { seq: 998 })
        );
        let mut next = recs[998].clone();
        assert_eq!(o.open(&mut next), Ok(Opened::Data(4)));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_bad_record_mac() {
        let (mut s, _) = pair(0);
        let rec = sealed(&mut s, CONTENT_APPLICATION_DATA, &[0x5a; 100]);
        // Header bits are the additional data; body and tag bits the ciphertext.
        for bit in [3 * 8, 4 * 8 + 7, 5 * 8, 60 * 8 + 3, (rec.len() - 1) * 8] {
            let mut r = rec.clone();
            r[bit / 8] ^= 1 << (bit % 8);
            let (_, mut o) = pair(0);
            let e = o.open(&mut r).unwrap_err();
            assert!(
                matches!(
                    e,
                    RecordError::BadRecordMac { seq: 0 } | RecordError::Truncated(_)
                ),
                "bit {bit}: {e}"
            );
            assert_eq!(o.seq(), 0, "a failed record is not consumed");
        }
    }

    #[test]
    fn headers_are_checked_before_the_body_is_waited_for() {
        assert_eq!(
            record_len(&[22, 3, 3, 0, 40]),
            Err(RecordError::WrongOuterType(22))
        );
        assert_eq!(
            record_len(&[23, 3, 1, 0, 40]),
            Err(RecordError::WrongVersion(0x0301))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x01]),
            Err(RecordError::Oversized(MAX_CIPHERTEXT + 1))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x00]),
            Ok(HEADER_LEN + MAX_CIPHERTEXT)
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0, 16]),
            Err(RecordError::Undersized(16))
        );
    }

    #[test]
    fn inner_types_other_than_data_and_close_notify_are_typed_errors() {
        let (mut s, mut o) = pair(2);
        let mut r = sealed(&mut s, CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]);
        assert_eq!(o.open(&mut r), Err(RecordError::PostHandshake(24)));
        let mut r = sealed(&mut s, CONTENT_ALERT, &[2, 42]);
        assert_eq!(
            o.open(&mut r),
            Err(RecordError::Alert {
                level: 2,
                description: 42
            })
        );
        let mut r = sealed(&mut s, CONTENT_ALERT, &[1, 0, 0]);
        assert_eq!(
            o.open(&mut r),
            Err(RecordError::UnexpectedContent(CONTENT_ALERT))
        );
        let mut r = sealed(&mut s, 20, &[1]);
        assert_eq!(o.open(&mut r), Err(RecordError::UnexpectedContent(20)));
        // All padding: the inner type byte is zero and so is everything before it.
        let mut r = sealed(&mut s, 0, &[0; 32]);
        assert_eq!(o.open(&mut r), Err(RecordError::NoContentType));
        let mut r = sealed(&mut s, CONTENT_ALERT, &CLOSE_NOTIFY);
        assert_eq!(o.open(&mut r), Ok(Opened::CloseNotify));
    }

    #[test]
    fn padding_after_the_content_type_is_stripped() {
        // A peer may pad: content, type, zeros. Sealed here by hand.
        let (mut s, mut o) = pair(0);
        let mut plain = b"padded".to_vec();
        plain.extend_from_slice(&[CONTENT_APPLICATION_DATA, 0, 0, 0, 0]);
        // Sealing `plain` with inner type 0 yields content || 23 || 0 0 0 0 || 0.
        let mut r = sealed(&mut s, 0, &plain);
        assert_eq!(o.open(&mut r), Ok(Opened::Data(6)));
        assert_eq!(&r[HEADER_LEN..HEADER_LEN + 6], b"padded");
    }

    #[test]
    fn a_key_stops_at_its_record_limit() {
        let (mut s, _) = pair(0);
        s.0.limit = 2;
        let mut out = Vec::new();
        s.seal(CONTENT_APPLICATION_DATA, b"a", &mut out).unwrap();
        s.seal(CONTENT_APPLICATION_DATA, b"b", &mut out).unwrap();
        assert_eq!(
            s.seal(CONTENT_APPLICATION_DATA, b"c", &mut out),
            Err(RecordError::KeyLimit(2))
        );
    }

    #[test]
    fn a_truncated_record_is_refused() {
        let (mut s, mut o) = pair(0);
        let rec = sealed(&mut s, CONTENT_APPLICATION_DATA, &[1; 64]);
        let mut short = rec[..rec.len() - 1].to_vec();
        assert_eq!(
            o.open(&mut short),
            Err(RecordError::Truncated(rec.len() - 1))
        );
        assert_eq!(
            o.open(&mut rec[..3].to_vec()),
            Err(RecordError::Truncated(3))
        );
    }
}
