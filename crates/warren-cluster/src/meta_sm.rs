//! openraft's state machine for the metadata group: applies committed metadata commands to the
//! node's shared `MetaState` and hands their effects to the node's queue registry.
//!
//! The whole `MetaState` is small, so it is snapshotted whole (same storage helpers as
//! `queue_sm`). Effects are handled synchronously inside apply — a queue's handle exists
//! before the declare's reply reaches the client — by whatever implements `MetaEffects`
//! (the `node` module's registry).

use std::io::{self, Cursor};
use std::sync::{Arc, RwLock};

use futures::TryStreamExt;
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use warren_core::meta::{MetaEffect, MetaState};

use crate::db::{GroupId, Storage};
use crate::queue_sm::{
    StoredSnapshot, current_snapshot, io_err, load_snapshot, persist_snapshot, save_snapshot,
};
use crate::types::{GroupRequest, GroupResponse, TypeConfig};

/// Receives what applying metadata commands changes, to keep queue handles in step.
pub trait MetaEffects: Send + Sync + 'static {
    fn on_effect(&self, effect: MetaEffect);
    /// The state was replaced wholesale (restored or installed snapshot).
    fn reset(&self, state: &MetaState);
}

pub struct MetaMachine {
    group: GroupId,
    storage: Storage,
    state: Arc<RwLock<MetaState>>,
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    effects: Arc<dyn MetaEffects>,
}

impl MetaMachine {
    pub fn open(
        storage: Storage,
        group: GroupId,
        state: Arc<RwLock<MetaState>>,
        effects: Arc<dyn MetaEffects>,
    ) -> io::Result<Self> {
        let mut machine = MetaMachine {
            group,
            storage,
            state,
            last_applied: None,
            membership: StoredMembership::default(),
            effects,
        };
        if let Some(snap) = load_snapshot(&machine.storage, group)? {
            machine.restore(&snap.data)?;
            machine.last_applied = snap.meta.last_log_id;
            machine.membership = snap.meta.last_membership;
        }
        Ok(machine)
    }

    fn restore(&mut self, data: &[u8]) -> io::Result<()> {
        let mut restored: MetaState = postcard::from_bytes(data).map_err(io_err)?;
        restored.rebuild_indexes();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = restored;
        self.effects.reset(&state);
        Ok(())
    }
}

pub struct MetaSnapshotBuilder {
    group: GroupId,
    storage: Storage,
    data: io::Result<Vec<u8>>,
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
}

impl RaftSnapshotBuilder<TypeConfig> for MetaSnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>> {
        let data = std::mem::replace(&mut self.data, Ok(Vec::new()))?;
        persist_snapshot(
            &self.storage,
            self.group,
            SnapshotMetaOf::<TypeConfig> {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
            },
            data,
        )
    }
}

impl RaftStateMachine<TypeConfig> for MetaMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = MetaSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            self.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => GroupResponse::Empty,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    GroupResponse::Empty
                }
                EntryPayload::Normal(GroupRequest::Meta(cmd)) => {
                    let (reply, effects) = {
                        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                        state.apply(cmd)
                    };
                    for effect in effects {
                        self.effects.on_effect(effect);
                    }
                    GroupResponse::Meta(reply)
                }
                EntryPayload::Normal(GroupRequest::Queue(_) | GroupRequest::QueueBatch(_)) => {
                    GroupResponse::Empty
                }
            };
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let data = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            postcard::to_allocvec(&*state).map_err(io_err)
        };
        MetaSnapshotBuilder {
            group: self.group,
            storage: self.storage.clone(),
            data,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> io::Result<()> {
        let data = snapshot.into_inner();
        self.restore(&data)?;
        save_snapshot(
            &self.storage,
            self.group,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>> {
        current_snapshot(&self.storage, self.group)
    }
}
