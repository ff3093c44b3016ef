//! A new member's question before it joins (etcd's `GET /members` on a peer URL): "which
//! members does the cluster have now?". The asker knows no member id yet, its own included,
//! so it says hello from member 0 to member 0; the listener answers with one `Response`
//! frame holding what `PeerMesh::answer_joins` provides, and closes the connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream as GlommioStream;

use super::frame::{self, Kind, HEADER_BYTES, PROTOCOL_VERSION};
use super::CoreCtx;

/// The member id a membership question says hello from and to.
pub const ASKER: u64 = 0;

/// Answers one membership question on an accepted connection (empty: this member cannot
/// answer yet), then drops it.
pub(super) async fn answer(ctx: &CoreCtx, mut stream: GlommioStream) {
    let answer = ctx.mesh.join_answer.get().map(|answer| answer());
    let mut out = Vec::new();
    let core = ctx.core as u16;
    frame::encode(
        &mut out,
        Kind::Response,
        core,
        ctx.config().member_id,
        ASKER,
        &answer.unwrap_or_default(),
    );
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

/// Asks the member listening at `addr` (blocking; before the server starts): its answer's
/// bytes, empty if it cannot answer.
pub fn ask(addr: SocketAddr, timeout: Duration, max_frame_bytes: usize) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut hello = Vec::new();
    frame::encode(
        &mut hello,
        Kind::Hello,
        0,
        ASKER,
        ASKER,
        &PROTOCOL_VERSION.to_le_bytes(),
    );
    stream.write_all(&hello)?;
    let mut header_bytes = [0; HEADER_BYTES];
    stream.read_exact(&mut header_bytes)?;
    let header = frame::parse_header(&header_bytes, max_frame_bytes)?;
    let mut payload = vec![0; header.payload_bytes as usize];
    stream.read_exact(&mut payload)?;
    let answer = frame::finish(&header, &header_bytes, payload)?;
    if answer.kind != Kind::Response {
        return Err(frame::FrameError::Unexpected(format!(
            "{:?} for a membership question",
            answer.kind
        ))
        .into());
    }
    Ok(answer.payload)
}
