//! etcd's JWT tokens (`--auth-token jwt,pub-key=..,priv-key=..,sign-method=RS256,ttl=5m`):
//! `header.claims.signature` in base64url, claims `{"exp":..,"revision":..,"username":..}` as
//! etcd 3.4 writes them (jwt-go marshals its claim map with sorted keys). A token is valid while
//! its signature verifies with the configured key and method and `exp` is not past; nothing is
//! stored, so tokens survive a restart and cannot be ended early (a deleted user's token is
//! refused by the auth revision check instead, as etcd's).
//!
//! Signatures use `ring`: RS256/384/512 and PS256/384/512 with an RSA key (PKCS#1 or PKCS#8
//! PEM), ES256/ES384 with a P-256/P-384 key (PKCS#8 or SEC1 `EC PRIVATE KEY` PEM). The public
//! key is a `PUBLIC KEY` (SubjectPublicKeyInfo)
//! PEM; without a private key the provider only verifies, as etcd's. ES512 (P-521) is refused
//! at start-up: ring does not implement it.

use super::token::{TokenInfo, TokenProvider};
use super::AuthError;
use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// JWT's base64url without padding; like Go's decoder (which jwt-go uses), it ignores the
/// unused low bits of the last character.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// etcd's default JWT `ttl`.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(5 * 60);

/// The options of `--auth-token jwt,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtOptions {
    pub sign_method: String,
    pub pub_key: Option<PathBuf>,
    pub priv_key: Option<PathBuf>,
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ecdsa,
}

/// One JWT `alg`: its key family and ring's algorithms for signing and verifying.
struct Method {
    name: &'static str,
    family: Family,
    rsa_padding: Option<&'static dyn signature::RsaEncoding>,
    ecdsa_signing: Option<&'static signature::EcdsaSigningAlgorithm>,
    verify: &'static dyn signature::VerificationAlgorithm,
}

fn method(name: &str) -> Result<Method, String> {
    let rsa = |name, padding, verify| Method {
        name,
        family: Family::Rsa,
        rsa_padding: Some(padding),
        ecdsa_signing: None,
        verify,
    };
    let ecdsa = |name, signing, verify| Method {
        name,
        family: Family::Ecdsa,
        rsa_padding: None,
        ecdsa_signing: Some(signing),
        verify,
    };
    Ok(match name {
        "RS256" => rsa(
            "RS256",
            &signature::RSA_PKCS1_SHA256,
            &signature::RSA_PKCS1_2048_8192_SHA256,
        ),
        "RS384" => rsa(
            "RS384",
            &signature::RSA_PKCS1_SHA384,
            &signature::RSA_PKCS1_2048_8192_SHA384,
        ),
        "RS512" => rsa(
            "RS512",
            &signature::RSA_PKCS1_SHA512,
            &signature::RSA_PKCS1_2048_8192_SHA512,
        ),
        "PS256" => rsa(
            "PS256",
            &signature::RSA_PSS_SHA256,
            &signature::RSA_PSS_2048_8192_SHA256,
        ),
        "PS384" => rsa(
            "PS384",
            &signature::RSA_PSS_SHA384,
            &signature::RSA_PSS_2048_8192_SHA384,
        ),
        "PS512" => rsa(
            "PS512",
            &signature::RSA_PSS_SHA512,
            &signature::RSA_PSS_2048_8192_SHA512,
        ),
        "ES256" => ecdsa(
            "ES256",
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &signature::ECDSA_P256_SHA256_FIXED,
        ),
        "ES384" => ecdsa(
            "ES384",
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &signature::ECDSA_P384_SHA384_FIXED,
        ),
        _ => return Err(format!("unsupported JWT sign-method {name:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)")),
    })
}

enum Signer {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
}

/// etcd's `tokenJWT`.
pub struct JwtTokens {
    method: Method,
    /// `None`: verify only.
    signer: Option<Signer>,
    /// The raw public key ring verifies with (PKCS#1 RSAPublicKey or an uncompressed point).
    public_key: Vec<u8>,
    ttl: Duration,
    rng: SystemRandom,
}

impl JwtTokens {
    /// Loads the keys; an error names the file and what is wrong with it.
    pub fn load(options: &JwtOptions) -> Result<JwtTokens, String> {
        let method = method(&options.sign_method)?;
        let rng = SystemRandom::new();
        let signer = match &options.priv_key {
            Some(path) => Some(
                load_signer(&method, &read(path)?, &rng)
                    .map_err(|e| format!("JWT priv-key {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let public_key = match (&options.pub_key, &signer) {
            (Some(path), _) => public_key_of_spki(&read(path)?)
                .map_err(|e| format!("JWT pub-key {}: {e}", path.display()))?,
            (None, Some(Signer::Rsa(pair))) => pair.public_key().as_ref().to_vec(),
            (None, Some(Signer::Ecdsa(pair))) => pair.public_key().as_ref().to_vec(),
            (None, None) => return Err("JWT needs pub-key or priv-key".into()),
        };
        Ok(JwtTokens {
            method,
            signer,
            public_key,
            ttl: options.ttl,
            rng,
        })
    }

    fn sign(&self, signer: &Signer, message: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        match signer {
            Signer::Rsa(pair) => {
                let padding = self.method.rsa_padding.expect("RSA method has a padding");
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &self.rng, message, &mut out)?;
                Ok(out)
            }
            Signer::Ecdsa(pair) => Ok(pair.sign(&self.rng, message)?.as_ref().to_vec()),
        }
    }

    /// The claims of a token whose header names our method and whose signature verifies.
    fn verified_claims(&self, token: &str) -> Option<Value> {
        let (signed, signature) = token.rsplit_once('.')?;
        let (header, claims) = signed.split_once('.')?;
        let header: Value = serde_json::from_slice(&BASE64URL.decode(header).ok()?).ok()?;
        if header["alg"] != self.method.name {
            return None;
        }
        let signature = BASE64URL.decode(signature).ok()?;
        UnparsedPublicKey::new(self.method.verify, &self.public_key)
            .verify(signed.as_bytes(), &signature)
            .ok()?;
        serde_json::from_slice(&BASE64URL.decode(claims).ok()?).ok()
    }
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenProvider for JwtTokens {
    fn assign(&self, user: &str, auth_revision: u64) -> Result<String, AuthError> {
        let Some(signer) = &self.signer else {
            return Err(AuthError::JwtVerifyOnly);
        };
        // serde_json's maps are sorted, like jwt-go's marshalled claim maps.
        let header = json!({"alg": self.method.name, "typ": "JWT"});
        let claims = json!({
            "exp": unix_now_s() + self.ttl.as_secs(),
            "revision": auth_revision,
            "username": user,
        });
        let signed = format!(
            "{}.{}",
            BASE64URL.encode(header.to_string()),
            BASE64URL.encode(claims.to_string())
        );
        // ring fails only on a wrong buffer size or a failing system RNG.
        let signature = self
            .sign(signer, signed.as_bytes())
            .expect("signing with a loaded key");
        Ok(format!("{signed}.{}", BASE64URL.encode(signature)))
    }

    /// jwt-go's checks: the signature, then `exp` (a token is valid up to and including its
    /// `exp` second; one without `exp` does not expire), then etcd's two claims.
    fn info(&self, token: &str) -> Option<TokenInfo> {
        let claims = self.verified_claims(token)?;
        if let Some(exp) = claims.get("exp") {
            if exp.as_f64()? < unix_now_s() as f64 {
                return None;
            }
        }
        Some(TokenInfo {
            user: claims["username"].as_str()?.to_string(),
            auth_revision: Some(claims["revision"].as_f64()? as u64),
        })
    }

    fn invalidate_user(&self, _user: &str) {}

    fn invalidate_all(&self) {}
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read JWT key {}: {e}", path.display()))
}

fn load_signer(method: &Method, pem: &[u8], rng: &SystemRandom) -> Result<Signer, String> {
    let key =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))?;
    let rejected = |e: ring::error::KeyRejected| format!("key rejected for {}: {e}", method.name);
    match (method.family, &key) {
        (Family::Rsa, PrivateKeyDer::Pkcs1(der)) => RsaKeyPair::from_der(der.secret_pkcs1_der())
            .map(Signer::Rsa)
            .map_err(rejected),
        (Family::Rsa, PrivateKeyDer::Pkcs8(der)) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map(Signer::Rsa)
            .map_err(rejected),
        (Family::Ecdsa, PrivateKeyDer::Pkcs8(der)) => {
            ecdsa_pair(method, der.secret_pkcs8_der(), rng).map_err(rejected)
        }
        (Family::Ecdsa, PrivateKeyDer::Sec1(der)) => {
            let pkcs8 = sec1_to_pkcs8(method, der.secret_sec1_der());
            ecdsa_pair(method, &pkcs8, rng).map_err(rejected)
        }
        _ => Err(format!("not a private key for {}", method.name)),
    }
}

fn ecdsa_pair(
    method: &Method,
    pkcs8: &[u8],
    rng: &SystemRandom,
) -> Result<Signer, ring::error::KeyRejected> {
    let signing = method
        .ecdsa_signing
        .expect("ECDSA method has a signing algorithm");
    EcdsaKeyPair::from_pkcs8(signing, pkcs8, rng).map(Signer::Ecdsa)
}

/// DER object identifiers: id-ecPublicKey, and the curves of ES256 and ES384.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// Wraps a SEC1 `EC PRIVATE KEY` (what `openssl ecparam -genkey` writes; jwt-go reads both
/// forms) in the PKCS#8 envelope ring reads: `SEQUENCE { INTEGER 0, SEQUENCE { ecPublicKey,
/// curve }, OCTET STRING sec1 }`. ring checks the curve and the key itself.
fn sec1_to_pkcs8(method: &Method, sec1: &[u8]) -> Vec<u8> {
    let curve = if method.name == "ES384" {
        OID_P384
    } else {
        OID_P256
    };
    let algorithm = [der(0x06, OID_EC_PUBLIC_KEY), der(0x06, curve)].concat();
    let version_0 = der(0x02, &[0]);
    let body = [version_0, der(0x30, &algorithm), der(0x04, sec1)].concat();
    der(0x30, &body)
}

/// One DER item: tag, definite length (short or long form), contents.
fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// The subjectPublicKey bits of a `PUBLIC KEY` PEM: `SEQUENCE { SEQUENCE algorithm, BIT STRING
/// key }`. ring checks the key itself when verifying.
fn public_key_of_spki(pem: &[u8]) -> Result<Vec<u8>, String> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
        .map_err(|e| format!("not a PEM public key: {e}"))?;
    let malformed = || "malformed SubjectPublicKeyInfo".to_string();
    let (tag, body, _) = der_item(spki.as_ref()).ok_or_else(malformed)?;
    let (algorithm_tag, _, rest) = der_item(body).ok_or_else(malformed)?;
    let (bits_tag, bits, _) = der_item(rest).ok_or_else(malformed)?;
    const SEQUENCE: u8 = 0x30;
    const BIT_STRING: u8 = 0x03;
    if (tag, algorithm_tag, bits_tag) != (SEQUENCE, SEQUENCE, BIT_STRING) {
        return Err(malformed());
    }
    // The first byte of a BIT STRING counts unused bits: zero for a key.
    match bits.split_first() {
        Some((0, key)) => Ok(key.to_vec()),
        _ => Err(malformed()),
    }
}

/// One DER item: (tag, contents, what follows). Definite lengths only, as DER requires.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = match first {
        0..=0x7f => usize::from(first),
        0x81..=0x84 => {
            let count = usize::from(first & 0x7f);
            let (bytes, after) = (rest.get(..count)?, rest.get(count..)?);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b))
        }
        _ => return None,
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_items_split_short_and_long_lengths() {
        assert_eq!(
            der_item(&[0x30, 0x01, 0xaa, 0xbb]),
            Some((0x30, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x03, 0x81, 0x80];
        long.extend([7; 0x80]);
        let (tag, body, rest) = der_item(&long).unwrap();
        assert_eq!((tag, body.len(), rest.len()), (0x03, 0x80, 0));
        assert_eq!(der_item(&[0x30, 0x05, 0x00]), None, "truncated");
        assert_eq!(der_item(&[0x30, 0x80]), None, "indefinite length");
    }

    #[test]
    fn der_items_round_trip_through_the_reader() {
        for len in [0, 5, 0x7f, 0x80, 300, 70_000] {
            let contents = vec![9; len];
            let item = der(0x04, &contents);
            assert_eq!(der_item(&item), Some((0x04, &contents[..], &[][..])));
        }
    }

    #[test]
    fn unknown_sign_methods_are_refused() {
        assert!(method("RS256").is_ok());
        assert!(method("ES512").is_err());
        assert!(method("HS256").is_err());
    }
}
