//! hokusai-deployer turns validated ML models into ERC-20 tokens.
//!
//! A `model_ready_to_deploy` message arrives on a Redis list; a worker moves it into its own
//! processing list ([`queue`]), validates it ([`message`]), deploys a `HokusaiToken` and registers
//! it in the `ModelRegistry` ([`chain`]), recording every transaction in a write-ahead
//! [`journal`] before it is broadcast, publishes a `token_deployed` event and only then removes
//! the message ([`pipeline`]). [`api`] is the HTTP deployment API, which queues the same
//! messages; [`ops`] serves health and metrics (and [`emf`] writes the metrics as CloudWatch
//! Embedded Metric Format lines), [`admin`] the operator commands, [`audit`] the audit trail,
//! [`acl`] the Redis ACL file, [`mlflow`] the model registry the API reads,
//! [`telemetry`] logs and metric names, [`topology`] the Redis mode (standalone, cluster,
//! sentinel), the writes that wait for replicas and the failovers seen, [`webhooks`] the signed outbound deliveries of each
//! deployment's outcome to configured endpoints and callbacks. [`config`] builds the settings; [`localstack`] starts
//! Redis and anvil for the quick start and the tests; [`cli`] is the command line.

pub mod acl;
pub mod admin;
pub mod api;
pub mod audit;
pub mod chain;
pub mod cli;
pub mod config;
pub mod emf;
pub mod journal;
pub mod localstack;
pub mod message;
pub mod mlflow;
pub mod ops;
pub mod pipeline;
pub mod queue;
pub mod telemetry;
pub mod topology;
pub mod webhooks;
