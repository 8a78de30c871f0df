//! Reading one line from a Telnet client (RFC 854 NVT) before a gateway
//! knows where to connect it: Telnet commands are taken out of the text, and
//! option requests are refused, since the gateway itself offers none.
//!
//! Unlike the other parsers here, [`LineDecoder`] keeps state between calls:
//! each input byte is looked at once, so negotiation answers are produced
//! exactly once however the bytes arrive.

use thiserror::Error;

/// Longest line accepted, counted in input bytes (commands included).
pub const MAX_LINE: usize = 1024;
/// Longest option subnegotiation skipped while reading a line.
const MAX_SUBNEGOTIATION: usize = 512;

const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;

/// Why a client's input can never give a line.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TelnetError {
    /// More than [`MAX_LINE`] bytes without a line end, or an overlong
    /// subnegotiation.
    #[error("line too long")]
    TooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Text,
    /// After a CR: LF or NUL completes the line end.
    Cr,
    /// After IAC.
    Command,
    /// After IAC WILL/WONT/DO/DONT: the option byte comes next.
    Option(u8),
    /// Inside IAC SB ... IAC SE.
    Subnegotiation,
    /// IAC seen inside a subnegotiation.
    SubnegotiationIac,
}

/// Decodes the client's bytes into a line of text.
#[derive(Debug)]
pub struct LineDecoder {
    state: State,
    text: Vec<u8>,
    consumed: usize,
    subnegotiation: usize,
}

impl Default for LineDecoder {
    fn default() -> Self {
        LineDecoder {
            state: State::Text,
            text: Vec::new(),
            consumed: 0,
            subnegotiation: 0,
        }
    }
}

impl LineDecoder {
    /// Reads from `input` up to the end of a line (CR LF, CR NUL or LF).
    /// Returns `Ok((Some(line), used))` once a line is complete, where the
    /// bytes after `used` belong to whatever comes next, or `Ok((None,
    /// input.len()))` when it needs more. Answers to option requests
    /// (`DONT` for `WILL`, `WONT` for `DO`) are appended to `replies`.
    pub fn feed(
        &mut self,
        input: &[u8],
        replies: &mut Vec<u8>,
    ) -> Result<(Option<Vec<u8>>, usize), TelnetError> {
        for (i, &byte) in input.iter().enumerate() {
            self.consumed += 1;
            if self.consumed > MAX_LINE {
                return Err(TelnetError::TooLong);
            }
            match (self.state, byte) {
                (State::Cr, b'\n' | 0) => return Ok((Some(self.take()), i + 1)),
                // A bare CR ends the line too; this byte starts the next one.
                (State::Cr, _) => return Ok((Some(self.take()), i)),
                (State::Text, b'\r') => self.state = State::Cr,
                (State::Text, b'\n') => return Ok((Some(self.take()), i + 1)),
                (State::Text, IAC) => self.state = State::Command,
                (State::Text, _) => self.text.push(byte),
                (State::Command, IAC) => {
                    self.text.push(IAC);
                    self.state = State::Text;
                }
                (State::Command, WILL | WONT | DO | DONT) => self.state = State::Option(byte),
                (State::Command, SB) => {
                    self.subnegotiation = 0;
                    self.state = State::Subnegotiation;
                }
                // NOP, GA, IP, AO, AYT, EC, EL, BRK, DM: nothing to do here.
                (State::Command, _) => self.state = State::Text,
                (State::Option(verb), option) => {
                    match verb {
                        WILL => replies.extend_from_slice(&[IAC, DONT, option]),
                        DO => replies.extend_from_slice(&[IAC, WONT, option]),
                        // WONT and DONT ask for what is already so.
                        _ => {}
                    }
                    self.state = State::Text;
                }
                (State::Subnegotiation, IAC) => self.state = State::SubnegotiationIac,
                (State::Subnegotiation, _) => self.count_subnegotiation()?,
                (State::SubnegotiationIac, SE) => self.state = State::Text,
                (State::SubnegotiationIac, _) => {
                    self.count_subnegotiation()?;
                    self.state = State::Subnegotiation;
                }
            }
        }
        Ok((None, input.len()))
    }

    fn count_subnegotiation(&mut self) -> Result<(), TelnetError> {
        self.subnegotiation += 1;
        if self.subnegotiation > MAX_SUBNEGOTIATION {
            return Err(TelnetError::TooLong);
        }
        Ok(())
    }

    fn take(&mut self) -> Vec<u8> {
        self.state = State::Text;
        self.consumed = 0;
        std::mem::take(&mut self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line_of(input: &[u8]) -> (Option<Vec<u8>>, usize, Vec<u8>) {
        let mut replies = Vec::new();
        let (line, used) = LineDecoder::default().feed(input, &mut replies).unwrap();
        (line, used, replies)
    }

    #[test]
    fn line_ends() {
        assert_eq!(
            line_of(b"host 23\r\nrest"),
            (Some(b"host 23".to_vec()), 9, vec![])
        );
        assert_eq!(
            line_of(b"host\r\0rest"),
            (Some(b"host".to_vec()), 6, vec![])
        );
        assert_eq!(line_of(b"host\nrest"), (Some(b"host".to_vec()), 5, vec![]));
        assert_eq!(line_of(b"host\rrest"), (Some(b"host".to_vec()), 5, vec![]));
        assert_eq!(line_of(b"host\r"), (None, 5, vec![]));
    }

    #[test]
    fn negotiation_is_refused_and_removed() {
        // A client opening with WILL TERMINAL-TYPE, DO SUPPRESS-GO-AHEAD and a
        // subnegotiation, then a line with an escaped 0xff.
        let input = b"\xff\xfb\x18\xff\xfd\x03\xff\xfa\x18\x00xterm\xff\xf0a\xff\xffb\r\n";
        let (line, used, replies) = line_of(input);
        assert_eq!(line.unwrap(), b"a\xffb");
        assert_eq!(used, input.len());
        assert_eq!(replies, b"\xff\xfe\x18\xff\xfc\x03");
    }

    #[test]
    fn overlong_input_fails() {
        let mut replies = Vec::new();
        let mut decoder = LineDecoder::default();
        assert_eq!(
            decoder.feed(&[b'a'; MAX_LINE], &mut replies),
            Ok((None, MAX_LINE))
        );
        assert_eq!(decoder.feed(b"a", &mut replies), Err(TelnetError::TooLong));
        let mut endless = b"\xff\xfa\x18".to_vec();
        endless.extend_from_slice(&[b'x'; MAX_SUBNEGOTIATION + 1]);
        assert!(LineDecoder::default().feed(&endless, &mut replies).is_err());
    }

    proptest! {
        /// However the input is split, the same line and the same replies
        /// come out, each reply once.
        #[test]
        fn any_split_gives_the_same_result(input in proptest::collection::vec(any::<u8>(), 0..200),
                                           split in any::<usize>()) {
            let mut whole_replies = Vec::new();
            let whole = LineDecoder::default().feed(&input, &mut whole_replies);
            let split = split % (input.len() + 1);
            let mut decoder = LineDecoder::default();
            let mut replies = Vec::new();
            let pieces = match decoder.feed(&input[..split], &mut replies) {
                Ok((Some(line), used)) => Ok((Some(line), used)),
                Ok((None, _)) => decoder
                    .feed(&input[split..], &mut replies)
                    .map(|(line, used)| (line, used + split)),
                Err(e) => Err(e),
            };
            match (whole, pieces) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(a, b);
                    prop_assert_eq!(whole_replies, replies);
                }
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "{a:?} vs {b:?}"),
            }
        }
    }
}
