//! The `linkgate` command line (DESIGN §1). Exit codes: 0 success, 1 runtime
//! failure, 2 bad configuration.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use linkgate::config::{self, ConfigError, LoadedConfig};
use linkgate::gateway::Gateway;

#[derive(Parser)]
#[command(
    name = "linkgate",
    version,
    about = "Office gateway: proxy services joined by encrypted links"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground (built-in default config without -c).
    Run {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file without opening sockets.
    Check {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a password line from stdin and print an argon2id hash for password_hash.
    Passwd,
    /// Print a registration record for [[peer]] record (reads the peer's password from stdin).
    PeerRecord {
        /// Configuration file of this (accepting) gateway.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The peer's name.
        name: String,
    },
    /// Print this gateway's public key, for the other gateway's [[peer]] public_key (key mode).
    PublicKey {
        /// Configuration file of this gateway (its identity file is used, created if missing).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the built-in default configuration.
    DefaultConfig,
    /// Print shell completions (bash, zsh or fish) to standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output.
    Man,
    /// Show services, connections and links of a running gateway.
    Status {
        /// Admin address of the gateway.
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: String,
        /// Log in as this user (one of `admin_users`); the password is read
        /// from the environment variable LINKGATE_ADMIN_PASSWORD.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(&config),
        Command::Passwd => passwd(),
        Command::PeerRecord { config, name } => peer_record(&config, &name),
        Command::PublicKey { config } => public_key(&config),
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Status { admin, user } => status(&admin, user.as_deref()),
        Command::Completions { shell } => {
            // From the same definitions as --help.
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "linkgate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("linkgate man: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

/// What `systemctl status` shows: services and links.
fn status_line(state: &linkgate::admin::AdminState) -> String {
    let status = state.status();
    let up = status.links.iter().filter(|l| l.state == "up").count();
    let failed = status
        .services
        .iter()
        .filter(|s| s.state == "failed")
        .count();
    let mut line = format!(
        "{} services, {} connections, links up {up}/{}",
        status.services.len() - failed,
        status.connections_total,
        status.links.len()
    );
    if failed > 0 {
        line.push_str(&format!(", {failed} failed to start on reload"));
    }
    line
}

fn load(path: Option<&PathBuf>) -> Result<LoadedConfig, ConfigError> {
    match path {
        Some(path) => config::load_file(path),
        None => config::load_default(),
    }
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_CONFIG)
}

/// `linkgate status`: asks a running gateway's admin API and prints it.
fn status(admin: &str, user: Option<&str>) -> ExitCode {
    match fetch_status(admin, user) {
        Ok(status) => {
            println!(
                "gateway {} (linkgate {}, up {} s)",
                status.gateway, status.version, status.uptime_s
            );
            println!(
                "{:<20} {:<8} {:>6} {:>8} {:>7} {:>11} {:>7} {:>14} {:>14}  listen",
                "SERVICE",
                "TYPE",
                "ACTIVE",
                "OK",
                "DENIED",
                "AUTH_FAILED",
                "ERRORS",
                "BYTES_UP",
                "BYTES_DOWN"
            );
            for s in &status.services {
                let c = &s.counters;
                println!(
                    "{:<20} {:<8} {:>6} {:>8} {:>7} {:>11} {:>7} {:>14} {:>14}  {}",
                    s.name,
                    s.kind,
                    c.active,
                    c.ok,
                    c.denied,
                    c.auth_failed,
                    c.error,
                    c.bytes_up,
                    c.bytes_down,
                    s.listen.join(",")
                );
            }
            for l in &status.links {
                let mut line = format!(
                    "link {:<20} {:<8} {:<9} {:<5}",
                    l.peer, l.role, l.auth, l.state
                );
                if !l.transport.is_empty() {
                    line.push_str(&format!(" {} {}", l.transport, l.address));
                }
                if !l.via.is_empty() {
                    line.push_str(&format!(" via {}", l.via));
                }
                if let Some(rtt) = l.rtt_ms {
                    line.push_str(&format!(" rtt {rtt:.2}ms"));
                }
                if let Some(rate) = &l.bandwidth {
                    line.push_str(&format!(" paced {rate}"));
                } else if let Some(rate) = l.auto_pace_bytes_per_second {
                    line.push_str(&format!(" paced auto {:.1}Mbit/s", rate as f64 * 8.0 / 1e6));
                }
                if l.state != "up" {
                    if let Some(end) = &l.last_end {
                        line.push_str(&format!(" ({end})"));
                    }
                }
                println!("{}", line.trim_end());
            }
            for c in &status.connections {
                println!(
                    "conn {:<20} {:<24} {:<10} {:<30} up {} down {} age {:.0}s",
                    c.service,
                    c.client,
                    if c.user.is_empty() { "-" } else { &c.user },
                    if c.target.is_empty() { "-" } else { &c.target },
                    c.bytes_up,
                    c.bytes_down,
                    c.age_s
                );
            }
            if status.connections_total > status.connections.len() {
                println!(
                    "({} connections in all; the newest {} shown)",
                    status.connections_total,
                    status.connections.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linkgate status: cannot get the status from {admin}: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn fetch_status(admin: &str, user: Option<&str>) -> anyhow::Result<linkgate::admin::Status> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = admin
        .to_socket_addrs()
        .context("bad address")?
        .next()
        .context("the address does not resolve")?;
    let timeout = std::time::Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .context("is the gateway running with [gateway] admin?")?;
    stream.set_read_timeout(Some(timeout))?;
    let login = match user {
        Some(user) => {
            use base64::Engine;
            let password = std::env::var("LINKGATE_ADMIN_PASSWORD")
                .context("--user needs the password in LINKGATE_ADMIN_PASSWORD")?;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Authorization: Basic {token}\r\n")
        }
        None => String::new(),
    };
    write!(
        stream,
        "GET /api/status HTTP/1.0\r\nHost: {admin}\r\n{login}\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("not an HTTP answer")?;
    anyhow::ensure!(
        head.split_whitespace().nth(1) != Some("401"),
        "the gateway wants a login: --user NAME (one of its admin_users), password in LINKGATE_ADMIN_PASSWORD"
    );
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "answer: {}",
        head.lines().next().unwrap_or("")
    );
    serde_json::from_str(body).context("not a linkgate status")
}

fn check(path: &PathBuf) -> ExitCode {
    let loaded = match load(Some(path)) {
        Ok(loaded) => loaded,
        Err(e) => return config_failure(&e),
    };
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    for service in &loaded.config.service {
        let listen: Vec<String> = service.listen.iter().map(ToString::to_string).collect();
        let target = service
            .target
            .as_ref()
            .map_or("-".to_string(), ToString::to_string);
        let via: Vec<String> = service.via.iter().map(ToString::to_string).collect();
        println!(
            "{}\t{}\tlisten={}\ttarget={}\tvia={}",
            service.name,
            service.kind.as_str(),
            listen.join(","),
            target,
            if via.is_empty() {
                "-".into()
            } else {
                via.join(",")
            },
        );
    }
    // Then the links: where they are accepted, and each peer.
    if let Some(link) = &loaded.config.link {
        let listen: Vec<String> = link.listen.iter().map(ToString::to_string).collect();
        println!("[link]\taccepts\tlisten={}", listen.join(","));
    }
    for peer in &loaded.config.peer {
        let auth = if peer.public_key.is_some() {
            "key"
        } else {
            "password"
        };
        // Only when set, so that the lines scripts already read stay as they were.
        let paced = peer
            .bandwidth
            .map_or(String::new(), |b| format!("\tbandwidth={b}"));
        if peer.connect.is_empty() {
            println!("peer {}\taccepts\tauth={auth}{paced}", peer.name);
        } else {
            let connect: Vec<String> = peer.connect.iter().map(ToString::to_string).collect();
            let via: Vec<String> = peer.via.iter().map(ToString::to_string).collect();
            println!(
                "peer {}\tdials\tauth={auth}\tconnect={}\tvia={}{paced}",
                peer.name,
                connect.join(","),
                if via.is_empty() {
                    "-".into()
                } else {
                    via.join(",")
                }
            );
        }
    }
    ExitCode::SUCCESS
}

/// Reads one password line from stdin; `None` (after saying why) if empty.
fn read_password(command: &str) -> Option<String> {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("linkgate {command}: cannot read the password from stdin: {e}");
        return None;
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("linkgate {command}: the password is empty; type it on one line on stdin");
        return None;
    }
    Some(password.to_string())
}

/// `linkgate peer-record`: a registration record for `[[peer]] NAME`, made
/// with this gateway's identity. Like `public-key`, only `[gateway]
/// identity` and the `[[peer]]` names are read from the file, so another
/// peer's unset `password_env` does not stop it.
fn peer_record(path: &PathBuf, name: &str) -> ExitCode {
    use base64::Engine;
    let (table, identity_file) = match identity_file(path) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let peers: Vec<&str> = table
        .get("peer")
        .and_then(|p| p.as_array())
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p.get("name")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    if !peers.contains(&name) {
        let known = if peers.is_empty() {
            "it has no [[peer]]".to_string()
        } else {
            format!("its peers: {}", peers.join(", "))
        };
        eprintln!(
            "{}: no [[peer]] named {name:?} ({known}); add the peer first, then make its record",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let identity = match linkgate::links::identity::load_or_create(&identity_file) {
        Ok(identity) => identity,
        Err(e) => {
            eprintln!("linkgate peer-record: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let Some(password) = read_password("peer-record") else {
        return ExitCode::from(EXIT_RUNTIME);
    };
    let mut rng = rand::rngs::OsRng;
    match link::handshake::PeerRecord::register(&mut rng, &identity, name, password.as_bytes()) {
        Ok(record) => {
            // A line to paste into the [[peer]] table as it is.
            println!(
                "record = \"{}\"",
                base64::engine::general_purpose::STANDARD.encode(record.to_bytes())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linkgate peer-record: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Reads `path` as plain TOML (no validation) and finds its identity file,
/// relative to the file's directory as `linkgate run` would.
fn identity_file(path: &PathBuf) -> Result<(toml::Table, PathBuf), ExitCode> {
    let table = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| text.parse::<toml::Table>().map_err(|e| e.to_string()))
        .map_err(|e| {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        })?;
    let identity = table
        .get("gateway")
        .and_then(|g| g.get("identity"))
        .and_then(|i| i.as_str())
        .unwrap_or("linkgate.key")
        .to_string();
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    Ok((table, base.join(identity)))
}

/// `linkgate public-key`: the static public key of key mode, in base64.
/// Only `[gateway] identity` is read from the file: the two gateways' keys
/// are exchanged before either configuration is complete.
fn public_key(path: &PathBuf) -> ExitCode {
    use base64::Engine;
    let identity_file = match identity_file(path) {
        Ok((_, file)) => file,
        Err(code) => return code,
    };
    match linkgate::links::identity::load_or_create(&identity_file) {
        Ok(identity) => {
            let key = identity.static_keys().public;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linkgate public-key: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn passwd() -> ExitCode {
    let Some(password) = read_password("passwd") else {
        return ExitCode::from(EXIT_RUNTIME);
    };
    match linkgate::passwd::hash_password(&password) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("linkgate passwd: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Task polls between two looks at the sockets' readiness (tokio's default is
/// 61). A busy worker only learns which connections became ready at those
/// looks, so the interval sets how long a ready connection can wait before it
/// even joins the queue. At 32 the p99 latency of small proxied HTTP requests
/// fell by about an eighth (median of 8 interleaved rounds, one pinned worker:
/// 1.38 ms against 1.59) at the same throughput; 16 cost throughput (more
/// `epoll_wait` calls) without lowering it further. See bench/README.md.
const EVENT_INTERVAL: u32 = 32;

/// Raises the soft limit on open files to the hard limit. A gateway started
/// by hand gets the shell's soft limit (often 1024), far below what its
/// connections need; running out makes every listener's accept fail.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let loaded = match load(path.as_ref()) {
        Ok(loaded) => loaded,
        Err(e) => return config_failure(&e),
    };
    let _log_guard = linkgate::logging::init(loaded.config.gateway.log);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    raise_open_file_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().event_interval(EVENT_INTERVAL);
    if let Some(threads) = loaded.config.gateway.threads {
        // Validation keeps it within 1-1024.
        builder.worker_threads(usize::try_from(threads).unwrap_or(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(serve(loaded, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // With its causes: "admin: cannot listen on ...: Address in use".
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(loaded: LoadedConfig, path: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = &loaded.config;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let started = std::time::Instant::now();
    let mut gateway = Gateway::start(config).await?;
    let stop_admin = tokio_util::sync::CancellationToken::new();
    if let Some(admin) = &config.gateway.admin {
        let addr = tokio::net::lookup_host(admin.to_string())
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .with_context(|| format!("cannot resolve the admin address {admin}"))?;
        linkgate::admin::start(addr, gateway.admin_state(started), stop_admin.clone())
            .await
            .with_context(|| format!("admin: cannot listen on {admin}"))?;
    }
    tracing::info!(
        gateway = config.gateway.name.as_deref().unwrap_or_default(),
        services = config.service.len(),
        "linkgate started"
    );
    // Every listener is bound by now.
    use linkgate::service_manager as manager;
    let status_updates = manager::enabled().then(|| {
        let admin_view = gateway.admin_state(started);
        manager::ready(&status_line(&admin_view));
        manager::spawn_watchdog();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            every.tick().await;
            loop {
                every.tick().await;
                manager::status(&status_line(&admin_view));
            }
        })
    });
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = hangup.recv() => {
                manager::reloading();
                match load(path.as_ref()) {
                    Ok(new) => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        gateway.reload(new.config).await;
                    }
                    Err(e) => tracing::error!("SIGHUP: the new configuration is rejected, the running one stays: {e}"),
                }
                // Applied, or refused with the old one still running.
                if manager::enabled() {
                    manager::ready(&status_line(&gateway.admin_state(started)));
                }
            }
        }
    }
    manager::stopping();
    if let Some(updates) = status_updates {
        updates.abort();
    }
    stop_admin.cancel();
    // A second SIGINT/SIGTERM during the drain closes everything at once.
    let hurry = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    gateway
        .shutdown(config.gateway.shutdown_grace.0, hurry)
        .await;
    tracing::info!("stopped");
    Ok(())
}
