//! The off-site archive of one service: its committed log and its checkpoints as
//! encrypted, immutable objects in an object store at another site, so that the archive
//! and the key alone rebuild the service's state on a fresh machine.
//!
//! Every object is written once and never rewritten: the test store (and many real ones)
//! does not swap an object atomically, but it does create a key only once
//! (`If-None-Match: *`). So ownership is an `epochs/` marker created once per epoch
//! ([`epoch`]), and everything else is named by epoch and index range ([`names`]), sorted
//! so a reader lists only what follows what it has.
//!
//! Layers, bottom up: [`key`] (the secret), [`seal`] (one object's bytes, authenticated
//! and usually encrypted), [`store`] (the object store, with timeouts), [`names`] and
//! [`batch`] (what the objects mean), [`epoch`] (who may write), [`catalog`] (what an
//! archive holds), [`writer`] and [`reader`].

pub mod batch;
pub mod catalog;
pub mod epoch;
pub mod error;
pub mod key;
pub mod names;
pub mod reader;
pub mod seal;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod writer;

pub use error::ArchiveError;

/// Version of the archive's layout and object formats. A reader refuses an archive whose
/// epoch markers name a version it does not know.
pub const FORMAT_VERSION: u32 = 1;
