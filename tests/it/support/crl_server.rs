//! A CRL distribution point on loopback that the test controls: what each path answers
//! (a CRL with its ETag, a status, a redirect, a hang, a truncated or oversized body), and
//! how often each path was asked. Plain HTTP/1.1 written by hand, so it can answer what a
//! hostile or broken server would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a path answers.
#[derive(Clone)]
pub enum Serve {
    /// A CRL (PEM, or any body) with its ETag; 304 when the request names that ETag.
    Crl(String, String),
    Status(u16),
    /// 302 to this URL.
    Redirect(String),
    /// Accepts the request and never answers.
    Hang,
    /// Announces 5,000 bytes, sends 10 and closes.
    Truncated,
    /// This many bytes without a Content-Length.
    Big(usize),
}

#[derive(Clone)]
pub struct CrlServer {
    base: String,
    answers: Arc<Mutex<HashMap<String, Serve>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    /// Requests answered 304 because they named the current ETag.
    pub revalidated: Arc<AtomicUsize>,
}

impl CrlServer {
    pub async fn start() -> CrlServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = CrlServer {
            base: format!("http://{}", listener.local_addr().unwrap()),
            answers: Arc::default(),
            hits: Arc::default(),
            revalidated: Arc::default(),
        };
        let serving = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serving.clone().answer(stream));
            }
        });
        server
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn serve(&self, path: &str, answer: Serve) {
        self.answers.lock().unwrap().insert(path.into(), answer);
    }

    /// Requests for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    async fn answer(self, mut stream: tokio::net::TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        *self.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
        let serve = self.answers.lock().unwrap().get(&path).cloned();
        let answer: Vec<u8> = match serve {
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            Some(Serve::Crl(_, etag)) if head.contains(&format!("if-none-match: {etag}")) => {
                self.revalidated.fetch_add(1, Ordering::SeqCst);
                format!("HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into()
            }
            Some(Serve::Crl(body, etag)) => format!(
                "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into(),
            Some(Serve::Status(code)) => {
                format!("HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into()
            }
            Some(Serve::Redirect(location)) => format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into(),
            Some(Serve::Hang) => {
                tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                return;
            }
            Some(Serve::Truncated) => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n-----BEGIN".to_vec()
            }
            Some(Serve::Big(n)) => {
                let mut answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                answer.resize(answer.len() + n, b'A');
                answer
            }
        };
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    }
}
