//! The tokio edge: configuration, portals, the connection driver and session registry.

pub mod admin;
pub mod config;
pub mod connection;
pub mod limits;
pub mod live;
pub mod portal;
pub mod reload;
pub mod runtime;
pub mod session;
