//! `postcopy-sidecar receive`: the destination-side daemon that carries a migration
//! between the source QEMU and the destination QEMU, decoding it and taking over the
//! return path's page requests.

pub mod backoff;
pub mod carry;
pub mod live;
pub mod metrics;
pub mod metrics_endpoint;
pub mod receive;
pub mod relay;
pub mod report;
pub mod tls;
