//! QMP, the QEMU Machine Protocol, as ringvisor speaks it: the transport and protocol layer
//! only. The commands themselves (query-status, migrate, ...) belong to a [`Handler`]
//! implemented elsewhere; this crate frames, validates and dispatches them, fans events out
//! and keeps every client inside bounds (message size, half-message deadline, write
//! timeout, queue length, number of clients). The protocol as implemented is described in
//! `docs/qmp.md`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use qmp::{ClientCtx, CommandError, Handler, QmpClient, QmpServer, ServerConfig};
//! use serde_json::{json, Map, Value};
//!
//! struct Vm;
//! impl Handler for Vm {
//!     fn commands(&self) -> Vec<String> {
//!         vec!["query-status".into()]
//!     }
//!     fn execute(&self, name: &str, args: Map<String, Value>, _: &ClientCtx)
//!         -> Result<Value, CommandError> {
//!         qmp::Args::new(args).deny_unknown(&[])?;
//!         match name {
//!             "query-status" => Ok(json!({"status": "running", "running": true})),
//!             _ => Err(CommandError::command_not_found(name)),
//!         }
//!     }
//! }
//!
//! let path = std::env::temp_dir().join(format!("qmp-doc-{}.sock", std::process::id()));
//! let server = QmpServer::bind(&path, Arc::new(Vm), ServerConfig::default())?;
//! let mut client = QmpClient::connect(&path, Duration::from_secs(10))?;
//! assert_eq!(client.execute("query-status", Value::Null)?["status"], "running");
//! server.events().emit("STOP", None);
//! assert_eq!(client.next_event(Duration::from_secs(10))?.map(|e| e.name), Some("STOP".into()));
//! drop(server); // stops, disconnects the client, removes the socket file
//! assert!(!path.exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Module map:
//! - [`server`]: [`QmpServer`] (owner-only unix socket, accept thread, a reader and a
//!   writer thread per client), the [`Handler`] trait, [`ClientCtx`] and [`EventSink`].
//! - [`client`]: [`QmpClient`], a blocking client with deadlines for ringvisor's CLI.
//! - [`args`]: [`Args`], argument accessors that fail with QEMU's exact error texts.
//! - [`error`]: [`ErrorClass`], [`CommandError`] (what goes on the wire) and the crate's
//!   typed errors [`QmpError`] and [`ClientError`].
//! - `framer`: the bounded, brace/string-aware splitter of a byte stream into JSON texts.
//! - `proto`: encoding of greeting, replies and events; validation of a request.
//! - `sys`: the only `unsafe`: socket creation with bind/chmod/listen split, non-blocking
//!   connect, listener shutdown.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod args;
pub mod client;
pub mod error;
mod framer;
mod proto;
pub mod server;
mod sys;

pub use args::Args;
pub use client::{ClientConfig, Event, QmpClient};
pub use error::{ClientError, CommandError, ErrorClass, QmpError};
pub use proto::Timestamp;
pub use server::{ClientCtx, EventSink, Handler, QemuVersion, QmpServer, ServerConfig};
