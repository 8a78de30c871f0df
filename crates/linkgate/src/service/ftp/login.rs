//! Reaching the server: the fixed target, or the one the client names in
//! `USER user@host[:port]`.

use proto::ftp::{Command, Reply};

use super::conn::{parse_client_line, ClientLine, Conn, SYNTAX_ERROR};
use super::session::{Pending, ServerSide, NO_TLS};
use super::{Ended, FTP_PORT};
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{AuthMode, Hop, HostPort};
use crate::inbound::ClientId;
use crate::service::{check_destination, parse_destination, ServiceRuntime};

/// Wrong proxy passwords a client may try before the connection closes.
const PROXY_LOGIN_TRIES: usize = 3;

/// Logs the client in to its server: the fixed target, or the one named in
/// `USER user@host[:port]`. With `auth = "password"` the client first logs
/// in to the gateway itself (USER and PASS of a `[[user]]`), then to the
/// server (the double login of WinSCP, Check Point and others). The fixed
/// target may be another gateway's ftp service over a link. Returns the
/// server's control connection, where data connections go, and the command
/// whose reply is awaited.
pub(super) async fn reach_server(
    service: &ServiceRuntime,
    client: &mut Conn,
    client_id: &ClientId,
    audit: &mut Audit,
) -> Result<(Conn, ServerSide, Option<Pending>), Ended> {
    let fixed = service.config.target.as_ref();
    let auth = service.config.auth == AuthMode::Password;
    if let (Some(target), false) = (fixed, auth) {
        audit.target = target.to_string();
        let server = open_server(service, client, target, audit, true).await?;
        return Ok((server, server_side(target), None));
    }
    let how = if auth {
        "log in to the proxy with USER and PASS first"
    } else {
        "log in with USER user@host[:port]"
    };
    let _ = client
        .send(format!("220 linkgate FTP proxy: {how}\r\n").as_bytes())
        .await;
    let mut login = if auth {
        ProxyLogin::NeedUser
    } else {
        ProxyLogin::Done
    };
    let mut failures = 0;
    loop {
        let command = next_command(client, audit).await?;
        let arg = command.arg_str().unwrap_or_default().to_string();
        match (&login, command.verb.as_str()) {
            (_, "QUIT") => {
                let _ = client.send(b"221 Goodbye\r\n").await;
                audit.finish(AuditResult::Ok, "client quit before logging in");
                return Err(Ended);
            }
            (_, "AUTH") => {
                let _ = client.send(format!("{NO_TLS}\r\n").as_bytes()).await;
            }
            (ProxyLogin::NeedUser | ProxyLogin::NeedPass(_), "USER") => {
                login = ProxyLogin::NeedPass(arg);
                let _ = client.send(b"331 Proxy password required\r\n").await;
            }
            (ProxyLogin::NeedPass(user), "PASS") => {
                let user = user.clone();
                if let Err(failure) = service.users.verify(&user, &arg).await {
                    failures += 1;
                    let reason = format!("{failure} for user {user:?}");
                    if failures == PROXY_LOGIN_TRIES {
                        let _ = client.send(b"421 Proxy login incorrect; closing\r\n").await;
                        audit.finish(AuditResult::AuthFailed, reason);
                        return Err(Ended);
                    }
                    login = ProxyLogin::NeedUser;
                    let _ = client.send(b"530 Proxy login incorrect\r\n").await;
                    continue;
                }
                audit.user = Some(user.clone());
                if let Verdict::Deny(why) = service.access.check(client_id, Some(&user)) {
                    let _ = client
                        .send(format!("530 Access denied: {why}\r\n").as_bytes())
                        .await;
                    audit.finish(AuditResult::Denied, why);
                    return Err(Ended);
                }
                login = ProxyLogin::Done;
                let next = if fixed.is_some() {
                    "USER user"
                } else {
                    "USER user@host[:port]"
                };
                let _ = client
                    .send(format!("230 Proxy login ok; now {next}\r\n").as_bytes())
                    .await;
            }
            (ProxyLogin::NeedUser | ProxyLogin::NeedPass(_), _) => {
                let _ = client
                    .send(b"530 Log in to the proxy with USER and PASS first\r\n")
                    .await;
            }
            (ProxyLogin::Done, "USER") => {
                let named = match fixed {
                    Some(target) => Some((arg.clone(), target.clone())),
                    None => proxy_login(&arg).map(|(user, target)| (user, Hop::Direct(target))),
                };
                let Some((user, target)) = named.filter(|(user, _)| !user.is_empty()) else {
                    let _ = client
                        .send(b"501 Log in with USER user@host[:port]\r\n")
                        .await;
                    continue;
                };
                return login_to(service, client, audit, user, target).await;
            }
            (ProxyLogin::Done, _) => {
                let _ = client
                    .send(b"530 Log in with USER user@host[:port] first\r\n")
                    .await;
            }
        }
    }
}

/// Where the client is in logging in to the gateway itself.
enum ProxyLogin {
    NeedUser,
    NeedPass(String),
    /// Logged in, or no login needed.
    Done,
}

/// The next command before login; ends the session on EOF or bad input.
async fn next_command(client: &mut Conn, audit: &mut Audit) -> Result<Command, Ended> {
    loop {
        match client.next(parse_client_line).await {
            Ok(Some(ClientLine::Command(command))) => return Ok(command),
            Ok(Some(ClientLine::Malformed)) => {
                let _ = client.send(SYNTAX_ERROR).await;
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
        }
    }
}

/// Checks `target`, connects to it and sends `USER user`; the reply goes to
/// the client through the session.
async fn login_to(
    service: &ServiceRuntime,
    client: &mut Conn,
    audit: &mut Audit,
    user: String,
    target: Hop,
) -> Result<(Conn, ServerSide, Option<Pending>), Ended> {
    audit.target = target.to_string();
    if let (None, Hop::Direct(named)) = (&service.config.target, &target) {
        if let Err(reason) = check_destination(service, named).await {
            let _ = client.send(format!("530 {reason}\r\n").as_bytes()).await;
            audit.finish(AuditResult::Denied, reason);
            return Err(Ended);
        }
    }
    // The client had the gateway's greeting: the reply it awaits is the one
    // to USER.
    let mut server = open_server(service, client, &target, audit, false).await?;
    if server
        .send(format!("USER {user}\r\n").as_bytes())
        .await
        .is_err()
    {
        audit.finish(AuditResult::Error, "server closed after its greeting");
        return Err(Ended);
    }
    Ok((server, server_side(&target), Some(Pending::Other)))
}

/// Where the data connections of a session with server `target` go.
fn server_side(target: &Hop) -> ServerSide {
    match target {
        Hop::Link { peer, service } => ServerSide::Link {
            peer: peer.clone(),
            service: service.clone(),
        },
        // Validation allows only host:port and link:// targets for ftp.
        Hop::Direct(server)
        | Hop::Socks4(server)
        | Hop::Socks4a(server)
        | Hop::Socks5(server, _)
        | Hop::Http(server, _) => ServerSide::Tcp(server.host.clone()),
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
    target: &Hop,
    audit: &mut Audit,
    forward_greeting: bool,
) -> Result<Conn, Ended> {
    let stream = match service.connector.connect(target).await {
        Ok(stream) => stream,
        Err(e) => {
            let _ = client.send(format!("421 {e}\r\n").as_bytes()).await;
            audit.finish(e.audit_result(), e.to_string());
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
