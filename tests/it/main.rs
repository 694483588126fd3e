//! Integration tests on a real redis-server and a real anvil, started per test on free ports.
//! One test binary: alloy links once, and every module shares the harness.

mod abi;
mod api;
mod api_auth;
mod chain_faults;
mod cli;
mod contracts;
mod crash;
mod dashboards;
mod deliveries;
mod emf;
mod fees;
mod harness;
#[cfg(feature = "aws-kms")]
mod kms;
mod ops;
mod pipeline;
mod redis_failover;
mod redis_ha;
mod redis_tls;
mod sse;
mod webhooks;
