//! The node-to-node transport over gRPC (tonic, `proto/warren.proto`): a `Transport` that
//! keeps one HTTP/2 channel per peer, shared by every group and kind of call, and the server
//! side that hands requests to the node's `PeerHandler`.
//!
//! The admin service (`Admin`) is served from the same listener; `admin` implements it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use warren_core::NodeId;
use warren_proto as pb;

use crate::transport::{
    Forwarded, PeerHandler, PeerRequest, PeerResponse, RaftRpc, Transport, TransportError,
};

/// Snapshots travel in one message; allow them to be large.
const MAX_MESSAGE: usize = 1 << 30;

#[derive(Default)]
pub struct GrpcTransport {
    addresses: RwLock<HashMap<NodeId, String>>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl GrpcTransport {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn channel(&self, node: NodeId) -> Result<Channel, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { node, reason };
        let addr = self
            .addresses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
            .ok_or_else(|| unreachable("no address known".into()))?;
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel)) = channels.get(&node)
            && *known == addr
        {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(format!("bad address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        channels.insert(node, (addr, channel.clone()));
        Ok(channel)
    }
}

fn status_error(node: NodeId, timeout: Duration, status: Status) -> TransportError {
    if connection_refused(&status) {
        return TransportError::Refused { node };
    }
    match status.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => TransportError::Timeout {
            node,
            after: timeout,
        },
        tonic::Code::Unavailable | tonic::Code::Unknown => TransportError::Unreachable {
            node,
            reason: status.message().to_owned(),
        },
        _ => TransportError::Protocol {
            node,
            reason: status.to_string(),
        },
    }
}

/// Whether the call failed because the peer's port refused the connection, which only a
/// process that is not running causes (the error is several layers down the status' sources).
fn connection_refused(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

fn forwarded<T>(
    not_leader: Option<pb::NotLeader>,
    error: Option<String>,
    ok: Option<T>,
) -> Forwarded<T> {
    match (ok, not_leader, error) {
        (Some(v), _, _) => Forwarded::Ok(v),
        (None, Some(n), _) => Forwarded::NotLeader((n.leader != 0).then_some(n.leader)),
        (None, None, Some(e)) => Forwarded::Error(e),
        (None, None, None) => Forwarded::Error("empty reply".into()),
    }
}

impl Transport for GrpcTransport {
    fn call(
        &self,
        target: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>> {
        let channel = self.channel(target);
        Box::pin(async move {
            let channel = channel?;
            let fail = |s: Status| status_error(target, timeout, s);
            match request {
                PeerRequest::Raft {
                    group,
                    rpc,
                    payload,
                } => {
                    let mut client = pb::raft_client::RaftClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    let req = with_timeout(
                        pb::RaftRequest {
                            group,
                            from: 0,
                            payload,
                        },
                        timeout,
                    );
                    let reply = match rpc {
                        RaftRpc::AppendEntries => client.append_entries(req).await,
                        RaftRpc::Vote => client.vote(req).await,
                        RaftRpc::PreVote => client.pre_vote(req).await,
                        RaftRpc::TransferLeader => client.transfer_leader(req).await,
                        RaftRpc::InstallSnapshot => client.install_snapshot(req).await,
                    }
                    .map_err(fail)?
                    .into_inner();
                    Ok(PeerResponse::Raft(match reply.result {
                        Some(pb::raft_reply::Result::Payload(p)) => Ok(p),
                        Some(pb::raft_reply::Result::Error(e)) => Err(e),
                        None => Err("empty reply".into()),
                    }))
                }
                PeerRequest::Submit { queue, requests } => {
                    let mut client = pb::peer_client::PeerClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    let reply = client
                        .submit(with_timeout(
                            pb::SubmitBatch {
                                group: queue,
                                requests,
                            },
                            timeout,
                        ))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    use pb::submit_batch_reply::Result as R;
                    Ok(PeerResponse::Submit(match reply.result {
                        Some(R::Outcomes(o)) => Forwarded::Ok(o.outcomes),
                        Some(R::NotLeader(n)) => forwarded(Some(n), None, None),
                        Some(R::Error(e)) => Forwarded::Error(e),
                        None => Forwarded::Error("empty reply".into()),
                    }))
                }
                PeerRequest::MetaWrite { cmd } => {
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    let reply = client
                        .meta_write(with_timeout(pb::Blob { data: cmd }, timeout))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    use pb::meta_write_reply::Result as R;
                    Ok(PeerResponse::MetaWrite(match reply.result {
                        Some(R::Reply(b)) => Forwarded::Ok(b),
                        Some(R::NotLeader(n)) => forwarded(Some(n), None, None),
                        Some(R::Error(e)) => Forwarded::Error(e),
                        None => Forwarded::Error("empty reply".into()),
                    }))
                }
                PeerRequest::GroupVoters { group } => {
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    let reply = client
                        .group_voters(with_timeout(pb::GroupVotersRequest { group }, timeout))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    Ok(PeerResponse::GroupVoters(
                        reply.known.then_some((reply.leader, reply.voters)),
                    ))
                }
                PeerRequest::Service { payload } => {
                    let mut client = pb::peer_client::PeerClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE);
                    let reply = client
                        .service(with_timeout(pb::Blob { data: payload }, timeout))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    use pb::service_reply::Result as R;
                    Ok(PeerResponse::Service(match reply.result {
                        Some(R::Payload(p)) => Ok(p),
                        Some(R::Error(e)) => Err(e),
                        None => Err("empty reply".into()),
                    }))
                }
                PeerRequest::MetaIndex => {
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    let reply = client
                        .meta_index(with_timeout(pb::Empty {}, timeout))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    Ok(PeerResponse::MetaIndex(reply.committed))
                }
                PeerRequest::MetaWait {
                    index,
                    timeout: wait,
                } => {
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    let reply = client
                        .meta_wait(with_timeout(
                            pb::MetaWaitRequest {
                                index,
                                timeout_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                            },
                            timeout,
                        ))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    Ok(PeerResponse::MetaIndex(reply.committed))
                }
                PeerRequest::Deliver { from, items } => {
                    let mut client = pb::peer_client::PeerClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE);
                    client
                        .deliver(with_timeout(
                            pb::DeliverBatch {
                                deliveries: items,
                                from,
                            },
                            timeout,
                        ))
                        .await
                        .map_err(fail)?;
                    Ok(PeerResponse::Delivered)
                }
                PeerRequest::Hello {
                    from,
                    incarnation,
                    advertise,
                } => {
                    let mut client = pb::peer_client::PeerClient::new(channel);
                    let reply = client
                        .hello(with_timeout(
                            pb::HelloRequest {
                                from,
                                incarnation,
                                advertise,
                            },
                            timeout,
                        ))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    Ok(PeerResponse::Hello {
                        node: reply.node_id,
                        incarnation: reply.incarnation,
                        advertise: reply.advertise,
                    })
                }
            }
        })
    }

    fn set_address(&self, node: NodeId, address: &str) {
        self.addresses
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, address.to_owned());
    }
}

// ---- server ----------------------------------------------------------------------------

struct RaftService(Arc<dyn PeerHandler>);
struct PeerService(Arc<dyn PeerHandler>);

impl RaftService {
    async fn raft(
        &self,
        request: Request<pb::RaftRequest>,
        rpc: RaftRpc,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let req = request.into_inner();
        let response = self
            .0
            .handle(PeerRequest::Raft {
                group: req.group,
                rpc,
                payload: req.payload,
            })
            .await;
        let result = match response {
            PeerResponse::Raft(Ok(p)) => pb::raft_reply::Result::Payload(p),
            PeerResponse::Raft(Err(e)) => pb::raft_reply::Result::Error(e),
            other => pb::raft_reply::Result::Error(format!("unexpected response {other:?}")),
        };
        Ok(Response::new(pb::RaftReply {
            result: Some(result),
        }))
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft(request, RaftRpc::AppendEntries).await
    }

    async fn vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft(request, RaftRpc::Vote).await
    }

    async fn pre_vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft(request, RaftRpc::PreVote).await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft(request, RaftRpc::TransferLeader).await
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.raft(request, RaftRpc::InstallSnapshot).await
    }
}

fn not_leader(leader: Option<NodeId>) -> pb::NotLeader {
    pb::NotLeader {
        leader: leader.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let req = request.into_inner();
        match self
            .0
            .handle(PeerRequest::Hello {
                from: req.from,
                incarnation: req.incarnation,
                advertise: req.advertise,
            })
            .await
        {
            PeerResponse::Hello {
                node,
                incarnation,
                advertise,
            } => Ok(Response::new(pb::HelloReply {
                node_id: node,
                incarnation,
                advertise,
            })),
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn submit(
        &self,
        request: Request<pb::SubmitBatch>,
    ) -> Result<Response<pb::SubmitBatchReply>, Status> {
        let req = request.into_inner();
        use pb::submit_batch_reply::Result as R;
        let result = match self
            .0
            .handle(PeerRequest::Submit {
                queue: req.group,
                requests: req.requests,
            })
            .await
        {
            PeerResponse::Submit(Forwarded::Ok(outcomes)) => R::Outcomes(pb::Outcomes { outcomes }),
            PeerResponse::Submit(Forwarded::NotLeader(l)) => R::NotLeader(not_leader(l)),
            PeerResponse::Submit(Forwarded::Error(e)) => R::Error(e),
            other => R::Error(format!("unexpected response {other:?}")),
        };
        Ok(Response::new(pb::SubmitBatchReply {
            result: Some(result),
        }))
    }

    async fn meta_write(
        &self,
        request: Request<pb::Blob>,
    ) -> Result<Response<pb::MetaWriteReply>, Status> {
        use pb::meta_write_reply::Result as R;
        let result = match self
            .0
            .handle(PeerRequest::MetaWrite {
                cmd: request.into_inner().data,
            })
            .await
        {
            PeerResponse::MetaWrite(Forwarded::Ok(b)) => R::Reply(b),
            PeerResponse::MetaWrite(Forwarded::NotLeader(l)) => R::NotLeader(not_leader(l)),
            PeerResponse::MetaWrite(Forwarded::Error(e)) => R::Error(e),
            other => R::Error(format!("unexpected response {other:?}")),
        };
        Ok(Response::new(pb::MetaWriteReply {
            result: Some(result),
        }))
    }

    async fn group_voters(
        &self,
        request: Request<pb::GroupVotersRequest>,
    ) -> Result<Response<pb::GroupVotersReply>, Status> {
        let group = request.into_inner().group;
        match self.0.handle(PeerRequest::GroupVoters { group }).await {
            PeerResponse::GroupVoters(view) => {
                let (known, leader, voters) = match view {
                    Some((leader, voters)) => (true, leader, voters),
                    None => (false, false, Vec::new()),
                };
                Ok(Response::new(pb::GroupVotersReply {
                    known,
                    leader,
                    voters,
                }))
            }
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn service(
        &self,
        request: Request<pb::Blob>,
    ) -> Result<Response<pb::ServiceReply>, Status> {
        use pb::service_reply::Result as R;
        let payload = request.into_inner().data;
        let result = match self.0.handle(PeerRequest::Service { payload }).await {
            PeerResponse::Service(Ok(p)) => R::Payload(p),
            PeerResponse::Service(Err(e)) => R::Error(e),
            other => R::Error(format!("unexpected response {other:?}")),
        };
        Ok(Response::new(pb::ServiceReply {
            result: Some(result),
        }))
    }

    async fn meta_index(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::MetaIndexReply>, Status> {
        match self.0.handle(PeerRequest::MetaIndex).await {
            PeerResponse::MetaIndex(committed) => {
                Ok(Response::new(pb::MetaIndexReply { committed }))
            }
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn meta_wait(
        &self,
        request: Request<pb::MetaWaitRequest>,
    ) -> Result<Response<pb::MetaIndexReply>, Status> {
        let req = request.into_inner();
        match self
            .0
            .handle(PeerRequest::MetaWait {
                index: req.index,
                timeout: Duration::from_millis(req.timeout_ms.min(10_000)),
            })
            .await
        {
            PeerResponse::MetaIndex(committed) => {
                Ok(Response::new(pb::MetaIndexReply { committed }))
            }
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn deliver(
        &self,
        request: Request<pb::DeliverBatch>,
    ) -> Result<Response<pb::DeliverAck>, Status> {
        self.0
            .handle({
                let batch = request.into_inner();
                PeerRequest::Deliver {
                    from: batch.from,
                    items: batch.deliveries,
                }
            })
            .await;
        Ok(Response::new(pb::DeliverAck {
            unknown_consumers: Vec::new(),
        }))
    }
}

/// Serves the Raft, Peer and Admin services on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn PeerHandler>,
    admin: pb::admin_server::AdminServer<impl pb::admin_server::Admin>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // The builder's tcp_nodelay applies only to listeners it binds itself: without it on the
    // accepted sockets, small replies (Raft acks, forwarded publishes' results) wait out
    // Nagle's algorithm against the peer's delayed ACK, ~40 ms each.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Thousands of groups share one connection per peer; a burst of calls that time out
        // together must not make the server drop the connection.
        .http2_max_pending_accept_reset_streams(Some(10_000))
        .add_service(
            pb::raft_server::RaftServer::new(RaftService(handler.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            pb::peer_server::PeerServer::new(PeerService(handler))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Finds the cluster's initial members through DNS: `service` (host:port) resolves to the
/// address of every node (a Kubernetes headless service does this for a StatefulSet's pods);
/// each answers a hello with its node id and the address it advertises. Returns once `expect`
/// distinct nodes answered, this one among them, so that every node starts the metadata group
/// with the same member list.
pub async fn discover_members(
    service: &str,
    expect: usize,
    deadline: std::time::Instant,
) -> Result<std::collections::BTreeMap<NodeId, String>, String> {
    let mut found = std::collections::BTreeMap::new();
    loop {
        // A comma-separated list of names is allowed too (each resolved the same way).
        let mut addrs = Vec::new();
        for name in service.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(found) = tokio::net::lookup_host(name).await {
                addrs.extend(found);
            }
        }
        {
            for addr in addrs {
                let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
                    Ok(e) => e.connect_timeout(Duration::from_secs(1)),
                    Err(_) => continue,
                };
                let Ok(channel) = endpoint.connect().await else {
                    continue;
                };
                let mut client = pb::peer_client::PeerClient::new(channel);
                let hello = pb::HelloRequest {
                    from: 0,
                    incarnation: 0,
                    advertise: String::new(),
                };
                if let Ok(reply) = client
                    .hello(with_timeout(hello, Duration::from_secs(1)))
                    .await
                {
                    let reply = reply.into_inner();
                    if reply.node_id != 0 && !reply.advertise.is_empty() {
                        found.insert(reply.node_id, reply.advertise);
                    }
                }
            }
        }
        if found.len() >= expect {
            return Ok(found);
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "found {} of {expect} nodes through {service}: {found:?}",
                found.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose process is gone leaves its port closed: the call must say so, not just
    /// "unreachable", so its peers can declare it down at once.
    #[tokio::test]
    async fn a_call_to_a_closed_port_is_refused_and_one_to_a_silent_peer_is_not() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        // Accepts connections (the kernel completes the handshake) but never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_addr = silent.local_addr().expect("addr");

        let transport = GrpcTransport::new();
        transport.set_address(2, &closed_addr.to_string());
        transport.set_address(3, &silent_addr.to_string());
        let hello = || PeerRequest::Hello {
            from: 1,
            incarnation: 1,
            advertise: "127.0.0.1:1".into(),
        };
        let timeout = Duration::from_millis(300);
        let refused = transport.call(2, hello(), timeout).await;
        assert!(
            matches!(refused, Err(TransportError::Refused { node: 2 })),
            "{refused:?}"
        );
        let quiet = transport.call(3, hello(), timeout).await;
        assert!(
            matches!(
                quiet,
                Err(TransportError::Timeout { .. } | TransportError::Unreachable { .. })
            ),
            "{quiet:?}"
        );
        drop(silent);
    }
}
