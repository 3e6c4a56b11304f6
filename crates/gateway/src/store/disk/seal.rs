//! The data directory's seal: a small file beside the storage engine's own, recording the
//! store's epoch and the highest seq it has made known (answered or delivered).
//!
//! The storage engine cannot tell a journal cut by a crash from one damaged in its middle:
//! on open it keeps every batch up to the first entry it cannot decode, truncates the file
//! there, and carries on. The seal is how an open notices that acknowledged messages went
//! with it. The writer records each batch's highest seq here after the batch is in the
//! journal and before anyone hears of it, so after a crash or SIGKILL of the process the
//! seal is at or below what the journal holds; a seal above it means the journal lost
//! acknowledged data (damage, or a power loss before an fsync).
//!
//! Layout (text, so an operator can read it): `imgate data directory 1`, `epoch <epoch>`,
//! `seq <20 digits>`, one per line. The seq is rewritten in place, 20 bytes at a fixed
//! offset. This module reads and writes that file and decides nothing.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The seal's file name in the data directory.
pub const FILE: &str = "imgate.seal";
const MAGIC: &str = "imgate data directory 1\n";
const SEQ_DIGITS: usize = 20;

/// What a seal records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub epoch: String,
    pub seq: u64,
}

/// An open seal, for recording seqs.
pub struct Seal {
    file: File,
    seq_at: u64,
}

fn contents(r: &Record) -> String {
    format!(
        "{MAGIC}epoch {}\nseq {:0width$}\n",
        r.epoch,
        r.seq,
        width = SEQ_DIGITS
    )
}

fn seq_offset(epoch: &str) -> u64 {
    (MAGIC.len() + "epoch ".len() + epoch.len() + 1 + "seq ".len()) as u64
}

/// Why a seal could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The file is there but cannot be read (permissions, I/O).
    Io(std::io::Error),
    /// The file is not a seal (damaged): says how.
    Invalid(String),
}

/// Reads the seal of `dir`: `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<Record>, ReadError> {
    let text = match std::fs::read(dir.join(FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let bad = || {
        ReadError::Invalid(format!(
            "{FILE} is not a seal this gateway wrote (damaged?)"
        ))
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad())?;
    let rest = text.strip_prefix(MAGIC).ok_or_else(bad)?;
    let mut lines = rest.lines();
    let epoch = lines
        .next()
        .and_then(|l| l.strip_prefix("epoch "))
        .filter(|e| !e.is_empty())
        .ok_or_else(bad)?;
    let seq = lines
        .next()
        .and_then(|l| l.strip_prefix("seq "))
        .filter(|s| s.len() == SEQ_DIGITS)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some(Record {
        epoch: epoch.to_owned(),
        seq,
    }))
}

/// Writes a new seal for `record` (through a temporary file and a rename, both synced), and
/// opens it for [`Seal::record`].
pub fn create(dir: &Path, record: &Record) -> std::io::Result<Seal> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents(record).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()?;
    open(dir, &record.epoch)
}

/// Opens the existing seal of a store of `epoch` for recording.
pub fn open(dir: &Path, epoch: &str) -> std::io::Result<Seal> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(FILE))?;
    Ok(Seal {
        file,
        seq_at: seq_offset(epoch),
    })
}

impl Seal {
    /// Records `seq` as made known. Written to the operating system, not synced: a seal
    /// older than the journal is harmless, one newer is what this file exists to catch.
    pub fn record(&self, seq: u64) -> std::io::Result<()> {
        let digits = format!("{seq:0width$}", width = SEQ_DIGITS);
        self.file.write_all_at(digits.as_bytes(), self.seq_at)
    }

    /// Forces the seal to the device (at close).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_reads_back_what_was_recorded_last() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let r = Record {
            epoch: "e-1".into(),
            seq: 7,
        };
        let seal = create(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(r));
        seal.record(12_345).unwrap();
        seal.record(99).unwrap();
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!((back.epoch.as_str(), back.seq), ("e-1", 99));
        let reopened = open(dir.path(), "e-1").unwrap();
        reopened.record(u64::MAX).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().seq, u64::MAX);
    }

    #[test]
    fn a_file_that_is_not_a_seal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "imgate data directory 1\nepoch x\nseq 12\n",
        )
        .unwrap();
        assert!(
            matches!(read(dir.path()), Err(ReadError::Invalid(why)) if why.contains("not a seal"))
        );
        std::fs::write(dir.path().join(FILE), b"\xff\xfe").unwrap();
        assert!(read(dir.path()).is_err());
    }
}
