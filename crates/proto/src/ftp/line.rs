//! Control-connection lines.

use super::FtpError;

/// Longest control line accepted, end of line included. RFC 959 sets no
/// limit; path names can be long, so this is generous but bounded.
pub const MAX_LINE: usize = 8192;

/// The first line in `buf`: `Ok(Some((line, consumed)))` with the line
/// without its end (CRLF, or a bare LF as some peers send), `Ok(None)` when
/// no line end has arrived yet, `Err(TooLong)` once more than [`MAX_LINE`]
/// bytes came without one.
pub fn next_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FtpError> {
    let window = &buf[..buf.len().min(MAX_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, end + 1)))
        }
        None if buf.len() >= MAX_LINE => Err(FtpError::TooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_with_crlf_or_lf() {
        assert_eq!(next_line(b"USER a\r\nPASS"), Ok(Some((&b"USER a"[..], 8))));
        assert_eq!(next_line(b"USER a\nX"), Ok(Some((&b"USER a"[..], 7))));
        assert_eq!(next_line(b"USER a\r"), Ok(None));
        assert_eq!(next_line(b""), Ok(None));
    }

    #[test]
    fn overlong_lines_fail() {
        let long = vec![b'a'; MAX_LINE];
        assert_eq!(next_line(&long), Err(FtpError::TooLong));
        let mut fits = vec![b'a'; MAX_LINE - 1];
        fits.push(b'\n');
        assert!(matches!(next_line(&fits), Ok(Some(_))));
    }
}
