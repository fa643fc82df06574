//! The generated types and gRPC stubs of `proto/warren.proto`: the Raft transport, peer
//! forwarding and delivery, and the admin service.
//!
//! `warren-cluster` implements the servers and uses the clients between nodes; `warrenctl`
//! uses the admin client. Raft messages and queue commands are carried as opaque payloads
//! encoded by `warren-cluster`, so this crate depends on nothing else in the workspace.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("warren.v1");
