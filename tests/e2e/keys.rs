//! Identity-provider keys (`--jwt-jwks-file`, `--jwt-public-key-file`, `--jwt-issuer`,
//! `--jwt-audience`): RS256, ES256 and EdDSA tokens made the way a provider makes them
//! (keys from `openssl`, signed by `jsonwebtoken`), each refusal answered 401
//! `unauthorized`, and a key added to the JWKS used after SIGHUP.

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::*;

/// Runs `openssl` with `args`; its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A new private key of `algorithm` (`RSA`, `EC`, `ed25519`) under `dir`: the paths of the
/// private key (PKCS#8 PEM) and its public key (PEM).
fn keypair(dir: &Path, name: &str, algorithm: &str) -> (String, String) {
    let private = dir.join(format!("{name}.key")).display().to_string();
    let public = dir.join(format!("{name}.pub")).display().to_string();
    let mut args = vec!["genpkey", "-algorithm", algorithm, "-out", &private];
    match algorithm {
        "RSA" => args.extend(["-pkeyopt", "rsa_keygen_bits:2048"]),
        "EC" => args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]),
        _ => {}
    }
    openssl(&args);
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
    (private, public)
}

/// The JWK of an RSA public key: its modulus from `openssl`, exponent 65537.
fn rsa_jwk(public: &str, kid: &str) -> Value {
    let text = String::from_utf8(openssl(&[
        "rsa", "-pubin", "-in", public, "-noout", "-modulus",
    ]))
    .unwrap();
    let hex = text.trim().strip_prefix("Modulus=").unwrap();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": B64.encode(n), "e": "AQAB"})
}

/// The JWK of an Ed25519 public key: the last 32 bytes of its DER form.
fn ed_jwk(public: &str, kid: &str) -> Value {
    let der = openssl(&["pkey", "-pubin", "-in", public, "-outform", "DER"]);
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": B64.encode(&der[der.len() - 32..])})
}

fn sign(alg: Algorithm, kid: Option<&str>, private: &str, claims: &Value) -> String {
    let pem = std::fs::read(private).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::HS256 => Ok(EncodingKey::from_secret(&pem)),
        _ => unreachable!(),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims as the provider of these tests issues them.
fn claims(uid: &str) -> Value {
    json!({"sub": uid, "iss": "https://idp.test", "aud": "imgate", "iat": now(), "exp": now() + 600})
}

/// `GET /v1/messages` with `token`: the HTTP status and the error code, if any.
async fn poll_with(gw: &Gateway, token: &str) -> (u16, Value) {
    let r = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("http://{}/v1/messages", gw.http),
    ])
    .await;
    (r.status, r.json()["code"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_tokens_are_checked_by_kid_issuer_audience_and_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = keypair(dir.path(), "rsa", "RSA");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [rsa_jwk(&rsa_public, "k1")]}).to_string(),
    )
    .unwrap();
    let jwks_arg = jwks.display().to_string();
    let gw = Gateway::start(&[
        "--jwt-jwks-file",
        &jwks_arg,
        "--jwt-issuer",
        "https://idp.test",
        "--jwt-audience",
        "imgate",
    ])
    .await
    .unwrap();

    let good = sign(Algorithm::RS256, Some("k1"), &rsa_private, &claims("alice"));
    assert_eq!(poll_with(&gw, &good).await.0, 200);
    // The same token logs in on TCP and receives.
    let mut raw = RawTcp::connect(&gw).await;
    raw.login(&good, "phone").await;

    let refused = |what: &'static str, token: String| (what, token);
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = "https://other.test".into();
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = "someone-else".into();
    let mut expired = claims("alice");
    expired["exp"] = (now() - 3600).into();
    let header_none = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{header_none}.{}.", B64.encode(claims("alice").to_string()));
    for (what, token) in [
        refused(
            "wrong iss",
            sign(Algorithm::RS256, Some("k1"), &rsa_private, &wrong_iss),
        ),
        refused(
            "wrong aud",
            sign(Algorithm::RS256, Some("k1"), &rsa_private, &wrong_aud),
        ),
        refused(
            "unknown kid",
            sign(Algorithm::RS256, Some("k9"), &rsa_private, &claims("alice")),
        ),
        refused(
            "expired",
            sign(Algorithm::RS256, Some("k1"), &rsa_private, &expired),
        ),
        refused("alg none", unsigned),
        // HS256 with the public key's bytes as the secret: the classic confusion attack.
        refused(
            "HS256 with the public key",
            sign(Algorithm::HS256, Some("k1"), &rsa_public, &claims("alice")),
        ),
        refused("the development secret", token("alice")),
    ] {
        let (status, code) = poll_with(&gw, &token).await;
        assert_eq!((status, code), (401, json!("unauthorized")), "{what}");
    }
    // With keys configured there is no development endpoint.
    let dev = curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"uid":"x"}"#,
        &format!("http://{}/v1/dev/token", gw.http),
    ])
    .await;
    assert_eq!(dev.status, 404);

    // A key added to the JWKS is used after SIGHUP, and not before.
    let (ed_private, ed_public) = keypair(dir.path(), "ed", "ed25519");
    let k2 = sign(Algorithm::EdDSA, Some("k2"), &ed_private, &claims("bob"));
    assert_eq!(poll_with(&gw, &k2).await.0, 401);
    let both = json!({"keys": [rsa_jwk(&rsa_public, "k1"), ed_jwk(&ed_public, "k2")]});
    std::fs::write(&jwks, both.to_string()).unwrap();
    gw.signal("HUP").unwrap();
    within(WAIT, "the new key to be used", async {
        while poll_with(&gw, &k2).await.0 != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(poll_with(&gw, &good).await.0, 200, "k1 still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_file_accepts_its_algorithm_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ec_private, ec_public) = keypair(dir.path(), "ec", "EC");
    let (other_private, _) = keypair(dir.path(), "other", "EC");
    let gw = Gateway::start(&["--jwt-public-key-file", &ec_public])
        .await
        .unwrap();
    let no_claims_checked = json!({"sub": "alice", "exp": now() + 600});
    let good = sign(Algorithm::ES256, None, &ec_private, &no_claims_checked);
    assert_eq!(poll_with(&gw, &good).await.0, 200);
    // Providers name a kid in every token; the one PEM key is used whatever it says.
    let with_kid = sign(
        Algorithm::ES256,
        Some("any"),
        &ec_private,
        &no_claims_checked,
    );
    assert_eq!(poll_with(&gw, &with_kid).await.0, 200);
    let forged = sign(Algorithm::ES256, None, &other_private, &no_claims_checked);
    assert_eq!(poll_with(&gw, &forged).await, (401, json!("unauthorized")));
    let hs = sign(Algorithm::HS256, None, &ec_public, &no_claims_checked);
    assert_eq!(poll_with(&gw, &hs).await, (401, json!("unauthorized")));

    // A key file that is not a key stops the start, naming the file.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a key").unwrap();
    let bogus = bogus.display().to_string();
    let err = serve_fails(&["--jwt-public-key-file", &bogus]).await;
    assert!(err.contains("bogus.pem"), "{err}");
}
