//! linkgate: an office gateway running proxy services (mapping, SOCKS, HTTP,
//! FTP, telnet) with access rules, cascading, and encrypted links between
//! gateways. See DESIGN.md for the contract; `main.rs` is the command line.

pub mod access;
pub mod admin;
pub mod audit;
pub mod bufpool;
pub mod capped;
pub mod cascade;
pub mod config;
pub mod connections;
pub mod connector;
pub mod events;
pub mod gateway;
pub mod inbound;
pub mod limits;
pub mod links;
pub mod logging;
pub mod metrics;
pub mod passwd;
pub mod relay;
pub mod service;
pub mod service_manager;
pub mod stream;
pub mod tls;
pub mod users;
