//! The configuration file (DESIGN §2): schema, value types, loading with
//! located error messages, validation, and the built-in default.

mod load;
mod model;
mod validate;
mod values;

pub use validate::{decode_peer_record, decode_public_key};

pub use load::{
    load_file, parse_and_validate, ConfigError, KeyPath, KeySeg, LoadedConfig, Problem,
};
pub use model::{
    AuthMode, Config, GatewayConfig, LinkConfig, LogFormat, PeerConfig, ServiceConfig, ServiceKind,
    UserConfig,
};
pub use values::{
    AccessRule, ConfigDuration, DestinationRule, Hop, HopCredentials, Host, HostPattern, HostPort,
    LinkAddress, Listen, PortRange, PortSet, Secret,
};

/// The built-in default configuration (DESIGN §2.6), printed by
/// `linkgate default-config` and run by `linkgate run` without `-c`.
pub const DEFAULT_CONFIG: &str = r#"# linkgate built-in default configuration.
# A SOCKS5 proxy and an HTTP proxy for this machine only (loopback clients),
# and the status page on http://127.0.0.1:9180/.

[gateway]
admin = "127.0.0.1:9180"

[[service]]
name = "socks"
type = "socks"
listen = "127.0.0.1:1080"

[[service]]
name = "http"
type = "http"
listen = "127.0.0.1:3128"
"#;

/// Parses and validates the built-in default.
pub fn load_default() -> Result<LoadedConfig, ConfigError> {
    let base = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let config = parse_and_validate(DEFAULT_CONFIG, "<built-in default>", &base)?;
    Ok(LoadedConfig {
        config,
        source: None,
        warnings: Vec::new(),
    })
}
