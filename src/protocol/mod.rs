//! The wire protocol between agents, restores, admins and storage nodes.
//!
//! Each request opens one QUIC bidirectional stream, sends its frames and finishes its send
//! side; the node answers with frames on the same stream. `frame` is the byte codec (pure);
//! `message` the typed requests and replies carried in frames.

pub mod frame;
pub mod message;
pub mod shared_bytes;

pub use frame::{FrameError, FrameHeader, MAX_FRAME_PAYLOAD, decode_frame, encode_frame};
pub use message::*;
