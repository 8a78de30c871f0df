//! Server replies: a three-digit code and one or more lines of text.

use super::line::next_line;
use super::FtpError;

/// Longest reply accepted, all lines together (FEAT and HELP replies are the
/// long ones; a few KiB in practice).
pub const MAX_REPLY: usize = 64 * 1024;

/// One reply. Multi-line replies (RFC 959 §4.2) keep every line: the text
/// after `ddd-` on the first, the middle lines as sent, the text after
/// `ddd ` on the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 100 to 599.
    pub code: u16,
    /// At least one line, without line ends.
    pub lines: Vec<Vec<u8>>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![text.as_bytes().to_vec()],
        }
    }

    /// Parses the first reply in `buf` (see the crate's conventions).
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, FtpError> {
        let Some((first, mut used)) = next_line(buf)? else {
            return Ok(None);
        };
        let code = code_of(first).ok_or(FtpError::Reply("no three-digit code"))?;
        let mut lines = vec![first[3..].get(1..).unwrap_or_default().to_vec()];
        match first.get(3) {
            None | Some(b' ') => return Ok(Some((Reply { code, lines }, used))),
            Some(b'-') => {}
            Some(_) => return Err(FtpError::Reply("code not followed by space or '-'")),
        }
        loop {
            if used > MAX_REPLY {
                return Err(FtpError::TooLong);
            }
            let Some((line, n)) = next_line(&buf[used..])? else {
                return if buf.len() > MAX_REPLY {
                    Err(FtpError::TooLong)
                } else {
                    Ok(None)
                };
            };
            used += n;
            if is_last_line(line, code) {
                lines.push(line.get(4..).unwrap_or_default().to_vec());
                return Ok(Some((Reply { code, lines }, used)));
            }
            lines.push(line.to_vec());
        }
    }

    /// The first line's text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        self.lines.first().and_then(|l| std::str::from_utf8(l).ok())
    }

    /// The reply as sent on the wire. A middle line that would read as the
    /// last one (it starts with the code and a space) gets a leading space,
    /// as RFC 959 asks of servers.
    pub fn encode(&self) -> Vec<u8> {
        let code = format!("{:03}", self.code);
        let mut out = Vec::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            if i == 0 || i == last {
                out.extend_from_slice(code.as_bytes());
                out.push(if i == last { b' ' } else { b'-' });
            } else if is_last_line(line, self.code) {
                out.push(b' ');
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        if self.lines.is_empty() {
            out.extend_from_slice(code.as_bytes());
            out.extend_from_slice(b" \r\n");
        }
        out
    }
}

fn code_of(line: &[u8]) -> Option<u16> {
    let digits = line.get(..3)?;
    if !(b'1'..=b'5').contains(&digits[0]) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

fn is_last_line(line: &[u8], code: u16) -> bool {
    code_of(line) == Some(code) && matches!(line.get(3), None | Some(b' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        let (r, used) = Reply::parse(b"220 ready\r\n331 next").unwrap().unwrap();
        assert_eq!((r.code, used, r.text()), (220, 11, Some("ready")));
        let text = b"211-Features:\r\n MDTM\r\n211 not the end\r\n211 End\r\n";
        // "211 not the end" ends it: a server must not start a middle line so.
        let (r, used) = Reply::parse(text).unwrap().unwrap();
        assert_eq!(
            r.lines,
            vec![
                b"Features:".to_vec(),
                b" MDTM".to_vec(),
                b"not the end".to_vec()
            ]
        );
        assert_eq!(used, 39);
        assert_eq!(Reply::parse(b"211-Features:\r\n MDTM\r\n").unwrap(), None);
    }

    #[test]
    fn middle_lines_that_look_final_are_escaped() {
        let reply = Reply {
            code: 211,
            lines: vec![b"a".to_vec(), b"211 b".to_vec(), b"c".to_vec()],
        };
        assert_eq!(reply.encode(), b"211-a\r\n 211 b\r\n211 c\r\n");
    }

    #[test]
    fn bad_replies_fail() {
        assert!(Reply::parse(b"hello\r\n").is_err());
        assert!(Reply::parse(b"620 no\r\n").is_err());
        assert!(Reply::parse(b"220x\r\n").is_err());
        let mut endless = b"211-start\r\n".to_vec();
        while endless.len() <= MAX_REPLY {
            endless.extend_from_slice(b" more\r\n");
        }
        assert_eq!(Reply::parse(&endless), Err(FtpError::TooLong));
    }
}
