//! Reaching the server: the fixed target, or the one the client names in
//! `USER user@host[:port]`.

use proto::ftp::Reply;

use super::conn::{parse_client_line, ClientLine, Conn, SYNTAX_ERROR};
use super::session::Pending;
use super::{Ended, FTP_PORT};
use crate::audit::{Audit, AuditResult};
use crate::config::{Hop, Host, HostPort};
use crate::service::{check_destination, parse_destination, ServiceRuntime};

/// Logs the client in to its server: the fixed target, or the one named in
/// `USER user@host[:port]`. Returns the server's control connection, its
/// host (for data connections), and the command whose reply is awaited.
pub(super) async fn reach_server(
    service: &ServiceRuntime,
    client: &mut Conn,
    audit: &mut Audit,
) -> Result<(Conn, Host, Option<Pending>), Ended> {
    if let Some(Hop::Direct(target)) = &service.config.target {
        audit.target = target.to_string();
        let server = open_server(service, client, target, audit, true).await?;
        return Ok((server, target.host.clone(), None));
    }
    let _ = client
        .send(b"220 linkgate FTP proxy: log in with USER user@host[:port]\r\n")
        .await;
    loop {
        let command = match client.next(parse_client_line).await {
            Ok(Some(ClientLine::Command(command))) => command,
            Ok(Some(ClientLine::Malformed)) => {
                let _ = client.send(SYNTAX_ERROR).await;
                continue;
            }
            Ok(None) => {
                audit.finish(AuditResult::Error, "client left before logging in");
                return Err(Ended);
            }
            Err(e) => {
                let _ = client
                    .send(b"500 Command line too long or malformed\r\n")
                    .await;
                audit.finish(AuditResult::Error, format!("client: {e}"));
                return Err(Ended);
            }
        };
        match command.verb.as_str() {
            "USER" => {
                let Some((user, target)) = command.arg_str().and_then(proxy_login) else {
                    let _ = client
                        .send(b"501 Log in with USER user@host[:port]\r\n")
                        .await;
                    continue;
                };
                audit.target = target.to_string();
                if let Err(reason) = check_destination(service, &target).await {
                    let _ = client.send(format!("530 {reason}\r\n").as_bytes()).await;
                    audit.finish(AuditResult::Denied, reason);
                    return Err(Ended);
                }
                // The client had the gateway's greeting: the reply it awaits
                // is the one to USER.
                let mut server = open_server(service, client, &target, audit, false).await?;
                if server
                    .send(format!("USER {user}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    audit.finish(AuditResult::Error, "server closed after its greeting");
                    return Err(Ended);
                }
                return Ok((server, target.host, Some(Pending::Other)));
            }
            "QUIT" => {
                let _ = client.send(b"221 Goodbye\r\n").await;
                audit.finish(AuditResult::Ok, "client quit before logging in");
                return Err(Ended);
            }
            _ => {
                let _ = client
                    .send(b"530 Log in with USER user@host[:port] first\r\n")
                    .await;
            }
        }
    }
}

/// `user@host[:port]` (the last `@` separates: user names may contain one).
fn proxy_login(arg: &str) -> Option<(String, HostPort)> {
    let (user, destination) = arg.rsplit_once('@')?;
    let target = parse_destination(destination, FTP_PORT).ok()?;
    (!user.is_empty()).then(|| (user.to_string(), target))
}

/// Connects to the server and reads its greeting, passed on to the client
/// when `forward_greeting`.
async fn open_server(
    service: &ServiceRuntime,
    client: &mut Conn,
    target: &HostPort,
    audit: &mut Audit,
    forward_greeting: bool,
) -> Result<Conn, Ended> {
    let stream = match service
        .connector
        .connect(&Hop::Direct(target.clone()))
        .await
    {
        Ok(stream) => stream,
        Err(e) => {
            let _ = client.send(format!("421 {e}\r\n").as_bytes()).await;
            audit.finish(AuditResult::Error, e.to_string());
            return Err(Ended);
        }
    };
    let mut server = Conn::new(stream);
    match server.next(Reply::parse).await {
        Ok(Some(greeting)) if greeting.code / 100 == 2 => {
            if forward_greeting {
                let _ = client.send(&greeting.encode()).await;
            }
            Ok(server)
        }
        Ok(Some(refusal)) => {
            let _ = client.send(&refusal.encode()).await;
            audit.finish(
                AuditResult::Error,
                format!("server refused the session ({})", refusal.code),
            );
            Err(Ended)
        }
        Ok(None) | Err(_) => {
            let _ = client.send(b"421 The server sent no greeting\r\n").await;
            audit.finish(AuditResult::Error, "the server sent no greeting");
            Err(Ended)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::proxy_login;

    #[test]
    fn proxy_login_forms() {
        let read = |arg: &str| proxy_login(arg).map(|(user, target)| (user, target.to_string()));
        assert_eq!(
            read("alice@ftp.example.com"),
            Some(("alice".into(), "ftp.example.com:21".into()))
        );
        assert_eq!(
            read("alice@10.0.0.1:2121"),
            Some(("alice".into(), "10.0.0.1:2121".into()))
        );
        assert_eq!(
            read("a@b.c@[::1]:2121"),
            Some(("a@b.c".into(), "[::1]:2121".into()))
        );
        assert_eq!(read("anonymous"), None);
        assert_eq!(read("@host"), None);
    }
}
