//! `loadgen ftp`: FTP sessions through a proxy (or straight to a server), as
//! a client would run them: greeting, USER/PASS, TYPE I, PASV, RETR of one
//! file read to its end, QUIT.

use std::net::SocketAddr;
use std::time::Duration;

use proto::ftp::{parse_pasv_reply, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{drive, report, Error};

/// A control connection with its unparsed input.
struct Control {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Control {
    /// The next complete reply; an error unless its code is in `expected`'s
    /// class (its first digit).
    async fn reply(&mut self, expected: u16) -> Result<Reply, Error> {
        loop {
            if let Some((reply, used)) = Reply::parse(&self.buf)? {
                self.buf.drain(..used);
                if reply.code / 100 != expected / 100 {
                    let text = String::from_utf8_lossy(&reply.lines.concat()).into_owned();
                    return Err(format!("expected {expected}, got {} {text}", reply.code).into());
                }
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err("control connection closed".into());
            }
        }
    }

    async fn command(&mut self, line: &str, expected: u16) -> Result<Reply, Error> {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply(expected).await
    }
}

/// One whole session; returns the bytes of the file.
async fn session(server: SocketAddr, user: &str, password: &str, file: &str) -> Result<u64, Error> {
    let stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let mut control = Control {
        stream,
        buf: Vec::new(),
    };
    control.reply(220).await?;
    // 230 at once (anonymous without a password) or 331 then PASS.
    if control.command(&format!("USER {user}"), 300).await.is_ok() {
        control.command(&format!("PASS {password}"), 230).await?;
    }
    control.command("TYPE I", 200).await?;
    let passive = control.command("PASV", 227).await?;
    let address = parse_pasv_reply(&passive.lines.concat())?;
    let mut data = TcpStream::connect(address).await?;
    control
        .stream
        .write_all(format!("RETR {file}\r\n").as_bytes())
        .await?;
    control.reply(150).await?;
    let mut received = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = data.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    control.reply(226).await?;
    control.command("QUIT", 221).await?;
    Ok(received)
}

/// CLIENTS concurrent loops of whole sessions for SECONDS; prints sessions/s
/// and session latency percentiles as JSON.
pub async fn rate(
    server: SocketAddr,
    user: String,
    password: String,
    file: String,
    clients: usize,
    seconds: f64,
) -> Result<(), Error> {
    let rounds = drive(clients, seconds, Duration::from_secs(5), move || {
        let (user, password, file) = (user.clone(), password.clone(), file.clone());
        async move { session(server, &user, &password, &file).await.map(|_| ()) }
    })
    .await?;
    report("sessions", &rounds);
    Ok(())
}
