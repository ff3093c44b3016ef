//! Reading one WAL tolerantly: every valid record, and every damaged spot classified the way
//! the server's recovery classifies it.
//!
//! An invalid spot (or a missing segment) followed by a valid record anywhere later in the log
//! is *corruption*: acknowledged data is damaged and the server refuses to start. Invalid spots
//! with no valid record after them are a *torn tail*: the remains of a write cut short by a
//! crash, which recovery cuts off. A spot is therefore reported only once the reader knows
//! which it is: before the next valid record, or at the end of the log.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use ferrocd_engine::wal::{ReadItem, Record, RecordPos, WalError, WalReader};

/// A damaged spot of a WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub detail: String,
    pub skipped_bytes: u64,
    /// No valid record follows it: a torn tail rather than corruption.
    pub torn: bool,
}

/// One step of a [`Scanner`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Record { pos: RecordPos, record: Record },
    Damage(Damage),
}

impl Event {
    fn file(&self) -> &Path {
        match self {
            Event::Record { pos, .. } => &pos.file,
            Event::Damage(damage) => &damage.file,
        }
    }
}

/// Streams a WAL directory's [`Event`]s in log order.
pub struct Scanner {
    reader: WalReader,
    /// Damage seen since the last valid record, not yet classified.
    pending: Vec<Damage>,
    ready: VecDeque<Event>,
    /// File name of the only segment to yield events of (all segments share one directory).
    only_name: Option<OsString>,
    done: bool,
}

impl Scanner {
    /// Reads `dir`; with `only_file`, yields only the events of that segment file (damage is
    /// still classified against the whole log).
    pub fn open(dir: &Path, only_file: Option<&Path>) -> Result<Scanner, WalError> {
        Ok(Scanner {
            reader: WalReader::open(dir)?,
            pending: Vec::new(),
            ready: VecDeque::new(),
            only_name: only_file.and_then(Path::file_name).map(OsStr::to_os_string),
            done: false,
        })
    }

    /// Reads until at least one event is ready or the log ends.
    fn fill(&mut self) -> Result<(), WalError> {
        while self.ready.is_empty() && !self.done {
            match self.reader.next().transpose()? {
                None => {
                    self.done = true;
                    self.release_pending(true);
                }
                Some(item) => self.take(item),
            }
        }
        Ok(())
    }

    fn take(&mut self, item: ReadItem) {
        match item {
            ReadItem::Segment { .. } => {}
            ReadItem::MissingSegment { seq, next_file } => self.pending.push(Damage {
                file: next_file.to_path_buf(),
                offset: 0,
                detail: format!("the segment before this one (seq {seq:#x}) is missing"),
                skipped_bytes: 0,
                torn: false,
            }),
            ReadItem::Corrupt {
                pos,
                detail,
                skipped_bytes,
            } => self.pending.push(Damage {
                file: pos.file.to_path_buf(),
                offset: pos.offset,
                detail,
                skipped_bytes,
                torn: false,
            }),
            ReadItem::Record { pos, record, .. } => {
                self.release_pending(false);
                self.ready.push_back(Event::Record { pos, record });
            }
        }
    }

    fn release_pending(&mut self, torn: bool) {
        for mut damage in self.pending.drain(..) {
            damage.torn = torn;
            self.ready.push_back(Event::Damage(damage));
        }
    }

    fn wanted(&self, event: &Event) -> bool {
        self.only_name
            .as_deref()
            .is_none_or(|name| event.file().file_name() == Some(name))
    }
}

impl Iterator for Scanner {
    type Item = Result<Event, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
            let event = self.ready.pop_front()?;
            if self.wanted(&event) {
                return Some(Ok(event));
            }
        }
    }
}
