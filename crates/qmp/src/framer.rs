//! Splits a byte stream into JSON texts the way QEMU's streaming parser does: a message
//! need not end with a newline, several may arrive in one read and one may span many reads.
//! The framer only tracks nesting depth and string state (so braces inside strings do not
//! count); whether a frame is valid JSON is for `serde_json` to say afterwards. The frame
//! being assembled never exceeds the configured limit, so a hostile peer cannot make it
//! allocate more than that.

/// A frame grew past the limit; the stream cannot be resynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLarge;

/// What the framer is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames: whitespace is skipped.
    Idle,
    /// Inside an object or array (`depth` >= 1), outside strings.
    Container,
    /// Inside a string; `depth` is 0 for a top-level string.
    Str { escaped: bool },
    /// A top-level scalar (`42`, `true`, garbage): ends at whitespace or a delimiter.
    Scalar,
}

/// Capacity kept across frames; anything bigger is released after the frame completes so
/// an idle client does not pin a large buffer.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Incremental JSON-text splitter with a size bound.
#[derive(Debug)]
pub(crate) struct Framer {
    buf: Vec<u8>,
    state: State,
    depth: usize,
    max: usize,
    complete: bool,
}

fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Framer {
    /// A framer whose frames hold at most `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Framer {
            buf: Vec::new(),
            state: State::Idle,
            depth: 0,
            max,
            complete: false,
        }
    }

    /// True while part of a frame has been seen but not its end.
    pub(crate) fn is_partial(&self) -> bool {
        !self.complete && self.state != State::Idle
    }

    /// The completed frame (valid after [`Framer::feed`] returned `true`).
    pub(crate) fn frame(&self) -> &[u8] {
        &self.buf
    }

    /// Forgets the completed frame and starts the next one.
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        self.state = State::Idle;
        self.depth = 0;
        self.complete = false;
    }

    /// Consumes bytes of `input` until a frame completes or the input ends. Returns how many
    /// bytes were consumed and whether a frame is complete (then read it with
    /// [`Framer::frame`] and call [`Framer::reset`] before feeding more).
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<(usize, bool), TooLarge> {
        debug_assert!(!self.complete, "reset() the completed frame first");
        for (i, &b) in input.iter().enumerate() {
            if self.state == State::Scalar && (is_json_ws(b) || b"{}[]\",:".contains(&b)) {
                // The delimiter belongs to what follows, so it is not consumed.
                self.complete = true;
                return Ok((i, true));
            }
            if self.state == State::Idle && is_json_ws(b) {
                continue;
            }
            if self.buf.len() >= self.max {
                return Err(TooLarge);
            }
            self.buf.push(b);
            if self.step(b) {
                self.complete = true;
                return Ok((i + 1, true));
            }
        }
        Ok((input.len(), false))
    }

    /// Advances the state machine over one stored byte; true when it ends a frame.
    fn step(&mut self, b: u8) -> bool {
        match self.state {
            State::Idle => match b {
                b'{' | b'[' => {
                    self.depth = 1;
                    self.state = State::Container;
                    false
                }
                b'"' => {
                    self.state = State::Str { escaped: false };
                    false
                }
                // A stray closer is a frame of its own; the parser reports it.
                b'}' | b']' => true,
                _ => {
                    self.state = State::Scalar;
                    false
                }
            },
            State::Str { escaped: true } => {
                self.state = State::Str { escaped: false };
                false
            }
            State::Str { escaped: false } => match b {
                b'\\' => {
                    self.state = State::Str { escaped: true };
                    false
                }
                b'"' => {
                    self.state = State::Container;
                    self.depth == 0
                }
                _ => false,
            },
            State::Container => match b {
                b'"' => {
                    self.state = State::Str { escaped: false };
                    false
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    false
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    self.depth == 0
                }
                _ => false,
            },
            State::Scalar => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after another and returns every completed frame.
    fn frames(max: usize, chunks: &[&[u8]]) -> Result<Vec<String>, TooLarge> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            while !rest.is_empty() {
                let (used, done) = f.feed(rest)?;
                rest = &rest[used..];
                if done {
                    out.push(String::from_utf8_lossy(f.frame()).into_owned());
                    f.reset();
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn several_objects_in_one_chunk_are_split_without_newlines() {
        let got = frames(1024, &[br#"{"a":1}{"b":[2,{"c":3}]}  {"d":"}"}"#]).unwrap();
        assert_eq!(
            got,
            vec![r#"{"a":1}"#, r#"{"b":[2,{"c":3}]}"#, r#"{"d":"}"}"#]
        );
    }

    #[test]
    fn one_object_split_byte_by_byte_is_one_frame() {
        let text = br#"{"execute": "x", "arguments": {"s": "a\"}{\\"}}"#;
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let got = frames(1024, &chunks).unwrap();
        assert_eq!(got, vec![String::from_utf8_lossy(text).into_owned()]);
    }

    #[test]
    fn top_level_scalars_and_stray_closers_are_frames_of_their_own() {
        let got = frames(1024, &[b"42 \"s{\" ", b"}true{}"]).unwrap();
        assert_eq!(got, vec!["42", "\"s{\"", "}", "true", "{}"]);
    }

    #[test]
    fn a_scalar_split_across_chunks_stays_one_frame() {
        let got = frames(1024, &[b"12", b"34\n"]).unwrap();
        assert_eq!(got, vec!["1234"]);
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_growing_past_it() {
        let mut f = Framer::new(8);
        assert_eq!(f.feed(b"{\"abcd"), Ok((6, false)));
        assert!(f.is_partial());
        assert_eq!(f.feed(b"efghij\"}"), Err(TooLarge));
        assert!(f.buf.len() <= 8);
        // Exactly at the limit is fine.
        assert_eq!(frames(8, &[b"{\"abcd\"}"]).unwrap(), vec!["{\"abcd\"}"]);
    }

    #[test]
    fn whitespace_between_frames_is_not_partial() {
        let mut f = Framer::new(64);
        assert_eq!(f.feed(b" \r\n\t "), Ok((5, false)));
        assert!(!f.is_partial());
    }
}
