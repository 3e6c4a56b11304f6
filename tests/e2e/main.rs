//! End-to-end tests: the real `imgate` binary, real sockets, our client crate and clients we
//! did not write (Python `websockets` and `msgpack`). One test binary, modules by topic.

#[macro_use]
mod support;

mod atomic;
mod bad_input;
mod cluster;
#[cfg(feature = "external")]
mod compose;
mod delivery;
mod deploy;
mod durable;
mod expiry;
mod groups;
mod http;
mod interest;
mod keys;
mod lifecycle;
mod notify;
#[cfg(feature = "external")]
mod python;
mod reads;
mod resume;
#[cfg(feature = "external")]
mod sdk;
mod tls;
