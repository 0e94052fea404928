//! Framing: each message is a `u32` big-endian body length followed by that many bytes of JSON.
//!
//! Readers check the length against [`MAX_FRAME_LEN`] before allocating anything, and tell a
//! clean end of stream between frames ([`FrameError::Closed`]) from one inside a frame
//! ([`FrameError::Truncated`]).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Read, Write};

/// The largest frame body either side sends or accepts: 1 MiB.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Size of the length prefix.
const HEADER_LEN: usize = 4;

/// Errors of reading or writing one frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream at a frame boundary.
    #[error("the connection was closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the connection was closed in the middle of a frame")]
    Truncated,
    /// A frame announced (or a message would need) more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// The announced or needed body length.
        len: u64,
    },
    /// A read or write hit the stream's timeout.
    #[error("timed out waiting for the peer")]
    TimedOut,
    /// Any other I/O error.
    #[error("frame I/O failed")]
    Io(#[source] io::Error),
    /// The message could not be encoded as JSON.
    #[error("encoding the message failed")]
    Encode(#[source] serde_json::Error),
    /// The body is not valid JSON of the expected type.
    #[error("decoding the message failed")]
    Decode(#[source] serde_json::Error),
}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            // SO_RCVTIMEO / SO_SNDTIMEO expiry shows up as EAGAIN (WouldBlock).
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::TimedOut,
            io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(err),
        }
    }
}

/// Serializes `msg` and writes it as one frame (a single `write_all` of prefix and body, so a
/// small message leaves as one packet).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(FrameError::Encode)?;
    let body_len = buf.len() - HEADER_LEN;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|len| *len <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLarge {
            len: body_len as u64,
        })?;
    buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and returns its body, at most [`MAX_FRAME_LEN`] bytes.
pub fn read_frame_bytes<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads one frame and decodes its JSON body as a `T`.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let body = read_frame_bytes(r)?;
    serde_json::from_slice(&body).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};
    use std::io::Cursor;

    /// A reader that fails the test if anyone asks it for more than the header.
    struct HeaderOnly {
        data: Cursor<Vec<u8>>,
    }

    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(self.data.position() < 4, "read past the length prefix");
            self.data.read(buf)
        }
    }

    #[test]
    fn frame_round_trips_several_messages() {
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Request::Handshake {
                protocol_version: 7,
            },
        )
        .expect("vec write");
        write_frame(&mut buf, &Response::Ok).expect("vec write");
        let body = br#"{"op":"handshake","protocol_version":7}"#;
        assert_eq!(&buf[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&buf[4..4 + body.len()], body);

        let mut r = Cursor::new(buf);
        let req: Request = read_frame(&mut r).expect("first frame");
        assert_eq!(
            req,
            Request::Handshake {
                protocol_version: 7
            }
        );
        let resp: Response = read_frame(&mut r).expect("second frame");
        assert_eq!(resp, Response::Ok);
        assert!(matches!(
            read_frame::<_, Response>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversize_frame_is_rejected_before_reading_its_body() {
        let mut data = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
        data.extend_from_slice(b"xxxx");
        let mut r = HeaderOnly {
            data: Cursor::new(data),
        };
        let err = read_frame_bytes(&mut r).expect_err("too large");
        assert!(
            matches!(err, FrameError::TooLarge { len } if len == u64::from(MAX_FRAME_LEN) + 1),
            "{err:?}"
        );

        let mut r = HeaderOnly {
            data: Cursor::new(u32::MAX.to_be_bytes().to_vec()),
        };
        assert!(matches!(
            read_frame_bytes(&mut r),
            Err(FrameError::TooLarge { len }) if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn frame_of_exactly_the_limit_is_accepted() {
        let mut data = MAX_FRAME_LEN.to_be_bytes().to_vec();
        data.resize(4 + MAX_FRAME_LEN as usize, b' ');
        let body = read_frame_bytes(&mut Cursor::new(data)).expect("at the limit");
        assert_eq!(body.len(), MAX_FRAME_LEN as usize);
    }

    #[test]
    fn oversize_message_is_not_written() {
        let message = Response::Error {
            message: "x".repeat(MAX_FRAME_LEN as usize),
        };
        let mut buf = Vec::new();
        let err = write_frame(&mut buf, &message).expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { len } if len > u64::from(MAX_FRAME_LEN)));
        assert!(buf.is_empty());
    }

    #[test]
    fn eof_inside_header_is_truncated() {
        let mut r = Cursor::new(vec![0u8, 0]);
        assert!(matches!(
            read_frame_bytes(&mut r),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn eof_inside_body_is_truncated() {
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{\"op\"");
        let mut r = Cursor::new(data);
        assert!(matches!(
            read_frame_bytes(&mut r),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn garbage_json_is_a_decode_error() {
        let mut data = 5u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"\xff{oops");
        data.truncate(9);
        let mut r = Cursor::new(data);
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn valid_json_of_the_wrong_type_is_a_decode_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Response::Ok).expect("vec write");
        assert!(matches!(
            read_frame::<_, Request>(&mut Cursor::new(buf)),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn read_timeout_maps_to_timed_out() {
        let err: FrameError = io::Error::from(io::ErrorKind::WouldBlock).into();
        assert!(matches!(err, FrameError::TimedOut));
    }
}
