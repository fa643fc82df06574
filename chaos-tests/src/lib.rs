//! Jepsen-style fault testing of a Warren cluster (the `chaos` binary, `main.rs`).
//!
//! `net` builds the namespaces and partitions, `cluster` runs the `warren` processes in
//! them, `admin` talks to the cluster as an operator, `workload` is the AMQP clients,
//! `nemesis` schedules and inflicts the faults, `history` records every operation,
//! `checker` judges the history, and `run` ties one run together. `docs/chaos.md` describes
//! the nemeses, the checks and the results so far.

pub mod admin;
pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod run;
pub mod workload;
