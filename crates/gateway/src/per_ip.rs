//! `--max-connections-per-ip`: how many connections one address may hold at once, TCP and
//! HTTP together (WebSocket, SSE and polls ride on HTTP connections).
//!
//! A listener asks [`PerIp::admit`] right after `accept`; a refused socket gets a static
//! refusal (nothing is allocated for it) and is closed. The admitted connection's
//! [`IpSlot`] gives its place back when the connection ends. Nothing here reads or parses
//! what a client sends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

/// The `error` frame a TCP client over the limit gets: `{"type":"error","code":
/// "rate_limited","message":"too many connections from your address"}` as msgpack with
/// named fields, after its 4-byte length.
const TCP_REFUSAL: &[u8] = b"\x00\x00\x00\x4e\x83\xa4type\xa5error\xa4code\xacrate_limited\xa7message\xd9\x26too many connections from your address";

/// What an HTTP client over the limit gets before the socket closes.
const HTTP_REFUSAL: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 74\r\nconnection: close\r\n\r\n{\"code\":\"rate_limited\",\"message\":\"too many connections from your address\"}";

/// Connections per address, shared by both listeners.
#[derive(Debug)]
pub struct PerIp {
    /// 0: no limit.
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

/// Which listener refuses: what the client is told.
#[derive(Debug, Clone, Copy)]
pub enum Refuse {
    Tcp,
    Http,
    /// A TLS listener: a plain-text answer would only garble the handshake, so the
    /// socket is just closed.
    Silently,
}

impl PerIp {
    /// `limit` connections per address; 0 means no limit.
    pub fn new(limit: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `sock`'s peer, or `None` after refusing it as
    /// `refuse` says (without waiting: a client that does not read gets nothing).
    pub fn admit(self: &Arc<Self>, sock: &TcpStream, refuse: Refuse) -> Option<IpSlot> {
        let ip = sock.peer_addr().ok()?.ip();
        if self.limit == 0 {
            return Some(IpSlot {
                owner: self.clone(),
                ip,
            });
        }
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(ip).or_insert(0);
            if *n < self.limit {
                *n += 1;
                return Some(IpSlot {
                    owner: self.clone(),
                    ip,
                });
            }
        }
        let answer = match refuse {
            Refuse::Tcp => TCP_REFUSAL,
            Refuse::Http => HTTP_REFUSAL,
            Refuse::Silently => b"",
        };
        let _ = sock.try_write(answer);
        tracing::debug!(%ip, limit = self.limit, "refused a connection over --max-connections-per-ip");
        None
    }

    /// Connections `ip` holds now.
    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if self.owner.limit == 0 {
            return;
        }
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    #[test]
    fn the_tcp_refusal_is_an_error_frame_naming_the_limit() {
        let len = u32::from_be_bytes(TCP_REFUSAL[..4].try_into().unwrap()) as usize;
        assert_eq!(len, TCP_REFUSAL.len() - 4);
        let v: serde_json::Value = rmp_serde::from_slice(&TCP_REFUSAL[4..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "code": "rate_limited",
                "message": "too many connections from your address"})
        );
        let (head, body) = std::str::from_utf8(HTTP_REFUSAL)
            .unwrap()
            .split_once("\r\n\r\n")
            .unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "rate_limited");
    }

    #[tokio::test]
    async fn an_address_holds_at_most_the_limit_and_gets_places_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let per_ip = PerIp::new(2);
        let mut clients = Vec::new();
        let mut slots = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (sock, _) = listener.accept().await.unwrap();
            slots.push((per_ip.admit(&sock, Refuse::Tcp), sock));
        }
        assert!(slots[0].0.is_some() && slots[1].0.is_some());
        assert!(slots[2].0.is_none(), "the third is over the limit");
        let mut refusal = vec![0; TCP_REFUSAL.len()];
        clients[2].read_exact(&mut refusal).await.unwrap();
        assert_eq!(refusal, TCP_REFUSAL);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(per_ip.open(ip), 2);
        slots.remove(0);
        assert_eq!(
            per_ip.open(ip),
            1,
            "a closed connection gives its place back"
        );
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (sock, _) = listener.accept().await.unwrap();
        assert!(per_ip.admit(&sock, Refuse::Tcp).is_some());
        let unlimited = PerIp::new(0);
        assert!((0..10).all(|_| unlimited.admit(&sock, Refuse::Tcp).is_some()));
    }
}
