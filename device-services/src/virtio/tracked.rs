//! In-flight tracking of virtqueue requests in the state region, in the spirit of vhost-user's
//! inflight I/O tracking (split rings).
//!
//! Every request a device takes from a queue goes through [`QueueCtx::pop`] and is completed with
//! [`QueueCtx::add_used`]. With a state region attached these keep, per queue, a hot
//! [`QueueWord`] (next avail position, published used index, the head being published) and one
//! [`InflightEntry`] per descriptor head, each a single self-checking atomic word. The order of
//! stores makes a crash at any instruction recoverable:
//!
//! * take: `entry[head] = {pos, order}` then `word.next_avail = pos + 1`. A crash between the
//!   two leaves an entry whose `pos == next_avail`: recovery advances `next_avail` past it.
//! * publish: `word.{publishing, last_head = head}`, then the used element and the used index in
//!   guest memory (the virtio-queue crate, release order), then `entry[head] = empty`, then
//!   `word.{used_idx += 1, !publishing}`. Recovery compares the guest's used index `g` with
//!   `word.used_idx` `u`: `g == u` means the publication did not happen (the request is still in
//!   flight and is redone: it is written to the same used slot again); `g == u + 1` with
//!   `publishing` means it did (the entry of `last_head` is cleared, never redone); anything else
//!   is an inconsistency (`DEVICE_NEEDS_RESET`). Hence a request is never lost (its entry exists
//!   from before it is executed until after its used index is visible) and never completed twice
//!   (it is redone only if the used index does not yet cover it).
//! * batch publish ([`QueueCtx::add_used_batch`], a merged RX frame): the same with `k` used
//!   elements and one used-index update by `k`; recovery then sees `g == u + k` and clears the
//!   entries of the heads those `k` used elements name.
//! * Invariant checked on recovery: `next_avail - used_idx` (wrapping) equals the number of
//!   entries in flight, each at a distinct position in `[used .. next_avail)`.
//!
//! Memory ordering: every store above is a release store (the used index too, in virtio-queue),
//! so they become visible to any other observer in program order, which is all the protocol
//! needs: the observer that matters is the next instance, which reads the region only after this
//! one is dead, and a killed process loses no store it has executed (the CPU drains its store
//! buffer; nothing is cached in the process). No full fence is taken per request: nothing here
//! orders a store before a later load. The one store-then-load order virtio needs, the used
//! index before reading the driver's `used_event` (EVENT_IDX), is the full fence virtio-queue
//! takes in `needs_notification`, once per batch.
//!
//! Redo order is the take order (oldest avail position first). Block requests are redone as is:
//! reads read again, writes write the same data again (idempotent). For net (later): a TX chain
//! in flight is sent again (the peer may see a frame twice, as on a lossy link), and an RX buffer
//! in flight holds no completed frame, so it is simply reused for the next received frame.

use std::collections::VecDeque;

use ipc::state::{InflightEntry, QueueWord, StateRegion};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::DeviceError;
use crate::memory::GuestMem;

/// The tracking side of one queue: the state region and the queue's slot in it.
#[derive(Debug)]
pub struct Tracker<'a> {
    /// The region.
    pub region: &'a StateRegion,
    /// Queue index (selects the hot word).
    pub queue: usize,
    /// First entry index of this queue.
    pub entry_base: usize,
    /// The queue's hot word as last stored.
    pub word: &'a mut QueueWord,
    /// Next order counter.
    pub order: &'a mut u32,
}

/// A queue as a device sees it while processing: pops chains and publishes used entries, with
/// in-flight tracking when a state region is attached, or replays recorded requests (redo).
#[derive(Debug)]
pub struct QueueCtx<'a> {
    index: u16,
    queue: &'a mut Queue,
    mem: &'a GuestMem,
    tracker: Option<Tracker<'a>>,
    /// Redo mode: (avail position, head) still to replay, and where to resume afterwards.
    redo: Option<(VecDeque<(u16, u16)>, u16)>,
    /// A batch was published behind the virtio-queue crate's back (its EVENT_IDX bookkeeping
    /// counts one entry per `add_used`): the driver must be notified regardless.
    force_notify: bool,
    /// Avail position of the chain [`pop`](Self::pop) returned last.
    last_pos: u16,
}

impl<'a> QueueCtx<'a> {
    /// A queue without tracking (tests, or a service without a state region).
    pub fn untracked(index: u16, queue: &'a mut Queue, mem: &'a GuestMem) -> Self {
        Self { index, queue, mem, tracker: None, redo: None, force_notify: false, last_pos: 0 }
    }

    /// A tracked queue.
    pub fn tracked(index: u16, queue: &'a mut Queue, mem: &'a GuestMem, tracker: Option<Tracker<'a>>) -> Self {
        Self { index, queue, mem, tracker, redo: None, force_notify: false, last_pos: 0 }
    }

    /// A queue that replays `redo` (avail position, head) in order and then reports no more work;
    /// afterwards the queue's next avail index is `resume`.
    pub fn replay(
        index: u16,
        queue: &'a mut Queue,
        mem: &'a GuestMem,
        tracker: Option<Tracker<'a>>,
        redo: VecDeque<(u16, u16)>,
        resume: u16,
    ) -> Self {
        Self { index, queue, mem, tracker, redo: Some((redo, resume)), force_notify: false, last_pos: 0 }
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMem {
        self.mem
    }

    /// Avail position of the chain [`pop`](Self::pop) returned last (to redo it later with
    /// [`replay`](Self::replay) while it stays in flight).
    pub fn last_pos(&self) -> u16 {
        self.last_pos
    }

    /// Whether this context replays requests found in flight (redo) rather than taking new ones.
    pub fn replaying(&self) -> bool {
        self.redo.is_some()
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Takes the next chain (recording it in flight before returning it), or `None`.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain<&'a GuestMem>>, DeviceError> {
        let mem = self.mem;
        let index = self.index;
        let qerr = |what: &str, source| DeviceError::Queue { queue: index, what: what.to_string(), source };
        if let Some((list, resume)) = self.redo.as_mut() {
            let resume = *resume;
            let Some((pos, head)) = list.pop_front() else { return Ok(None) };
            self.queue.set_next_avail(pos);
            let chain = {
                let mut it = self.queue.iter(mem).map_err(|e| qerr("re-reading the available ring", Some(e)))?;
                it.next()
            };
            self.queue.set_next_avail(resume);
            self.last_pos = pos;
            return match chain {
                Some(c) if c.head_index() == head => Ok(Some(c)),
                _ => Err(qerr(&format!("request in flight at avail {pos} (head {head}) changed"), None)),
            };
        }
        let chain = {
            let mut it = self.queue.iter(mem).map_err(|e| qerr("reading the available ring", Some(e)))?;
            match it.next() {
                Some(c) => c,
                None => return Ok(None),
            }
        };
        self.last_pos = self.queue.next_avail().wrapping_sub(1);
        if let Some(t) = self.tracker.as_mut() {
            let next = self.queue.next_avail();
            let pos = next.wrapping_sub(1);
            let order = *t.order;
            *t.order = order.wrapping_add(1);
            t.region.set_entry(t.entry_base + usize::from(chain.head_index()), Some(InflightEntry { pos, order }));
            t.word.next_avail = next;
            t.region.set_queue_word(t.queue, *t.word);
        }
        Ok(Some(chain))
    }

    /// Publishes the used entry of `head` (and clears its in-flight record, crash-consistently).
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), DeviceError> {
        self.begin_publish(head);
        let index = self.index;
        self.queue.add_used(self.mem, head, len).map_err(|e| DeviceError::Queue {
            queue: index,
            what: "adding to the used ring".into(),
            source: Some(e),
        })?;
        self.end_publish(&[head]);
        Ok(())
    }

    /// Marks in the hot word that used entries starting with `first` are being published.
    fn begin_publish(&mut self, first: u16) {
        if let Some(t) = self.tracker.as_mut() {
            t.word.publishing = true;
            t.word.last_head = first;
            t.region.set_queue_word(t.queue, *t.word);
        }
    }

    /// After the used index covering `heads` is stored: clears their in-flight entries and
    /// records the published used index (release stores, after the used index's: see "Memory
    /// ordering" above; a full fence here stalled every completion on the guest's cache line).
    fn end_publish(&mut self, heads: &[u16]) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        if let Some(t) = self.tracker.as_mut() {
            for &head in heads {
                t.region.set_entry(t.entry_base + usize::from(head), None);
            }
            t.word.publishing = false;
            t.word.used_idx = self.queue.next_used();
            t.region.set_queue_word(t.queue, *t.word);
        }
    }

    /// Publishes the used entries of `elems` (head, length) in order with **one** used-index
    /// update, so a driver never sees part of them: a merged RX frame spread over several
    /// buffers becomes visible whole. Crash-consistent like [`add_used`](Self::add_used): the
    /// hot word is marked `publishing` first, the elements are written, the used index is raised
    /// by `elems.len()` at once (release order), then the entries are cleared; recovery finds
    /// the guest's used index either unchanged (all redone) or raised by the whole batch (the
    /// heads it names are cleared). Always makes the driver be notified (see
    /// [`force_notify`](Self::force_notify)).
    pub fn add_used_batch(&mut self, elems: &[(u16, u32)]) -> Result<(), DeviceError> {
        use std::sync::atomic::Ordering;
        use vm_memory::{Bytes, GuestAddress};
        let index = self.index;
        let qerr = |what: &str| DeviceError::Queue { queue: index, what: what.to_string(), source: None };
        let size = self.queue.size();
        match elems {
            [] => return Ok(()),
            [(head, len)] => return self.add_used(*head, *len),
            _ => {}
        }
        let count =
            u16::try_from(elems.len()).ok().filter(|&c| c <= size).ok_or_else(|| qerr("batch above the queue size"))?;
        if elems.iter().any(|&(h, _)| h >= size) {
            return Err(qerr("used head out of range"));
        }
        self.begin_publish(elems[0].0);
        let ring = self.queue.used_ring();
        let next = self.queue.next_used();
        for (i, &(head, len)) in (0u16..).zip(elems) {
            let slot = u64::from(next.wrapping_add(i) % size);
            let addr = ring.checked_add(4 + slot * 8).ok_or_else(|| qerr("used ring address"))?;
            // struct virtq_used_elem { le32 id; le32 len; }
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            self.mem.write_slice(&elem, GuestAddress(addr)).map_err(|_| qerr("writing a used element"))?;
        }
        let new = next.wrapping_add(count);
        let idx_at = ring.checked_add(2).ok_or_else(|| qerr("used ring address"))?;
        self.mem
            .store(new.to_le(), GuestAddress(idx_at), Ordering::Release)
            .map_err(|_| qerr("writing the used index"))?;
        self.queue.set_next_used(new);
        self.force_notify = true;
        let heads: Vec<u16> = elems.iter().map(|&(head, _)| head).collect();
        self.end_publish(&heads);
        Ok(())
    }

    /// Whether the driver must be notified whatever EVENT_IDX says (a batch was published).
    pub fn force_notify(&self) -> bool {
        self.force_notify
    }
}
