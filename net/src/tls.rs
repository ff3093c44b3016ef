//! TLS on the client port, as etcd's `--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth` and `--auto-tls` configure it; and on the peer port, as the `--peer-*`
//! twins of those flags configure it (`PeerTls`: both ends of every peer connection).
//!
//! rustls (on `ring`) does the handshake through `futures-rustls`, whose streams fit
//! glommio's futures-io sockets; the handshake is an ordinary async task on the accepting
//! core. ALPN offers `h2` and `http/1.1` as etcd's Go server does, so gRPC and the HTTP
//! endpoints share a TLS port exactly as they share a plain one.
//!
//! etcd's TLS rules this follows (3.4, checked against the real server):
//! - a certificate and key must come as a pair ("KeyFile and CertFile must both be present");
//! - a `--trusted-ca-file` makes client certificates required and verified against it, with or
//!   without `--client-cert-auth`;
//! - `--client-cert-auth` also turns on certificate authentication: a request with a verified
//!   client certificate and no token acts as the user named by the certificate's Common Name.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::http::{Request, StatusCode};
use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::server::TlsStream;
use futures_rustls::{TlsAcceptor, TlsConnector};
use hyper::body::Incoming;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::auth::TLS_COMMON_NAME_METADATA_KEY;
use crate::http::{go_error, HttpHandler, ResponseFuture};

/// Protocols offered in ALPN, most preferred first (etcd's Go server offers the same two).
const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// One `--listen-*-urls` entry: `http://` or `https://`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenUrl {
    /// As given, for messages.
    pub url: String,
    /// The host part (name or IP) without the port: what a self-signed certificate names.
    pub host: String,
    pub addr: SocketAddr,
    /// `https://`.
    pub tls: bool,
}

impl ListenUrl {
    /// Parses and resolves `http(s)://host:port` (the first address of the host).
    pub fn parse(url: &str) -> Result<ListenUrl, String> {
        let url = url.trim();
        let (tls, host_port) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => {
                return Err(format!("{url}: expected a URL like http://127.0.0.1:2379"))
            }
        };
        let host_port = host_port.trim_end_matches('/');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host_port)
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: host has no address"))?;
        let host = match host_port.rsplit_once(':') {
            Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => host_port,
        };
        Ok(ListenUrl {
            url: url.to_string(),
            host: host.to_string(),
            addr,
            tls,
        })
    }
}

/// One side's TLS flags (client or peer), as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    /// Generate a self-signed certificate at start when no certificate is given.
    pub auto_tls: bool,
}

impl TlsFiles {
    fn has_cert(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }

    fn is_configured(&self) -> bool {
        self.has_cert() || self.auto_tls || self.trusted_ca_file.is_some() || self.client_cert_auth
    }
}

/// The client port's TLS: the rustls configuration every core's listeners accept with.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    /// etcd's `ClientCertAuthEnabled`: verified certificates name the user (see [`Self::accept`]).
    cert_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_auth", &self.cert_auth)
            .finish_non_exhaustive()
    }
}

/// A finished server handshake.
pub struct Accepted<S> {
    pub stream: TlsStream<S>,
    /// The Common Name of the client's verified certificate, when certificate authentication
    /// is on (`--client-cert-auth`) and the client sent one. Empty when the certificate has
    /// none: etcd then checks the permissions of user "" (denied), not an anonymous caller.
    pub common_name: Option<String>,
}

impl ServerTls {
    /// The client port's TLS from the client flags, `None` when no URL is `https://`. Loads
    /// every file now so that a bad one stops the start, as etcd does; with `--auto-tls` and no
    /// certificate, generates (or reuses) a self-signed one under `fixtures_dir`.
    pub fn for_client(
        files: &TlsFiles,
        urls: &[ListenUrl],
        fixtures_dir: &Path,
    ) -> Result<Option<ServerTls>, String> {
        let plain_urls = urls.iter().filter(|u| !u.tls);
        for url in plain_urls.filter(|_| files.is_configured()) {
            crate::warn!(
                "scheme is HTTP while key and cert files are present; ignoring key and cert files",
                client_url = url.url.clone()
            );
        }
        let Some(https) = urls.iter().find(|u| u.tls) else {
            return Ok(None);
        };
        let hosts: Vec<String> = urls.iter().map(|u| u.host.clone()).collect();
        let files = with_auto_cert(files, "client", &hosts, fixtures_dir)?;
        if !files.has_cert() {
            return Err(format!(
                "TLS key/cert (--cert-file, --key-file) must be provided for client url {} \
                 with HTTPS scheme",
                https.url
            ));
        }
        let config = server_config(&files)?;
        Ok(Some(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert_auth: files.client_cert_auth,
        }))
    }

    /// Runs the server side of a handshake on `stream`.
    pub async fn accept<S>(&self, stream: S) -> io::Result<Accepted<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self.acceptor.accept(stream).await?;
        let common_name = match self.cert_auth {
            // A client certificate is only ever present here after the verifier accepted it
            // (the configuration has no other client authentication).
            true => stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| common_name(cert).unwrap_or_default()),
            false => None,
        };
        Ok(Accepted {
            stream,
            common_name,
        })
    }
}

/// Most of a refused gateway request's body that is read before answering (its messages are
/// at most etcd's 2 MiB gRPC limit, in JSON).
const REFUSED_BODY_MAX_BYTES: usize = 8 * 1024 * 1024;

/// etcd's access controller: with certificate authentication and auth both on, a gateway
/// (`/v3/`) request over a client certificate that has a Common Name is refused, whatever
/// token it carries, because the gateway cannot pass the name on as the user.
pub fn refuse_named_certificates_on_gateway(
    auth: Arc<crate::node::Shared>,
    gateway: HttpHandler,
) -> HttpHandler {
    Arc::new(move |req: Request<Incoming>| -> ResponseFuture {
        let named = req
            .headers()
            .get(TLS_COMMON_NAME_METADATA_KEY)
            .is_some_and(|name| !name.is_empty());
        if !(named && auth.auth.is_enabled()) {
            return gateway(req);
        }
        Box::pin(async move {
            // Read the request first: an HTTP/2 response sent while the client still uploads
            // ends the stream with a reset, which some clients (curl) report as an error.
            let limited = http_body_util::Limited::new(req.into_body(), REFUSED_BODY_MAX_BYTES);
            let _ = http_body_util::BodyExt::collect(limited).await;
            let message = "CommonName of client sending a request against gateway will be \
                           ignored and not used as expected";
            go_error(StatusCode::BAD_REQUEST, message)
        })
    })
}

/// The peer port's TLS: the server side for connections peers open to this member, the client
/// side for those it opens to `https://` peers. As etcd's peer transport, a member presents its
/// one peer certificate on both sides; `--peer-trusted-ca-file` makes the other end's
/// certificate required and verified against it, on both sides. Without it (`--peer-auto-tls`
/// or a certificate alone) a dialing member does not verify the peer's certificate, as etcd
/// skips verification for self-signed peer certificates: the link is encrypted, not
/// authenticated, which the start-up log says.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// The connector's configuration, for the blocking client (`connect_blocking`).
    client: Arc<ClientConfig>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Checks the peer flags as etcd would at start (pairs complete, files load, https peer
    /// URLs have a certificate) and builds both sides; `None` when no peer URL is `https://`.
    pub fn for_peers(
        files: &TlsFiles,
        urls: &[ListenUrl],
        fixtures_dir: &Path,
    ) -> Result<Option<PeerTls>, String> {
        if files.has_cert() {
            server_config(files).map_err(|e| format!("peer TLS: {e}"))?;
        }
        let Some(https) = urls.iter().find(|u| u.tls) else {
            return Ok(None);
        };
        let hosts: Vec<String> = urls.iter().map(|u| u.host.clone()).collect();
        let files = with_auto_cert(files, "peer", &hosts, fixtures_dir)?;
        if !files.has_cert() {
            return Err(format!(
                "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url \
                 {} with HTTPS scheme",
                https.url
            ));
        }
        if files.trusted_ca_file.is_none() {
            crate::warn!(
                "no --peer-trusted-ca-file: peer certificates are not verified (the peer link is \
                 encrypted, not authenticated)"
            );
        }
        let mut server = server_config(&files).map_err(|e| format!("peer TLS: {e}"))?;
        // The peer protocol is ours, not HTTP: no ALPN.
        server.alpn_protocols.clear();
        let client = Arc::new(peer_client_config(&files).map_err(|e| format!("peer TLS: {e}"))?);
        Ok(Some(PeerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(client.clone()),
            client,
        }))
    }

    /// The server side of a handshake on a connection a peer opened.
    pub async fn accept<S>(&self, stream: S) -> io::Result<futures_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor.accept(stream).await
    }

    /// The client side of a handshake with the peer at `host` (its URL's host: a name or an
    /// IP address its certificate must carry when verified).
    pub async fn connect<S>(
        &self,
        host: &str,
        stream: S,
    ) -> io::Result<futures_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.connector.connect(server_name(host)?, stream).await
    }

    /// `connect` on a blocking socket (a joining member asks before its server runs): the
    /// handshake completes here, with the socket's timeouts.
    pub fn connect_blocking(
        &self,
        host: &str,
        mut stream: std::net::TcpStream,
    ) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
        let mut connection = rustls::ClientConnection::new(self.client.clone(), server_name(host)?)
            .map_err(io::Error::other)?;
        while connection.is_handshaking() {
            connection.complete_io(&mut stream)?;
        }
        Ok(rustls::StreamOwned::new(connection, stream))
    }
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))
}

/// The dialing side of the peer port: the member's own certificate as its client certificate,
/// and the peer's certificate verified against `--peer-trusted-ca-file` when given.
fn peer_client_config(files: &TlsFiles) -> Result<ClientConfig, String> {
    let identity = read_identity(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.trusted_ca_file {
        Some(ca_file) => builder.with_root_certificates(roots(ca_file)?),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UnverifiedPeer { provider })),
    };
    builder
        .with_client_auth_cert(identity.certs, identity.key)
        .map_err(|e| format!("{}: {e}", identity.files))
}

/// Accepts any peer certificate (but still checks the handshake's signatures, so the peer
/// holds the key of the certificate it sent): etcd's `InsecureSkipVerify` for peers without
/// a trusted CA.
#[derive(Debug)]
struct UnverifiedPeer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UnverifiedPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// etcd's `--auto-tls`: when no certificate is given, a self-signed one for `hosts`, created
/// under `dir` on first start and reused afterwards. Otherwise `files` unchanged.
/// `side` names the flags in the log: "client" or "peer".
fn with_auto_cert(
    files: &TlsFiles,
    side: &str,
    hosts: &[String],
    dir: &Path,
) -> Result<TlsFiles, String> {
    if !files.auto_tls || files.has_cert() {
        if files.auto_tls {
            crate::warn!(format!("ignoring {side} auto TLS since certs given"));
        }
        return Ok(files.clone());
    }
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !(cert_path.exists() && key_path.exists()) {
        write_self_signed(hosts, &cert_path, &key_path).map_err(|e| {
            format!(
                "cannot create a self-signed certificate in {}: {e}",
                dir.display()
            )
        })?;
    }
    Ok(TlsFiles {
        cert_file: Some(cert_path),
        key_file: Some(key_path),
        ..files.clone()
    })
}

fn write_self_signed(hosts: &[String], cert_path: &Path, key_path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let invalid = |e: rcgen::Error| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(invalid)?;
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(invalid)?;
    let cert = params.self_signed(&key).map_err(invalid)?;
    let dir = cert_path
        .parent()
        .expect("the certificate path has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let write = |path: &Path, pem: &str, mode: u32| -> io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()
    };
    write(key_path, &key.serialize_pem(), 0o600)?;
    write(cert_path, &cert.pem(), 0o644)
}

/// A certificate chain and its key, read from the `--*cert-file` / `--*key-file` pair.
struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// "CERT and KEY", for messages.
    files: String,
}

/// Reads the certificate and key files, which must come as a pair. Errors read like etcd's.
fn read_identity(files: &TlsFiles) -> Result<Identity, String> {
    let (cert_file, key_file) = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => (cert, key),
        (cert, key) => {
            let shown = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or(String::new(), |p| p.display().to_string())
            };
            return Err(format!(
                "KeyFile and CertFile must both be present[key: {}, cert: {}]",
                shown(key),
                shown(cert)
            ));
        }
    };
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
        .map_err(|e| format!("{}: no private key: {e}", key_file.display()))?;
    let files = format!("{} and {}", cert_file.display(), key_file.display());
    Ok(Identity { certs, key, files })
}

/// Builds a rustls server configuration from PEM files. Errors read like etcd's.
fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let identity = read_identity(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.trusted_ca_file {
        Some(ca_file) => builder.with_client_cert_verifier(client_verifier(ca_file, provider)?),
        None if files.client_cert_auth => {
            return Err(
                "--client-cert-auth needs --trusted-ca-file (the CAs that sign client \
                 certificates)"
                    .into(),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.certs, identity.key)
        .map_err(|e| format!("{}: {e}", identity.files))?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client certificates must chain to one of the CAs in `ca_file` (etcd requires them as soon
/// as a trusted CA file is given).
fn client_verifier(
    ca_file: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_file)?), provider)
        .build()
        .map_err(|e| format!("{}: {e}", ca_file.display()))
}

/// The CAs of a trusted CA file.
fn roots(ca_file: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("open {}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match certs.is_empty() {
        true => Err(format!(
            "{}: failed to find any PEM data in certificate input",
            path.display()
        )),
        false => Ok(certs),
    }
}

/// The subject Common Name of a certificate (the last one, as Go's `pkix.Name` keeps), or
/// `None` if it has none or is not UTF-8.
///
/// rustls-webpki (already under rustls) parses the certificate and hands out the subject's
/// DER; walking its few levels here is lighter than a full X.509 parser as a dependency.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    /// id-at-commonName, 2.5.4.3.
    const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    const TAG_SET: u8 = 0x31;
    const TAG_SEQUENCE: u8 = 0x30;
    const TAG_OID: u8 = 0x06;
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut names = parsed.subject();
    let mut found = None;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    while !names.is_empty() {
        let (tag, mut set, rest) = der_next(names)?;
        names = rest;
        if tag != TAG_SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, rest) = der_next(set)?;
            set = rest;
            if tag != TAG_SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_next(attribute)?;
            if tag == TAG_OID && oid == OID_COMMON_NAME {
                let (_string_tag, text, _) = der_next(value)?;
                found = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    found
}

/// Splits one DER element off `input`: (tag, contents, rest). Single-byte tags only, which is
/// all a Name holds.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        short if short < 0x80 => (usize::from(short), rest),
        long => {
            let count = usize::from(long & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let len = rest[..count]
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b));
            (len, &rest[count..])
        }
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_subject(names: &[(rcgen::DnType, &str)]) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in names {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        let cert = cert_with_subject(&[
            (rcgen::DnType::OrganizationName, "etcd"),
            (rcgen::DnType::CommonName, "alice"),
        ]);
        assert_eq!(common_name(&cert).as_deref(), Some("alice"));
        let long_name = "x".repeat(300); // a long-form DER length
        let cert = cert_with_subject(&[(rcgen::DnType::CommonName, &long_name)]);
        assert_eq!(common_name(&cert), Some(long_name));
        let cert = cert_with_subject(&[(rcgen::DnType::OrganizationName, "etcd")]);
        assert_eq!(common_name(&cert), None);
    }

    #[test]
    fn der_lengths_short_and_long() {
        assert_eq!(
            der_next(&[0x04, 0x01, 0xaa, 0xbb]),
            Some((0x04, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend([7; 256]);
        assert_eq!(
            der_next(&long).map(|(_, c, r)| (c.len(), r.len())),
            Some((256, 0))
        );
        assert_eq!(der_next(&[0x04, 0x05, 0x00]), None, "truncated contents");
        assert_eq!(
            der_next(&[0x04, 0x80]),
            None,
            "indefinite length is not DER"
        );
    }

    #[test]
    fn listen_urls_parse_scheme_and_host() {
        let url = ListenUrl::parse("https://127.0.0.1:2379").unwrap();
        assert!(url.tls);
        assert_eq!(url.host, "127.0.0.1");
        assert_eq!(url.addr, "127.0.0.1:2379".parse().unwrap());
        let url = ListenUrl::parse("http://localhost:2379/").unwrap();
        assert!(!url.tls);
        assert_eq!(url.host, "localhost");
        assert!(ListenUrl::parse("unix://x").is_err());
    }

    #[test]
    fn incomplete_pairs_are_refused_as_etcd_does() {
        let files = TlsFiles {
            cert_file: Some("server.pem".into()),
            ..TlsFiles::default()
        };
        let err = server_config(&files).unwrap_err();
        assert_eq!(
            err,
            "KeyFile and CertFile must both be present[key: , cert: server.pem]"
        );
    }
}
