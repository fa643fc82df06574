//! The node-to-node transport over gRPC (tonic, `proto/warren.proto`): a `Transport` that
//! keeps one HTTP/2 channel per peer, shared by every group and kind of call, and the server
//! side that hands requests to the node's `PeerHandler`.
//!
//! The frequent calls (Raft messages but snapshots, forwarded queue commands, deliveries) go
//! on one long-lived `Calls` stream per peer, matched to their replies by id: a unary call
//! costs an HTTP/2 stream of its own (headers both ways, trailers, a server task, a timer),
//! which was most of the transport's CPU under load. The rest stay unary; so does everything
//! towards a peer whose build has no `Calls` yet (a rolling upgrade), and the server keeps
//! answering the unary forms of the streamed calls for the same reason.
//!
//! The admin service (`Admin`) is served from the same listener; `admin` implements it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
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
    streams: Mutex<HashMap<NodeId, CallStream>>,
}

/// The `Calls` stream to one peer at one address.
struct CallStream {
    addr: String,
    outgoing: mpsc::UnboundedSender<pb::Call>,
    pending: Arc<Mutex<Pending>>,
}

type CallResult = Result<Option<pb::call_reply::Result>, TransportError>;
type ReplySender = oneshot::Sender<CallResult>;

/// A call queued on a stream: its id and where its reply arrives.
struct SentCall {
    id: u64,
    pending: Arc<Mutex<Pending>>,
    reply: oneshot::Receiver<CallResult>,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    waiting: HashMap<u64, ReplySender>,
    /// The stream is over (its waiting calls failed); the next call opens a new one.
    ended: bool,
    /// When the peer was found to have no `Calls` method: it is called the unary way until
    /// `UNARY_RETRY` later, when the stream is tried again (it may have been upgraded).
    unary_since: Option<Instant>,
    /// Encoded bytes of the calls queued and not yet taken by the stream.
    queued_bytes: usize,
}

/// Most bytes of calls queued for one peer that has not taken them. A peer that stops reading
/// (stalled, or cut off before its connection is declared dead) would otherwise keep every
/// call sent to it in memory: Raft retries an AppendEntries that timed out, up to 16 MiB
/// each, several times a second. Past this, calls fail at once as if the peer were
/// unreachable, and Raft backs off.
const QUEUED_BYTES_LIMIT: usize = 64 << 20;

/// How long a peer without the call stream is called the unary way before the stream is
/// tried again.
const UNARY_RETRY: Duration = Duration::from_secs(30);

impl Pending {
    fn end(&mut self, error: &TransportError) {
        self.ended = true;
        for (_, waiter) in self.waiting.drain() {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

impl CallStream {
    /// Opens the stream; a task reads the replies and hands each to its caller. The outgoing
    /// queue is bounded in bytes ([`QUEUED_BYTES_LIMIT`]), not in calls: its callers bound how
    /// many calls they have waiting (Raft one message at a time per group and follower, a
    /// queue's proposer 16 forwarded batches, deliveries one batch), but a call that timed out
    /// stays queued until the stream takes it, and its caller sends another.
    fn open(target: NodeId, addr: String, channel: Channel) -> Result<Self, TransportError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| TransportError::Unreachable {
                node: target,
                reason: format!("no runtime for the call stream: {e}"),
            })?;
        let (outgoing, queued) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(Pending::default()));
        runtime.spawn(read_replies(target, channel, queued, pending.clone()));
        Ok(CallStream {
            addr,
            outgoing,
            pending,
        })
    }
}

async fn read_replies(
    target: NodeId,
    channel: Channel,
    queued: mpsc::UnboundedReceiver<pb::Call>,
    pending: Arc<Mutex<Pending>>,
) {
    let mut client = pb::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // A call that timed out while queued (a peer cut off, its connection not yet declared
    // dead) is not sent: nobody waits for its reply any more.
    let still_waited_for = {
        let pending = pending.clone();
        move |call: &pb::Call| {
            let mut pending = lock(&pending);
            pending.queued_bytes = pending.queued_bytes.saturating_sub(call.encoded_len());
            futures::future::ready(pending.waiting.contains_key(&call.id))
        }
    };
    let calls = UnboundedReceiverStream::new(queued).filter(still_waited_for);
    let error = match client.calls(calls).await {
        Err(status) => {
            if status.code() == tonic::Code::Unimplemented {
                lock(&pending).unary_since = Some(Instant::now());
            }
            status_error(target, Duration::ZERO, status)
        }
        Ok(replies) => {
            let mut replies = replies.into_inner();
            loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        let waiter = lock(&pending).waiting.remove(&reply.id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(Ok(reply.result));
                        }
                    }
                    Ok(None) => {
                        break TransportError::Unreachable {
                            node: target,
                            reason: "the peer ended the call stream".into(),
                        };
                    }
                    Err(status) => break status_error(target, Duration::ZERO, status),
                }
            }
        }
    };
    lock(&pending).end(&error);
}

/// Whether a call of `size` bytes may join `queued` bytes not yet taken by the peer. A call
/// alone is always admitted, however large: the limit bounds what piles up behind it.
fn admits(queued: usize, size: usize) -> bool {
    queued == 0 || queued + size <= QUEUED_BYTES_LIMIT
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The streamed form of a request, or the request back if it goes as a unary call.
fn streamed(request: PeerRequest) -> Result<pb::call::Request, PeerRequest> {
    use pb::call::Request as C;
    match request {
        PeerRequest::Raft {
            group,
            rpc,
            payload,
        } => {
            let kind = match rpc {
                RaftRpc::AppendEntries => pb::RaftKind::AppendEntries,
                RaftRpc::Vote => pb::RaftKind::Vote,
                RaftRpc::PreVote => pb::RaftKind::PreVote,
                RaftRpc::TransferLeader => pb::RaftKind::TransferLeader,
                // Large, rare, and must not hold up the stream's other calls.
                RaftRpc::InstallSnapshot => {
                    return Err(PeerRequest::Raft {
                        group,
                        rpc,
                        payload,
                    });
                }
            };
            Ok(C::Raft(pb::RaftCall {
                group,
                kind: kind as i32,
                payload,
            }))
        }
        PeerRequest::Submit { queue, requests } => Ok(C::Submit(pb::SubmitBatch {
            group: queue,
            requests,
        })),
        PeerRequest::Deliver { from, items } => Ok(C::Deliver(pb::DeliverBatch {
            deliveries: items,
            from,
        })),
        other => Err(other),
    }
}

/// What a streamed call's reply means to the caller.
fn streamed_response(
    target: NodeId,
    result: Option<pb::call_reply::Result>,
) -> Result<PeerResponse, TransportError> {
    use pb::call_reply::Result as R;
    match result {
        Some(R::Raft(reply)) => Ok(raft_response(reply)),
        Some(R::Submit(reply)) => Ok(submit_response(reply)),
        Some(R::Deliver(_)) => Ok(PeerResponse::Delivered),
        None => Err(TransportError::Protocol {
            node: target,
            reason: "a call stream reply without a result".into(),
        }),
    }
}

fn raft_response(reply: pb::RaftReply) -> PeerResponse {
    PeerResponse::Raft(match reply.result {
        Some(pb::raft_reply::Result::Payload(p)) => Ok(p),
        Some(pb::raft_reply::Result::Error(e)) => Err(e),
        None => Err("empty reply".into()),
    })
}

fn submit_response(reply: pb::SubmitBatchReply) -> PeerResponse {
    use pb::submit_batch_reply::Result as R;
    PeerResponse::Submit(match reply.result {
        Some(R::Outcomes(o)) => Forwarded::Ok(o.outcomes),
        Some(R::NotLeader(n)) => forwarded(Some(n), None, None),
        Some(R::Error(e)) => Forwarded::Error(e),
        None => Forwarded::Error("empty reply".into()),
    })
}

impl GrpcTransport {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queues `request` on the peer's call stream (opening one if there is none, the last one
    /// ended or the peer moved) and returns what waits for its reply.
    fn send_on_stream(
        &self,
        target: NodeId,
        request: pb::call::Request,
    ) -> Result<SentCall, TransportError> {
        let mut streams = lock(&self.streams);
        let usable = streams
            .get(&target)
            .is_some_and(|s| self.address_is(target, &s.addr) && !lock(&s.pending).ended);
        if !usable {
            let (addr, channel) = self.addressed_channel(target)?;
            streams.insert(target, CallStream::open(target, addr, channel)?);
        }
        let stream = &streams[&target];
        let mut pending = lock(&stream.pending);
        if pending.ended {
            // It ended since it was found usable: its reader has failed every waiting call
            // and would never answer this one.
            return Err(TransportError::Unreachable {
                node: target,
                reason: "the call stream ended".into(),
            });
        }
        let id = pending.next_id;
        let call = pb::Call {
            id,
            request: Some(request),
        };
        let size = call.encoded_len();
        if !admits(pending.queued_bytes, size) {
            return Err(TransportError::Unreachable {
                node: target,
                reason: format!(
                    "the peer is not taking calls: {} bytes queued for it",
                    pending.queued_bytes
                ),
            });
        }
        pending.next_id += 1;
        let (waiter, reply) = oneshot::channel();
        pending.waiting.insert(id, waiter);
        if stream.outgoing.send(call).is_err() {
            pending.waiting.remove(&id);
            return Err(TransportError::Unreachable {
                node: target,
                reason: "the call stream closed".into(),
            });
        }
        pending.queued_bytes += size;
        Ok(SentCall {
            id,
            pending: stream.pending.clone(),
            reply,
        })
    }

    /// Whether calls to `target` must be unary: its last call stream, lately, found no such
    /// method.
    fn unary_only(&self, target: NodeId) -> bool {
        lock(&self.streams).get(&target).is_some_and(|s| {
            self.address_is(target, &s.addr)
                && lock(&s.pending)
                    .unary_since
                    .is_some_and(|since| since.elapsed() < UNARY_RETRY)
        })
    }

    /// Whether `addr` is where `node` is to be reached now. Taken under `streams`, never the
    /// other way round.
    fn address_is(&self, node: NodeId, addr: &str) -> bool {
        self.addresses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .is_some_and(|known| known == addr)
    }

    fn channel(&self, node: NodeId) -> Result<Channel, TransportError> {
        self.addressed_channel(node).map(|(_, channel)| channel)
    }

    fn addressed_channel(&self, node: NodeId) -> Result<(String, Channel), TransportError> {
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
            return Ok((addr, channel.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(format!("bad address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        channels.insert(node, (addr.clone(), channel.clone()));
        Ok((addr, channel))
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
        let request = if self.unary_only(target) {
            request
        } else {
            match streamed(request) {
                Ok(call) => {
                    let sent = self.send_on_stream(target, call);
                    return Box::pin(async move {
                        let SentCall { id, pending, reply } = sent?;
                        match tokio::time::timeout(timeout, reply).await {
                            Ok(Ok(Ok(result))) => streamed_response(target, result),
                            Ok(Ok(Err(e))) => Err(e),
                            Ok(Err(_)) => Err(TransportError::Unreachable {
                                node: target,
                                reason: "the call stream closed".into(),
                            }),
                            Err(_) => {
                                // A reply after this is dropped: nobody waits for it.
                                lock(&pending).waiting.remove(&id);
                                Err(TransportError::Timeout {
                                    node: target,
                                    after: timeout,
                                })
                            }
                        }
                    });
                }
                Err(request) => request,
            }
        };
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
                    Ok(raft_response(reply))
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
                    Ok(submit_response(reply))
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
struct PeerService {
    handler: Arc<dyn PeerHandler>,
    /// Becomes true when the server shuts down: call streams end then, since a graceful
    /// shutdown waits for every open stream and peers would keep theirs open for ever.
    stopping: watch::Receiver<bool>,
}

impl PeerService {
    fn new(handler: Arc<dyn PeerHandler>, stopping: watch::Receiver<bool>) -> Self {
        PeerService { handler, stopping }
    }
}

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
        Ok(Response::new(raft_reply(response)))
    }
}

fn raft_reply(response: PeerResponse) -> pb::RaftReply {
    let result = match response {
        PeerResponse::Raft(Ok(p)) => pb::raft_reply::Result::Payload(p),
        PeerResponse::Raft(Err(e)) => pb::raft_reply::Result::Error(e),
        other => pb::raft_reply::Result::Error(format!("unexpected response {other:?}")),
    };
    pb::RaftReply {
        result: Some(result),
    }
}

fn submit_reply(response: PeerResponse) -> pb::SubmitBatchReply {
    use pb::submit_batch_reply::Result as R;
    let result = match response {
        PeerResponse::Submit(Forwarded::Ok(outcomes)) => R::Outcomes(pb::Outcomes { outcomes }),
        PeerResponse::Submit(Forwarded::NotLeader(l)) => R::NotLeader(not_leader(l)),
        PeerResponse::Submit(Forwarded::Error(e)) => R::Error(e),
        other => R::Error(format!("unexpected response {other:?}")),
    };
    pb::SubmitBatchReply {
        result: Some(result),
    }
}

/// Answers one call of a `Calls` stream.
fn answer(handler: &Arc<dyn PeerHandler>, call: pb::Call) -> BoxFuture<'static, pb::CallReply> {
    use pb::call::Request as C;
    use pb::call_reply::Result as R;
    let id = call.id;
    let (request, reply): (_, fn(PeerResponse) -> R) = match call.request {
        Some(C::Raft(raft)) => {
            let rpc = match pb::RaftKind::try_from(raft.kind) {
                Ok(pb::RaftKind::AppendEntries) => RaftRpc::AppendEntries,
                Ok(pb::RaftKind::Vote) => RaftRpc::Vote,
                Ok(pb::RaftKind::PreVote) => RaftRpc::PreVote,
                Ok(pb::RaftKind::TransferLeader) => RaftRpc::TransferLeader,
                Err(_) => {
                    let refused = raft_reply(PeerResponse::Raft(Err(format!(
                        "unknown Raft call kind {}",
                        raft.kind
                    ))));
                    return Box::pin(async move {
                        pb::CallReply {
                            id,
                            result: Some(R::Raft(refused)),
                        }
                    });
                }
            };
            let request = PeerRequest::Raft {
                group: raft.group,
                rpc,
                payload: raft.payload,
            };
            (request, |r| R::Raft(raft_reply(r)))
        }
        Some(C::Submit(batch)) => {
            let request = PeerRequest::Submit {
                queue: batch.group,
                requests: batch.requests,
            };
            (request, |r| R::Submit(submit_reply(r)))
        }
        Some(C::Deliver(batch)) => {
            let request = PeerRequest::Deliver {
                from: batch.from,
                items: batch.deliveries,
            };
            (request, |_| {
                R::Deliver(pb::DeliverAck {
                    unknown_consumers: Vec::new(),
                })
            })
        }
        None => return Box::pin(async move { pb::CallReply { id, result: None } }),
    };
    let response = handler.handle(request);
    Box::pin(async move {
        pb::CallReply {
            id,
            result: Some(reply(response.await)),
        }
    })
}

/// Serves one peer's `Calls` stream, as the stream of its replies: polling it takes in the
/// calls that have arrived, runs them and yields each reply as soon as it is ready. HTTP/2's
/// task for the stream polls it, so calls and replies take no extra hop between tasks. It
/// ends when the caller's side does or the server stops; calls still running then are
/// dropped, as a unary call's handler is when its caller goes away.
struct CallReplies {
    handler: Arc<dyn PeerHandler>,
    calls: Streaming<pb::Call>,
    calls_ended: bool,
    running: FuturesUnordered<BoxFuture<'static, pb::CallReply>>,
    stopped: BoxFuture<'static, ()>,
}

impl CallReplies {
    fn new(
        handler: Arc<dyn PeerHandler>,
        calls: Streaming<pb::Call>,
        mut stopping: watch::Receiver<bool>,
    ) -> Self {
        CallReplies {
            handler,
            calls,
            calls_ended: false,
            running: FuturesUnordered::new(),
            stopped: Box::pin(async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            }),
        }
    }
}

impl Stream for CallReplies {
    type Item = Result<pb::CallReply, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        while !this.calls_ended {
            match this.calls.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(call))) => this.running.push(answer(&this.handler, call)),
                Poll::Ready(_) => this.calls_ended = true,
                Poll::Pending => break,
            }
        }
        if this.calls_ended {
            return Poll::Ready(None);
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(reply)) => Poll::Ready(Some(Ok(reply))),
            // Nothing running: the calls' stream has registered the wake-up.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
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
            .handler
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

    type CallsStream = Pin<Box<dyn Stream<Item = Result<pb::CallReply, Status>> + Send>>;

    async fn calls(
        &self,
        request: Request<Streaming<pb::Call>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        Ok(Response::new(Box::pin(CallReplies::new(
            self.handler.clone(),
            request.into_inner(),
            self.stopping.clone(),
        ))))
    }

    async fn submit(
        &self,
        request: Request<pb::SubmitBatch>,
    ) -> Result<Response<pb::SubmitBatchReply>, Status> {
        let req = request.into_inner();
        let response = self
            .handler
            .handle(PeerRequest::Submit {
                queue: req.group,
                requests: req.requests,
            })
            .await;
        Ok(Response::new(submit_reply(response)))
    }

    async fn meta_write(
        &self,
        request: Request<pb::Blob>,
    ) -> Result<Response<pb::MetaWriteReply>, Status> {
        use pb::meta_write_reply::Result as R;
        let result = match self
            .handler
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
        match self
            .handler
            .handle(PeerRequest::GroupVoters { group })
            .await
        {
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
        let result = match self.handler.handle(PeerRequest::Service { payload }).await {
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
        match self.handler.handle(PeerRequest::MetaIndex).await {
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
            .handler
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
        self.handler
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
    let (stop, stopping) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
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
            pb::peer_server::PeerServer::new(PeerService::new(handler, stopping))
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

    /// Answers Raft calls with their payload reversed, after holding each one until the
    /// test lets it go (so replies can be made to come back in any order), and counts
    /// deliveries.
    #[derive(Default)]
    struct Echo {
        gates: Mutex<HashMap<u64, oneshot::Receiver<()>>>,
        delivered: std::sync::atomic::AtomicUsize,
    }

    impl PeerHandler for Echo {
        fn handle(&self, request: PeerRequest) -> BoxFuture<'static, PeerResponse> {
            match request {
                PeerRequest::Raft { group, payload, .. } => {
                    let gate = lock(&self.gates).remove(&group);
                    Box::pin(async move {
                        if let Some(gate) = gate {
                            let _ = gate.await;
                        }
                        PeerResponse::Raft(Ok(payload.into_iter().rev().collect()))
                    })
                }
                PeerRequest::Submit { queue, .. } => {
                    Box::pin(async move { PeerResponse::Submit(Forwarded::NotLeader(Some(queue))) })
                }
                PeerRequest::Deliver { .. } => {
                    self.delivered
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Box::pin(async { PeerResponse::Delivered })
                }
                other => {
                    Box::pin(
                        async move { PeerResponse::Service(Err(format!("unexpected {other:?}"))) },
                    )
                }
            }
        }
    }

    /// Serves `handler` on a fresh loopback port: the Raft service, and the Peer service
    /// (with `Calls`) unless `with_peer` is false, as a build from before `Calls` would not
    /// answer it either. Dropping the returned sender stops the server.
    async fn serve_for_test(
        handler: Arc<dyn PeerHandler>,
        with_peer: bool,
    ) -> (String, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_calls, stopping) = watch::channel(false);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let peer = with_peer
            .then(|| pb::peer_server::PeerServer::new(PeerService::new(handler.clone(), stopping)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::raft_server::RaftServer::new(RaftService(handler)))
                .add_optional_service(peer)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                    let _ = stop_calls.send(true);
                }),
        );
        (addr, stop)
    }

    fn raft(group: u64, payload: &[u8]) -> PeerRequest {
        PeerRequest::Raft {
            group,
            rpc: RaftRpc::AppendEntries,
            payload: payload.to_vec(),
        }
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A peer that accepts connections and never reads from them (a stalled process): the
    /// calls queued for it stop at the limit, and later ones fail at once.
    #[tokio::test]
    async fn calls_to_a_peer_that_takes_none_stop_queueing_at_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });
        let transport = GrpcTransport::new();
        transport.set_address(2, &addr);
        let payload = vec![7u8; 1 << 20];
        let mut timed_out = 0;
        let mut refused = None;
        for i in 0..(2 * (QUEUED_BYTES_LIMIT >> 20)) {
            let reply = transport
                .call(2, raft(1, &payload), Duration::from_millis(20))
                .await;
            match reply {
                Err(TransportError::Unreachable { reason, .. })
                    if reason.contains("not taking calls") =>
                {
                    refused = Some(i);
                    break;
                }
                Err(_) => timed_out += 1,
                Ok(r) => panic!("answered by a peer that reads nothing: {r:?}"),
            }
        }
        let refused = refused.expect("calls kept queueing");
        assert!(
            refused <= (QUEUED_BYTES_LIMIT >> 20) + 1 && timed_out == refused,
            "refused at call {refused} after {timed_out} timeouts"
        );
        let queued = lock(&transport.streams)[&2].pending.clone();
        assert!(lock(&queued).queued_bytes <= QUEUED_BYTES_LIMIT + (2 << 20));
        held.abort();
    }

    #[test]
    fn a_call_alone_is_admitted_however_large() {
        assert!(admits(0, 2 * QUEUED_BYTES_LIMIT));
        assert!(admits(1, QUEUED_BYTES_LIMIT - 1));
        assert!(!admits(1, QUEUED_BYTES_LIMIT));
    }

    /// The call got the Raft payload `want` back.
    fn assert_answered(reply: &Result<PeerResponse, TransportError>, want: &[u8]) {
        assert!(
            matches!(reply, Ok(PeerResponse::Raft(Ok(p))) if p == want),
            "{reply:?}"
        );
    }

    #[tokio::test]
    async fn calls_on_one_stream_get_their_own_replies_in_whatever_order_they_finish() {
        let echo = Arc::new(Echo::default());
        let mut release = Vec::new();
        for group in 1..=3 {
            let (open, gate) = oneshot::channel();
            lock(&echo.gates).insert(group, gate);
            release.push(open);
        }
        let (addr, _server) = serve_for_test(echo.clone(), true).await;
        let transport = GrpcTransport::new();
        transport.set_address(2, &addr);
        let calls: Vec<_> = (1..=3u8)
            .map(|g| transport.call(2, raft(u64::from(g), &[g, 0, 9]), PATIENCE))
            .collect();
        // The last call is let go first, so replies come back in reverse order.
        for open in release.into_iter().rev() {
            let _ = open.send(());
        }
        let replies = futures::future::join_all(calls).await;
        for (g, reply) in (1..=3u8).zip(replies) {
            match reply {
                Ok(PeerResponse::Raft(Ok(p))) => assert_eq!(p, vec![9, 0, g]),
                other => panic!("call {g}: {other:?}"),
            }
        }
        let submitted = transport
            .call(
                2,
                PeerRequest::Submit {
                    queue: 7,
                    requests: vec![vec![1]],
                },
                PATIENCE,
            )
            .await;
        assert!(
            matches!(
                submitted,
                Ok(PeerResponse::Submit(Forwarded::NotLeader(Some(7))))
            ),
            "{submitted:?}"
        );
        let delivered = transport
            .call(
                2,
                PeerRequest::Deliver {
                    from: 1,
                    items: vec![vec![1]],
                },
                PATIENCE,
            )
            .await;
        assert!(
            matches!(delivered, Ok(PeerResponse::Delivered)),
            "{delivered:?}"
        );
        assert_eq!(echo.delivered.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            lock(&transport.streams).len(),
            1,
            "one stream carried them all"
        );
    }

    #[tokio::test]
    async fn a_call_that_times_out_leaves_the_stream_usable() {
        let echo = Arc::new(Echo::default());
        let (_hold, gate) = oneshot::channel();
        lock(&echo.gates).insert(1, gate);
        let (addr, _server) = serve_for_test(echo, true).await;
        let transport = GrpcTransport::new();
        transport.set_address(2, &addr);
        let stuck = transport
            .call(2, raft(1, b"x"), Duration::from_millis(200))
            .await;
        assert!(
            matches!(stuck, Err(TransportError::Timeout { node: 2, .. })),
            "{stuck:?}"
        );
        let next = transport.call(2, raft(2, b"ab"), PATIENCE).await;
        assert_answered(&next, b"ba");
        let streams = lock(&transport.streams);
        assert!(
            lock(&streams[&2].pending).waiting.is_empty(),
            "nobody left waiting"
        );
    }

    #[tokio::test]
    async fn a_peer_that_went_away_fails_the_calls_it_held_and_a_new_stream_reaches_its_successor()
    {
        let echo = Arc::new(Echo::default());
        let (_hold, gate) = oneshot::channel();
        lock(&echo.gates).insert(1, gate);
        let (addr, server) = serve_for_test(echo, true).await;
        let transport = GrpcTransport::new();
        transport.set_address(2, &addr);
        let held = transport.call(2, raft(1, b"x"), PATIENCE);
        let started = transport.call(2, raft(2, b"y"), PATIENCE).await;
        assert!(
            matches!(started, Ok(PeerResponse::Raft(Ok(_)))),
            "{started:?}"
        );
        drop(server);
        let failed = held.await;
        assert!(
            matches!(failed, Err(TransportError::Unreachable { .. })),
            "{failed:?}"
        );
        // The peer comes back (same node, new process) at another address.
        let (addr, _server) = serve_for_test(Arc::new(Echo::default()), true).await;
        transport.set_address(2, &addr);
        let again = transport.call(2, raft(3, b"zw"), PATIENCE).await;
        assert_answered(&again, b"wz");
    }

    #[tokio::test]
    async fn a_peer_without_the_call_stream_is_called_the_unary_way() {
        let (addr, _server) = serve_for_test(Arc::new(Echo::default()), false).await;
        let transport = GrpcTransport::new();
        transport.set_address(2, &addr);
        // The first call finds out (and fails, as a call to a peer in an upgrade may);
        // the ones after it go unary.
        let first = transport.call(2, raft(1, b"ab"), PATIENCE).await;
        assert!(first.is_err(), "{first:?}");
        assert!(transport.unary_only(2));
        let second = transport.call(2, raft(1, b"ab"), PATIENCE).await;
        assert_answered(&second, b"ba");
        // Some time later the stream is tried again: this peer still has none.
        let aged = Instant::now() - UNARY_RETRY;
        lock(&lock(&transport.streams)[&2].pending).unary_since = Some(aged);
        assert!(!transport.unary_only(2));
        let retried = transport.call(2, raft(1, b"ab"), PATIENCE).await;
        assert!(retried.is_err(), "{retried:?}");
        assert!(transport.unary_only(2));
        // The node comes back elsewhere with a build that has the stream: it is used at once.
        let (addr, _upgraded) = serve_for_test(Arc::new(Echo::default()), true).await;
        transport.set_address(2, &addr);
        assert!(!transport.unary_only(2));
        let streamed = transport.call(2, raft(1, b"ab"), PATIENCE).await;
        assert_answered(&streamed, b"ba");
        assert!(
            lock(&lock(&transport.streams)[&2].pending)
                .unary_since
                .is_none()
        );
    }

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
