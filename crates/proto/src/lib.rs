//! Sans-IO codecs for the protocols linkgate speaks (SOCKS4/4a/5, FTP
//! control, telnet IAC, link frames): bytes in, values out, no I/O, no
//! async runtime, so every parser is testable and fuzzable without sockets.
//!
//! The codecs land with the services that use them.
