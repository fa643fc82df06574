//! openraft's network for one group, over the node's `Transport`: each Raft RPC becomes a
//! `PeerRequest::Raft` tagged with the group id, so every group shares the node's connections.
//!
//! The receiving side is `Node::handle_raft`. Snapshots of queue groups carry the bodies of the
//! live messages as well as the index (`queue_sm::with_bodies`), since a replica that installs
//! a snapshot has no other way to get them.

use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::alias::{SnapshotOf, VoteOf};
use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use warren_core::{GroupId, METADATA_GROUP, NodeId};

use crate::db::{Storage, decode, encode};
use crate::transport::{PeerRequest, PeerResponse, RaftRpc, Transport};
use crate::types::TypeConfig;

/// A snapshot on the wire: openraft's metadata plus the data (with bodies, for queues).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct WireSnapshot {
    pub vote: VoteOf<TypeConfig>,
    pub meta: openraft::alias::SnapshotMetaOf<TypeConfig>,
    pub data: Vec<u8>,
}

#[derive(Clone)]
pub struct GroupNetwork {
    group: GroupId,
    transport: Arc<dyn Transport>,
    storage: Storage,
}

impl GroupNetwork {
    pub fn new(group: GroupId, transport: Arc<dyn Transport>, storage: Storage) -> Self {
        GroupNetwork {
            group,
            transport,
            storage,
        }
    }
}

pub struct PeerClient {
    group: GroupId,
    target: NodeId,
    transport: Arc<dyn Transport>,
    storage: Storage,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        if !node.addr.is_empty() {
            self.transport.set_address(target, &node.addr);
        }
        PeerClient {
            group: self.group,
            target,
            transport: self.transport.clone(),
            storage: self.storage.clone(),
        }
    }
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e.to_string())
}

impl PeerClient {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: RaftRpc,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Unreachable<TypeConfig>> {
        let payload = encode(request).map_err(unreachable)?;
        let response = self
            .transport
            .call(
                self.target,
                PeerRequest::Raft {
                    group: self.group,
                    rpc,
                    payload,
                },
                timeout,
            )
            .await
            .map_err(unreachable)?;
        match response {
            PeerResponse::Raft(Ok(bytes)) => decode::<Resp>(&bytes).map_err(unreachable),
            PeerResponse::Raft(Err(e)) => Err(unreachable(e)),
            other => Err(unreachable(format!("unexpected response {other:?}"))),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .rpc(RaftRpc::AppendEntries, &rpc, option.hard_ttl())
            .await?)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self.rpc(RaftRpc::Vote, &rpc, option.hard_ttl()).await?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self.rpc(RaftRpc::PreVote, &rpc, option.hard_ttl()).await?)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        Ok(self
            .rpc(RaftRpc::TransferLeader, &req, option.hard_ttl())
            .await?)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Self::SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut data = snapshot.snapshot.into_inner();
        if self.group != METADATA_GROUP {
            data = crate::queue_sm::with_bodies(&self.storage, self.group, &data)
                .map_err(|e| StreamingError::from(unreachable(e)))?;
        }
        let wire = WireSnapshot {
            vote,
            meta: snapshot.meta,
            data,
        };
        // A snapshot can be large; give it more than one RPC's patience.
        let timeout = option.hard_ttl().max(Duration::from_secs(30));
        self.rpc(RaftRpc::InstallSnapshot, &wire, timeout)
            .await
            .map_err(StreamingError::from)
    }
}
