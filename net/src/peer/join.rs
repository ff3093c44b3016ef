//! A new member's question before it joins (etcd's `GET /members` on a peer URL): "which
//! members does the cluster have now?". The asker knows no member id yet, its own included,
//! so it says hello from member 0 to member 0; the listener answers with one `Response`
//! frame holding what `PeerMesh::answer_joins` provides, and closes the connection. On a TLS
//! peer port the answer goes after the TLS handshake, as every peer frame after the hello:
//! the asker presents its peer certificate and checks the listener's (`PeerTls`), so the
//! membership is told only to a holder of a trusted certificate.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures_lite::{AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream as GlommioStream;

use super::frame::{self, Kind, HEADER_BYTES, PROTOCOL_VERSION};
use super::{with_timeout, CoreCtx, PeerAddr};
use crate::tls::PeerTls;

/// The member id a membership question says hello from and to.
pub const ASKER: u64 = 0;

/// Answers one membership question on an accepted connection (empty: this member cannot
/// answer yet), then drops it; on a TLS peer port, after the handshake.
pub(super) async fn answer(ctx: &CoreCtx, stream: GlommioStream) {
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
    let Some(tls) = ctx.config().tls.clone() else {
        return write_and_close(stream, &out).await;
    };
    let timeout_ms = ctx.config().hello_timeout_ms;
    let handshake = with_timeout(timeout_ms, "TLS handshake", tls.accept(stream)).await;
    if let Ok(stream) = handshake {
        write_and_close(stream, &out).await;
    }
}

async fn write_and_close(mut stream: impl AsyncWrite + Unpin, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.close().await;
}

/// Asks the member listening at `addr` (blocking; before the server starts): its answer's
/// bytes, empty if it cannot answer. An `https://` peer is asked over TLS with `tls`, this
/// member's peer TLS (an error without it).
pub fn ask(
    addr: &PeerAddr,
    tls: Option<&PeerTls>,
    timeout: Duration,
    max_frame_bytes: usize,
) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr.addr, timeout)?;
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
    let Some(host) = &addr.tls_host else {
        return read_answer(&mut stream, max_frame_bytes);
    };
    let tls = tls.ok_or_else(|| {
        io::Error::other("an https:// peer needs this member's peer TLS (--peer-cert-file)")
    })?;
    read_answer(&mut tls.connect_blocking(host, stream)?, max_frame_bytes)
}

/// Reads the one `Response` frame of a membership question's answer: its payload.
fn read_answer(stream: &mut impl Read, max_frame_bytes: usize) -> io::Result<Vec<u8>> {
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
