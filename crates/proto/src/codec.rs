//! TCP framing: a 4-byte big-endian length, then that many bytes of msgpack.
//!
//! A thin wrapper over tokio-util's `LengthDelimitedCodec`, which reads the length and
//! compares it with the limit before it reserves anything. This module only delimits;
//! turning the bytes into frames is [`crate::encoding`]'s job.
//!
//! The read buffer: after each frame the inner codec keeps room for the next length only,
//! so a connection reads each frame in two system calls (its length, then the rest). Once
//! a connection has sent a frame after its first, the codec keeps room for a frame as
//! large as its last one instead (up to [`READ_AHEAD_MAX`]), and a frame of that size
//! arrives in one read. The first frame (a TCP login) does not count, so a connection
//! that only logged in, as most idle ones did, keeps the small buffer.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

/// Why a byte stream could not be cut into frames. Both end the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is above the limit (`--max-frame`).
    #[error("frame length above the limit of {max} bytes")]
    TooLarge { max: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// The TCP frame codec: `Decoder<Item = BytesMut>` (one frame's payload) and
/// `Encoder<Bytes>` (a payload to prefix with its length).
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    /// The limit in force now.
    max: usize,
    /// The limit after the first frame.
    later: usize,
    /// Frames decoded so far, up to 2 (only whether a frame came after the first counts).
    frames: u8,
}

/// The most room kept for the next frame (bytes, with its length prefix).
pub const READ_AHEAD_MAX: usize = 4096;

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self::with_first(max_frame, max_frame)
    }

    /// A codec whose first frame (on TCP, the login) may be at most `first` bytes, and every
    /// later one `max_frame`: a client that has not logged in cannot make the server hold
    /// more than `first`.
    pub fn with_first(first: usize, max_frame: usize) -> Self {
        let first = first.min(max_frame);
        let inner = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(first)
            .new_codec();
        FrameCodec {
            inner,
            max: first,
            later: max_frame,
            frames: 0,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let frame = self.inner.decode(src).map_err(|e| self.map_err(e))?;
        if let Some(f) = &frame {
            if self.max != self.later {
                self.max = self.later;
                self.inner.set_max_frame_length(self.later);
            }
            if self.frames >= 1 {
                src.reserve((f.len() + 4).min(READ_AHEAD_MAX));
            }
            self.frames = self.frames.saturating_add(1).min(2);
        }
        Ok(frame)
    }
}

impl FrameCodec {
    fn map_err(&self, e: std::io::Error) -> FrameError {
        if e.get_ref()
            .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
        {
            FrameError::TooLarge { max: self.max }
        } else {
            FrameError::Io(e)
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.inner.encode(item, dst).map_err(|e| self.map_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_frame_has_its_own_limit() {
        let mut codec = FrameCodec::with_first(8, 1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&100u32.to_be_bytes());
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { max: 8 })
        ));
        let mut codec = FrameCodec::with_first(8, 1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 2, b'h', b'i']);
        buf.extend_from_slice(&100u32.to_be_bytes());
        buf.extend_from_slice(&[0; 100]);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"hi");
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 100);
    }

    #[test]
    fn frames_round_trip_and_partial_input_waits() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        codec
            .encode(Bytes::from_static(b"hello"), &mut buf)
            .unwrap();
        codec
            .encode(Bytes::from_static(b"world!"), &mut buf)
            .unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        let mut partial = buf.split_to(7);
        assert!(
            codec.decode(&mut partial).unwrap().is_none(),
            "incomplete is Ok(None)"
        );
        partial.unsplit(buf);
        assert_eq!(&codec.decode(&mut partial).unwrap().unwrap()[..], b"hello");
        assert_eq!(&codec.decode(&mut partial).unwrap().unwrap()[..], b"world!");
        assert!(codec.decode(&mut partial).unwrap().is_none());
    }

    #[test]
    fn huge_length_prefix_fails_before_allocating() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { max: 1024 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap_before,
            "nothing reserved for the bogus frame"
        );
    }

    #[test]
    fn after_the_first_frame_room_is_kept_for_one_as_large_as_the_last() {
        let mut codec = FrameCodec::new(64 * 1024);
        let framed = |len: usize| {
            let mut b = BytesMut::new();
            FrameCodec::new(64 * 1024)
                .encode(Bytes::from(vec![7u8; len]), &mut b)
                .unwrap();
            b
        };
        // The login: afterwards only the next length prefix has room.
        let mut buf = framed(300);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 300);
        assert!(buf.is_empty() && buf.capacity() < 300, "{}", buf.capacity());
        // A later frame: room for one of its size, its prefix included.
        buf.extend_from_slice(&framed(200));
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 200);
        assert!(buf.capacity() >= 204, "{}", buf.capacity());
        // A large one: room up to the cap.
        buf.extend_from_slice(&framed(10_000));
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 10_000);
        assert!(buf.capacity() >= READ_AHEAD_MAX, "{}", buf.capacity());
    }

    #[test]
    fn limit_is_inclusive() {
        let mut codec = FrameCodec::new(4);
        let mut buf = BytesMut::from(&[0, 0, 0, 4, 1, 2, 3, 4][..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 4);
        let mut buf = BytesMut::from(&[0, 0, 0, 5, 1, 2, 3, 4, 5][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
