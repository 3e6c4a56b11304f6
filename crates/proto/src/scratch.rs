//! A buffer each thread keeps for encoding, so that encoding a value costs one allocation
//! of exactly its size instead of the several of a `Vec` grown from empty (a 300-byte
//! message frame grew through 8, 16, ..., 512 bytes: seven allocations and six copies).
//!
//! [`written`] is the only entry. It holds no state beyond the buffer, decides no format
//! (the caller's closure writes JSON, msgpack or anything else), and never keeps more than
//! [`KEPT`] bytes of room between calls.

use std::cell::Cell;

/// The most room a thread's buffer keeps between calls: a larger encoding (a big body)
/// still works, but its buffer is freed afterwards rather than held by an idle thread.
pub const KEPT: usize = 16 * 1024;

thread_local! {
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `write` against this thread's buffer, emptied first, and returns what it wrote as a
/// `Vec` of exactly that length (so turning it into `Bytes` allocates nothing more).
///
/// A call made from inside `write` (nothing does so now) gets a fresh buffer: the thread's
/// buffer is taken out while in use, never shared.
pub fn written<E>(write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Vec<u8>, E> {
    SCRATCH.with(|cell| {
        let mut buf = cell.take();
        buf.clear();
        let result = write(&mut buf).map(|()| buf.as_slice().to_vec());
        if buf.capacity() <= KEPT {
            cell.set(buf);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_exactly_what_was_written_and_nothing_of_the_call_before() {
        let long = written(|b| {
            b.extend_from_slice(&[1; 300]);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!((long.len(), long.capacity()), (300, 300));
        let short = written(|b| {
            b.extend_from_slice(b"hi");
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(short, b"hi");
        assert_eq!(short.capacity(), 2);
    }

    #[test]
    fn the_buffer_is_kept_up_to_its_limit_and_a_failure_passes_through() {
        written(|b| {
            b.extend_from_slice(&[0; 1000]);
            Ok::<_, ()>(())
        })
        .unwrap();
        let kept = SCRATCH.with(|c| {
            let b = c.take();
            let cap = b.capacity();
            c.set(b);
            cap
        });
        assert!(kept >= 1000, "{kept}");
        written(|b| {
            b.extend_from_slice(&vec![0; KEPT * 2]);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(
            SCRATCH.with(|c| c.take().capacity()),
            0,
            "a large buffer is freed"
        );
        assert_eq!(written(|_| Err("no")), Err::<Vec<u8>, _>("no"));
    }

    #[test]
    fn a_nested_call_gets_its_own_buffer() {
        let outer = written(|b| {
            b.extend_from_slice(b"out");
            let inner = written(|b2| {
                b2.extend_from_slice(b"in");
                Ok::<_, ()>(())
            })?;
            b.extend_from_slice(&inner);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(outer, b"outin");
    }
}
