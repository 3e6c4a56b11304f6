//! The notification webhook's client: one POST per notification, signed, tried again on
//! what may pass (a network error, a timeout, 429, 5xx) with jittered exponential backoff
//! from 1 s to 5 min for `--notify-retry-for`, under one delivery id.
//!
//! It knows HTTP and the signature, nothing of users or messages.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use metrics::Counter;
use rand::Rng;
use reqwest::{StatusCode, Url};
use sha2::Sha256;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How a notification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The webhook answered 2xx.
    Sent,
    /// It answered a status that is not tried again, or retries ran out; why.
    GaveUp(String),
}

/// The webhook and its signing secret.
pub struct Webhook {
    client: reqwest::Client,
    url: Url,
    secret: Option<Vec<u8>>,
    retry_for: Duration,
    retried: Counter,
}

impl Webhook {
    pub fn new(
        url: Url,
        secret: Option<Vec<u8>>,
        retry_for: Duration,
        retried: Counter,
    ) -> anyhow::Result<Self> {
        // A redirect would turn the POST into a bodiless GET elsewhere, and take the
        // signature with it: a 3xx ends the notification like any other refusal.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("imgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Webhook {
            client,
            url,
            secret,
            retry_for,
            retried,
        })
    }

    /// `sha256=<hex HMAC-SHA256 of body>` with the secret, if there is one.
    pub fn signature(&self, body: &[u8]) -> Option<String> {
        let key = self.secret.as_deref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any size");
        mac.update(body);
        let mut out = String::from("sha256=");
        for b in mac.finalize().into_bytes() {
            let _ = write!(out, "{b:02x}");
        }
        Some(out)
    }

    /// POSTs `body` until it is taken, refused, or retries run out; `None` if `stop` came
    /// first (the notification stays pending).
    pub async fn deliver(
        &self,
        id: &str,
        body: Bytes,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let started = Instant::now();
        let signature = self.signature(&body);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut req = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Imgate-Delivery", id)
                .body(body.clone());
            if let Some(s) = &signature {
                req = req.header("X-Imgate-Signature", s);
            }
            let why = tokio::select! {
                r = req.send() => match r {
                    Ok(r) if r.status().is_success() => return Some(Outcome::Sent),
                    Ok(r) if retried(r.status()) => format!("the webhook answered {}", r.status()),
                    Ok(r) => {
                        return Some(Outcome::GaveUp(format!("the webhook answered {}", r.status())))
                    }
                    Err(e) => format!("the webhook could not be reached: {e}"),
                },
                _ = stop.cancelled() => return None,
            };
            // Between half the backoff and all of it.
            let wait = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            if started.elapsed() + wait > self.retry_for {
                return Some(Outcome::GaveUp(format!(
                    "{why}; retried for {:?}",
                    started.elapsed()
                )));
            }
            tracing::debug!(id, %why, ?wait, "notification not taken; trying again");
            self.retried.increment(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return None,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Answers that may pass: too many requests, and server errors.
fn retried(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_hmac_sha256_and_only_429_and_5xx_are_tried_again() {
        let url: Url = "http://127.0.0.1:9/".parse().unwrap();
        let hook =
            Webhook::new(url, Some(b"key".to_vec()), FIRST_BACKOFF, Counter::noop()).unwrap();
        // RFC 4231-style check against a value computed independently (Python's hmac).
        assert_eq!(
            hook.signature(b"The quick brown fox jumps over the lazy dog")
                .as_deref(),
            Some("sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
        );
        assert!(retried(StatusCode::TOO_MANY_REQUESTS));
        assert!(retried(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retried(StatusCode::BAD_REQUEST));
        assert!(!retried(StatusCode::GONE));
    }
}
