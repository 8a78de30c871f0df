//! Client commands: a verb and an optional argument.

use super::line::next_line;
use super::FtpError;

/// Longest verb accepted (RFC 959 verbs have 3 or 4 letters; extensions
/// such as `XMKD` or `HOST` are no longer).
const MAX_VERB: usize = 8;

/// One command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The verb in upper case (`USER`, `PASV`, ...).
    pub verb: String,
    /// Everything after the first space, as sent; `None` when there was no
    /// space.
    pub arg: Option<Vec<u8>>,
}

/// Telnet "interpret as command" (RFC 854): clients put Telnet sequences
/// such as IAC IP, IAC DM before ABOR.
const IAC: u8 = 0xff;

impl Command {
    /// Parses the first command in `buf` (see the crate's conventions).
    /// Telnet IAC sequences are dropped (IAC IAC stands for one 0xff byte);
    /// the verb is case-insensitive.
    pub fn parse(buf: &[u8]) -> Result<Option<(Command, usize)>, FtpError> {
        let Some((raw, used)) = next_line(buf)? else {
            return Ok(None);
        };
        let line = without_telnet(raw);
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (&line[..space], Some(line[space + 1..].to_vec())),
            None => (&line[..], None),
        };
        if verb.is_empty() {
            return Err(FtpError::Command("no verb"));
        }
        if verb.len() > MAX_VERB || !verb.iter().all(u8::is_ascii_alphabetic) {
            return Err(FtpError::Command(
                "the verb is not a word of up to 8 letters",
            ));
        }
        let verb = String::from_utf8(verb.to_ascii_uppercase()).expect("ASCII letters");
        Ok(Some((Command { verb, arg }, used)))
    }

    /// The argument as text, when it is UTF-8.
    pub fn arg_str(&self) -> Option<&str> {
        self.arg
            .as_deref()
            .and_then(|a| std::str::from_utf8(a).ok())
    }

    /// The command line as sent on the wire, CRLF included; a 0xff byte in
    /// the argument is doubled, as Telnet requires.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.verb.as_bytes().to_vec();
        if let Some(arg) = &self.arg {
            out.push(b' ');
            for &b in arg {
                out.push(b);
                if b == IAC {
                    out.push(IAC);
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn without_telnet(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut bytes = line.iter().copied();
    while let Some(b) = bytes.next() {
        if b != IAC {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(IAC) => out.push(IAC),
            // WILL/WONT/DO/DONT carry an option byte.
            Some(251..=254) => {
                bytes.next();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Command {
        Command::parse(text).unwrap().unwrap().0
    }

    #[test]
    fn verbs_and_arguments() {
        let c = parse(b"user alice@ftp.example.com:2121\r\n");
        assert_eq!(c.verb, "USER");
        assert_eq!(c.arg_str(), Some("alice@ftp.example.com:2121"));
        assert_eq!(parse(b"PASV\r\n").arg, None);
        // Spaces inside an argument are kept, as are non-UTF-8 names.
        assert_eq!(
            parse(b"RETR my file.txt\r\n").arg_str(),
            Some("my file.txt")
        );
        assert_eq!(parse(b"RETR caf\xe9\r\n").arg.unwrap(), b"caf\xe9");
    }

    #[test]
    fn telnet_sequences_are_dropped() {
        assert_eq!(parse(b"\xff\xf4\xff\xf2ABOR\r\n").verb, "ABOR");
        assert_eq!(parse(b"RETR a\xff\xffb\r\n").arg.unwrap(), b"a\xffb");
    }

    #[test]
    fn bad_verbs_fail() {
        assert!(Command::parse(b"\r\n").is_err());
        assert!(Command::parse(b" USER a\r\n").is_err());
        assert!(Command::parse(b"US3R a\r\n").is_err());
        assert!(Command::parse(b"ABCDEFGHI\r\n").is_err());
    }
}
