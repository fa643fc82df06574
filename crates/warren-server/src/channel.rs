//! Per-channel protocol state of an AMQP connection: publish assembly, delivery tags and
//! unacknowledged deliveries, consumers, publisher-confirm bookkeeping, and what a
//! transactional channel holds until tx.commit.
//!
//! `connection` owns one `Channel` per open channel and drives it; nothing here does I/O, so
//! the confirm arithmetic and publish assembly are tested directly below.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use warren_cluster::{Delivery, QueueHandle};
use warren_codec::{BasicPublish, ContentHeader, Frame};
use warren_core::queue::{MessageMeta, TxSettle};
use warren_core::{ChannelRef, MessageContent, MsgId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    Open,
    /// The server sent channel.close and waits for close-ok.
    Closing,
}

/// A delivery the client has not settled yet.
pub struct Unacked {
    pub handle: Arc<QueueHandle>,
    pub msg: MsgId,
    /// Body size, for basic.qos prefetch-size.
    pub size: u64,
    /// When an unacknowledged delivery times out (consumer timeout); None: never.
    pub deadline: Option<std::time::Instant>,
    /// The queue's count of earlier deliveries of the message when it sent this one.
    pub delivery_count: u32,
}

/// What [`UnackedDeliveries`] needs to know of a delivery it holds.
pub trait HeldDelivery {
    /// The queue's id and the message's.
    fn message(&self) -> (u64, MsgId);
    fn delivery_count(&self) -> u32;
    /// Body size, for basic.qos prefetch-size.
    fn size(&self) -> u64;
}

impl HeldDelivery for Unacked {
    fn message(&self) -> (u64, MsgId) {
        (self.handle.id(), self.msg)
    }
    fn delivery_count(&self) -> u32 {
        self.delivery_count
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// A channel's unsettled deliveries by delivery tag, also indexed by message, so a delivery
/// can be checked against the copies the channel holds without walking them (a consumer with
/// no prefetch limit may hold very many), and with their body bytes summed for basic.qos
/// prefetch-size.
pub struct UnackedDeliveries<D = Unacked> {
    by_tag: BTreeMap<u64, D>,
    /// Per (queue, message): how many deliveries of it are held, and the highest delivery count
    /// among those held since the first of them came. The count is not lowered when the
    /// highest one leaves: a settled delivery is remembered by `RecentlySettled` anyway.
    by_msg: HashMap<(u64, MsgId), (usize, u32)>,
    bytes: u64,
}

impl<D> Default for UnackedDeliveries<D> {
    fn default() -> Self {
        UnackedDeliveries {
            by_tag: BTreeMap::new(),
            by_msg: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<D: HeldDelivery> UnackedDeliveries<D> {
    pub fn insert(&mut self, tag: u64, delivery: D) {
        let held = self
            .by_msg
            .entry(delivery.message())
            .or_insert((0, delivery.delivery_count()));
        held.0 += 1;
        held.1 = held.1.max(delivery.delivery_count());
        self.bytes += delivery.size();
        if let Some(replaced) = self.by_tag.insert(tag, delivery) {
            self.forget(&replaced);
        }
    }

    pub fn remove(&mut self, tag: u64) -> Option<D> {
        let delivery = self.by_tag.remove(&tag)?;
        self.forget(&delivery);
        Some(delivery)
    }

    fn forget(&mut self, delivery: &D) {
        self.bytes -= delivery.size();
        let key = delivery.message();
        if let Some(held) = self.by_msg.get_mut(&key) {
            held.0 -= 1;
            if held.0 == 0 {
                self.by_msg.remove(&key);
            }
        }
    }

    /// Every delivery, in tag order, leaving none.
    pub fn take_all(&mut self) -> Vec<(u64, D)> {
        let taken = std::mem::take(&mut self.by_tag);
        self.clear();
        taken.into_iter().collect()
    }

    pub fn clear(&mut self) {
        self.by_tag.clear();
        self.by_msg.clear();
        self.bytes = 0;
    }

    /// The deliveries up to and including `tag` (an ack with multiple set), in tag order.
    pub fn take_through(&mut self, tag: u64) -> Vec<(u64, D)> {
        let rest = self.by_tag.split_off(&tag.saturating_add(1));
        let taken = std::mem::replace(&mut self.by_tag, rest);
        for delivery in taken.values() {
            self.forget(delivery);
        }
        taken.into_iter().collect()
    }

    /// Whether any delivery has a tag up to and including `tag`.
    pub fn any_through(&self, tag: u64) -> bool {
        self.by_tag.range(..=tag).next().is_some()
    }

    pub fn len(&self) -> usize {
        self.by_tag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tag.is_empty()
    }

    /// Body bytes of every delivery held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &D)> {
        self.by_tag.iter()
    }

    /// The highest delivery count of the message's deliveries this channel holds, if any.
    pub fn highest_count_held(&self, queue: u64, msg: MsgId) -> Option<u32> {
        self.by_msg.get(&(queue, msg)).map(|held| held.1)
    }
}

pub struct ConsumerEntry {
    pub handle: Arc<QueueHandle>,
    /// False until consume-ok went out; deliveries wait in `pending` so the client never sees
    /// a basic.deliver before the consume-ok of its consumer.
    pub ready: bool,
    pub pending: Vec<Delivery>,
    /// How long its deliveries may stay unacknowledged (None: no limit).
    pub timeout: Option<std::time::Duration>,
    /// As basic.consume asked, for the management API's consumer listing.
    pub no_ack: bool,
    pub exclusive: bool,
    pub prefetch: u32,
    pub arguments: warren_codec::FieldTable,
}

/// Deliveries this channel settled lately, by (queue, message), with their delivery counts:
/// a new queue leader resends what it cannot know was settled, and a resend of one of these is
/// dropped, since the settlement is on its way to the queue (its command is retried until
/// applied). So is a stale copy (see `repeats_a_known_delivery`).
#[derive(Default)]
pub struct RecentlySettled {
    counts: std::collections::HashMap<(u64, MsgId), u32>,
    order: VecDeque<(u64, MsgId)>,
}

/// Settlements remembered per channel; a leader change resends at most a prefetch window.
const RECENTLY_SETTLED: usize = 4096;

impl RecentlySettled {
    pub fn remember(&mut self, queue: u64, msg: MsgId, delivery_count: u32) {
        match self.counts.entry((queue, msg)) {
            // Settled again (requeued, delivered again), or out of order (an older copy after
            // a newer one): the highest count stands.
            Entry::Occupied(mut known) => *known.get_mut() = (*known.get()).max(delivery_count),
            Entry::Vacant(new) => {
                new.insert(delivery_count);
                self.order.push_back((queue, msg));
                if self.order.len() > RECENTLY_SETTLED
                    && let Some(old) = self.order.pop_front()
                {
                    self.counts.remove(&old);
                }
            }
        }
    }

    /// The delivery count of the message's delivery this channel settled, if it did lately.
    pub fn count_of(&self, queue: u64, msg: MsgId) -> Option<u32> {
        self.counts.get(&(queue, msg)).copied()
    }
}

/// Whether a delivery repeats one this channel holds or settled (`known`: the highest delivery
/// count of those) and must be dropped. Every delivery of a message counts one more return to
/// the queue than every earlier one (each return adds one), so one whose count is not above
/// the known one's is a resend by a new leader or an old copy that arrived late, say through a
/// socket that held it while its sender was cut off: the queue has since taken the message
/// back and delivered it again, or taken the settlement. One with a higher count is live even
/// when flagged as a resend (a new leader resending what the old one delivered after this
/// channel requeued it): dropping it would leave the message checked out to this channel with
/// nobody to settle it.
pub fn repeats_a_known_delivery(known: Option<u32>, delivery_count: u32) -> bool {
    known.is_some_and(|known| delivery_count <= known)
}

/// How a client settled deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    Requeue,
    Discard,
}

impl Settlement {
    /// The same settlement, applied by a transaction's commit.
    pub fn in_transaction(self) -> TxSettle {
        match self {
            Settlement::Ack => TxSettle::Ack,
            Settlement::Requeue => TxSettle::Requeue,
            Settlement::Discard => TxSettle::Discard,
        }
    }
}

/// A publish of a transactional channel, routed and waiting for tx.commit.
pub struct TxPublish {
    pub handles: Vec<Arc<QueueHandle>>,
    pub meta: MessageMeta,
    pub content: MessageContent,
}

/// What a transactional channel did since its last commit or rollback.
#[derive(Default)]
pub struct TxBuffer {
    pub publishes: Vec<TxPublish>,
    /// Acks, nacks and rejects with the delivery tags they took off `unacked`.
    pub settlements: Vec<(Vec<(u64, Unacked)>, Settlement)>,
}

pub struct Channel {
    pub chref: ChannelRef,
    pub state: ChannelState,
    /// A command of this channel is running; later frames wait in `backlog`.
    pub busy: bool,
    pub backlog: VecDeque<Frame>,
    pub publish: Option<PendingPublish>,
    pub confirm: Option<Confirms>,
    next_tag: u64,
    pub unacked: UnackedDeliveries,
    pub consumers: HashMap<String, ConsumerEntry>,
    /// basic.qos prefetch-count for consumers created from now on.
    pub prefetch: u16,
    /// basic.qos global=true: unacked deliveries of the whole channel (0: no limit).
    pub global_prefetch: u16,
    /// basic.qos prefetch-size: unacked body bytes of the whole channel (0: no limit).
    pub prefetch_bytes: u32,
    /// Queues this channel consumed from or fetched from: they hear when it closes.
    pub touched: HashMap<u64, Arc<QueueHandle>>,
    pub last_queue: Option<String>,
    /// Per replicated queue, the sequence number of this channel's last publish to it.
    publish_seqs: HashMap<u64, u64>,
    /// channel.flow: while false, deliveries wait in `held`.
    pub flow_active: bool,
    pub held: VecDeque<Delivery>,
    /// tx.select was sent: publishes and settlements wait here for tx.commit.
    pub tx: Option<TxBuffer>,
    /// Commits of this channel so far: with `chref`, names each commit cluster-wide.
    pub tx_commits: u64,
    pub settled: RecentlySettled,
}

impl Channel {
    pub fn new(chref: ChannelRef) -> Self {
        Channel {
            chref,
            state: ChannelState::Open,
            busy: false,
            backlog: VecDeque::new(),
            publish: None,
            confirm: None,
            next_tag: 0,
            unacked: UnackedDeliveries::default(),
            consumers: HashMap::new(),
            prefetch: 0,
            global_prefetch: 0,
            prefetch_bytes: 0,
            touched: HashMap::new(),
            last_queue: None,
            publish_seqs: HashMap::new(),
            flow_active: true,
            held: VecDeque::new(),
            tx: None,
            tx_commits: 0,
            settled: RecentlySettled::default(),
        }
    }

    /// Whether the channel-wide limits (global prefetch-count, prefetch-size) let one more
    /// acknowledged delivery of `size` bytes out now. A channel with nothing unacked always
    /// takes one message, however large, as RabbitMQ's prefetch-size rule says.
    pub fn has_room_for(&self, size: u64) -> bool {
        if self.unacked.is_empty() {
            return true;
        }
        if self.global_prefetch != 0 && self.unacked.len() >= usize::from(self.global_prefetch) {
            return false;
        }
        if self.prefetch_bytes != 0 && self.unacked.bytes() + size > u64::from(self.prefetch_bytes)
        {
            return false;
        }
        true
    }

    /// The prefetch a new consumer gets from its queue: its own, capped by the channel's
    /// global limit, so no queue hands one channel more than the channel may show.
    pub fn consumer_prefetch(&self) -> u32 {
        match (self.prefetch, self.global_prefetch) {
            (0, g) => u32::from(g),
            (p, 0) => u32::from(p),
            (p, g) => u32::from(p.min(g)),
        }
    }

    /// The first unacknowledged delivery past its deadline: its tag and how long it had.
    pub fn timed_out(&self, now: std::time::Instant) -> Option<u64> {
        self.unacked
            .iter()
            .find(|(_, u)| u.deadline.is_some_and(|d| d <= now))
            .map(|(tag, _)| *tag)
    }

    pub fn next_delivery_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub fn next_publish_seq(&mut self, queue: u64) -> u64 {
        let seq = self.publish_seqs.entry(queue).or_insert(0);
        *seq += 1;
        *seq
    }

    pub fn touch(&mut self, handle: &Arc<QueueHandle>) {
        self.touched
            .entry(handle.id())
            .or_insert_with(|| handle.clone());
    }
}

/// A basic.publish whose content is still arriving.
pub struct PendingPublish {
    method: BasicPublish,
    pub header: Option<ContentHeader>,
    expected: u64,
    /// A single body frame stays a zero-copy slice of the read buffer; several are joined.
    first: Option<Bytes>,
    joined: Option<BytesMut>,
    received: u64,
}

impl PendingPublish {
    pub fn new(method: BasicPublish) -> Self {
        PendingPublish {
            method,
            header: None,
            expected: 0,
            first: None,
            joined: None,
            received: 0,
        }
    }

    pub fn start_body(&mut self, header: ContentHeader) {
        self.expected = header.body_size;
        self.header = Some(header);
    }

    /// Adds a body frame; false when it overruns the size the header announced.
    pub fn push_body(&mut self, payload: Bytes) -> bool {
        let len = payload.len() as u64;
        if self.received + len > self.expected {
            return false;
        }
        self.received += len;
        match (&mut self.first, &mut self.joined) {
            (None, None) => self.first = Some(payload),
            (Some(first), None) => {
                let cap = usize::try_from(self.expected).unwrap_or(usize::MAX);
                let mut buf = BytesMut::with_capacity(cap.min(64 * 1024 * 1024));
                buf.extend_from_slice(first);
                buf.extend_from_slice(&payload);
                self.first = None;
                self.joined = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&payload),
        }
        true
    }

    pub fn complete(&self) -> bool {
        self.header.is_some() && self.received == self.expected
    }

    pub fn into_parts(self) -> (BasicPublish, ContentHeader, Bytes) {
        let body = match (self.first, self.joined) {
            (_, Some(buf)) => buf.freeze(),
            (Some(b), None) => b,
            (None, None) => Bytes::new(),
        };
        let header = self.header.unwrap_or(ContentHeader {
            class_id: warren_codec::class_id::BASIC,
            body_size: 0,
            properties: Bytes::new(),
        });
        (self.method, header, body)
    }
}

/// Publisher confirms of one channel. Sequence numbers start at 1; a publish is confirmed
/// once every queue it was routed to has committed it, and nacked if any failed. Acks go
/// out with `multiple` where a run of sequence numbers allows it.
#[derive(Debug, Default)]
pub struct Confirms {
    last_seq: u64,
    /// Publishes still waiting on queues: remaining targets and whether any failed.
    waiting: BTreeMap<u64, (usize, bool)>,
    /// Finished publishes not yet reported, with their verdict (true = ack).
    finished: BTreeMap<u64, bool>,
    /// Every number at or below this has been reported to the client.
    reported: u64,
    /// Numbers above `reported` that were already reported one by one.
    reported_above: BTreeSet<u64>,
}

impl Confirms {
    pub fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    pub fn expect(&mut self, seq: u64, targets: usize) {
        self.waiting.insert(seq, (targets, false));
    }

    /// A publish that needs no queue (unroutable) or failed before reaching one.
    pub fn settle_now(&mut self, seq: u64, ack: bool) {
        self.finished.insert(seq, ack);
    }

    pub fn target_done(&mut self, seq: u64, ok: bool) {
        let Some((remaining, failed)) = self.waiting.get_mut(&seq) else {
            return;
        };
        *remaining = remaining.saturating_sub(1);
        *failed |= !ok;
        if *remaining == 0 {
            let failed = *failed;
            self.waiting.remove(&seq);
            self.finished.insert(seq, !failed);
        }
    }

    /// Acks/nacks to send now, as (delivery tag, multiple, ack). A run of two or more acks
    /// directly above everything reported becomes one `multiple` ack; the rest go one by one,
    /// so no number is ever reported twice.
    pub fn drain_ready(&mut self) -> Vec<(u64, bool, bool)> {
        let mut out = Vec::new();
        let mut run_end = self.reported;
        while self.finished.get(&(run_end + 1)) == Some(&true) {
            run_end += 1;
        }
        if run_end >= self.reported + 2 {
            for seq in self.reported + 1..=run_end {
                self.finished.remove(&seq);
            }
            out.push((run_end, true, true));
            self.reported = run_end;
        }
        for (seq, ack) in std::mem::take(&mut self.finished) {
            out.push((seq, false, ack));
            self.reported_above.insert(seq);
        }
        while self.reported_above.remove(&(self.reported + 1)) {
            self.reported += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_not_counting_more_returns_than_a_known_one_is_an_old_copy() {
        // Nothing known about the message: deliver.
        assert!(!repeats_a_known_delivery(None, 0));
        assert!(!repeats_a_known_delivery(None, 3));
        // Held or settled at count 1: a resend of it, the same delivery late, or an older one
        // are dropped; the next delivery after a return (count 2) is not, even when a new
        // leader sends it as a resend.
        assert!(repeats_a_known_delivery(Some(1), 1));
        assert!(repeats_a_known_delivery(Some(1), 0));
        assert!(!repeats_a_known_delivery(Some(1), 2));
    }

    #[test]
    fn settlements_are_remembered_with_their_count_up_to_a_bound() {
        let mut settled = RecentlySettled::default();
        settled.remember(7, 1, 0);
        assert_eq!(settled.count_of(7, 1), Some(0));
        assert_eq!(settled.count_of(8, 1), None, "per queue");
        // Requeued at count 0, delivered again and acked at count 1: the later one counts.
        settled.remember(7, 1, 1);
        assert_eq!(settled.count_of(7, 1), Some(1));
        // An older copy settled after the newer one does not lower it.
        settled.remember(7, 1, 0);
        assert_eq!(settled.count_of(7, 1), Some(1));
        for msg in 2..=RECENTLY_SETTLED as u64 + 1 {
            settled.remember(7, msg, 0);
        }
        assert_eq!(settled.count_of(7, 1), None, "the oldest is forgotten");
        assert_eq!(settled.count_of(7, RECENTLY_SETTLED as u64 + 1), Some(0));
    }

    /// A delivery as the index sees it: (queue, message, delivery count, size).
    struct Held(u64, MsgId, u32, u64);

    impl HeldDelivery for Held {
        fn message(&self) -> (u64, MsgId) {
            (self.0, self.1)
        }
        fn delivery_count(&self) -> u32 {
            self.2
        }
        fn size(&self) -> u64 {
            self.3
        }
    }

    #[test]
    fn held_deliveries_are_found_by_message_and_counted_in_bytes() {
        let mut held = UnackedDeliveries::default();
        held.insert(1, Held(7, 10, 0, 100));
        held.insert(2, Held(7, 11, 0, 50));
        held.insert(3, Held(8, 10, 2, 25));
        assert_eq!(held.highest_count_held(7, 10), Some(0));
        assert_eq!(held.highest_count_held(8, 10), Some(2), "per queue");
        assert_eq!(held.highest_count_held(7, 12), None);
        assert_eq!((held.len(), held.bytes()), (3, 175));
        // A later delivery of a message still held (a new leader's, counting a return).
        held.insert(4, Held(7, 10, 1, 100));
        assert_eq!(held.highest_count_held(7, 10), Some(1));
        // An ack with multiple up to 2 takes tags 1 and 2 in order; the copy at 4 stays found.
        let taken: Vec<u64> = held.take_through(2).into_iter().map(|(t, _)| t).collect();
        assert_eq!(taken, vec![1, 2]);
        assert_eq!(held.highest_count_held(7, 10), Some(1));
        assert_eq!(held.highest_count_held(7, 11), None);
        assert!(!held.any_through(2) && held.any_through(3));
        assert_eq!((held.len(), held.bytes()), (2, 125));
        assert!(held.remove(4).is_some() && held.remove(4).is_none());
        assert_eq!(held.highest_count_held(7, 10), None, "the last copy left");
        assert_eq!(held.take_all().len(), 1);
        assert!(held.is_empty() && held.bytes() == 0);
        assert_eq!(held.highest_count_held(8, 10), None);
    }

    #[test]
    fn contiguous_acks_collapse_into_multiple() {
        let mut c = Confirms::default();
        for _ in 0..3 {
            let s = c.next_seq();
            c.expect(s, 1);
        }
        c.target_done(1, true);
        c.target_done(2, true);
        assert_eq!(c.drain_ready(), vec![(2, true, true)]);
        c.target_done(3, true);
        assert_eq!(c.drain_ready(), vec![(3, false, true)]);
    }

    #[test]
    fn out_of_order_completion_is_reported_individually_and_never_twice() {
        let mut c = Confirms::default();
        for _ in 0..3 {
            let s = c.next_seq();
            c.expect(s, 1);
        }
        c.target_done(3, true);
        assert_eq!(c.drain_ready(), vec![(3, false, true)]);
        c.target_done(1, true);
        // 1 alone: a multiple ack up to 2 would wrongly cover 2, which is still waiting.
        assert_eq!(c.drain_ready(), vec![(1, false, true)]);
        c.target_done(2, true);
        assert_eq!(c.drain_ready(), vec![(2, false, true)]);
        // Later runs start above everything reported.
        let s = c.next_seq();
        c.expect(s, 1);
        c.target_done(4, true);
        assert_eq!(c.drain_ready(), vec![(4, false, true)]);
    }

    #[test]
    fn a_failed_target_nacks_the_publish() {
        let mut c = Confirms::default();
        let s = c.next_seq();
        c.expect(s, 2);
        c.target_done(s, true);
        assert!(c.drain_ready().is_empty());
        c.target_done(s, false);
        assert_eq!(c.drain_ready(), vec![(1, false, false)]);
        let s = c.next_seq();
        c.settle_now(s, true);
        assert_eq!(c.drain_ready(), vec![(2, false, true)]);
    }

    #[test]
    fn multi_frame_bodies_are_joined_and_overruns_refused() {
        let mut p = PendingPublish::new(BasicPublish::default());
        p.start_body(ContentHeader {
            class_id: 60,
            body_size: 5,
            properties: Bytes::new(),
        });
        assert!(p.push_body(Bytes::from_static(b"ab")));
        assert!(!p.complete());
        assert!(p.push_body(Bytes::from_static(b"cde")));
        assert!(p.complete());
        assert!(!p.push_body(Bytes::from_static(b"x")));
        let (_, _, body) = p.into_parts();
        assert_eq!(&body[..], b"abcde");
    }
}
