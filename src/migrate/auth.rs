//! Authentication by a shared token: mutual HMAC-SHA256 challenge–response.
//!
//! The token never crosses the wire. The destination sends a fresh nonce; the source answers
//! with its own nonce and `HMAC(token, "ferry/1 source" | role | session | nonce_d | nonce_s)`;
//! the destination checks it (in constant time) and proves itself with
//! `HMAC(token, "ferry/1 destination" | … | nonce_s | nonce_d)`. Nothing but Hello is accepted
//! before this succeeds.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{
    check_peer, Challenge, ErrorMsg, Hello, Msg, Proof, Role, Welcome, WireError, PROTOCOL_VERSION,
};
use super::MigrateError;

/// Longest token file read.
pub const MAX_TOKEN_FILE: u64 = 4096;
/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Cap on handshake frames.
pub const HANDSHAKE_CAP: u32 = 4096;
const NONCE_LEN: usize = 32;

/// The shared secret.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

impl Token {
    pub fn new(secret: &[u8]) -> Result<Token, MigrateError> {
        if secret.len() < MIN_TOKEN_LEN {
            return Err(MigrateError::Token(format!(
                "{} bytes long; at least {MIN_TOKEN_LEN} are needed",
                secret.len()
            )));
        }
        Ok(Token(secret.to_vec()))
    }

    /// Reads a token file (whitespace around the token is ignored). The file must not be
    /// readable by group or others.
    pub fn load(path: &Path) -> Result<Token, MigrateError> {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt;
        let bad = |why: String| MigrateError::Token(format!("{}: {why}", path.display()));
        let (f, meta) = crate::capped::open_regular(path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_TOKEN_FILE {
            return Err(bad(format!("larger than {MAX_TOKEN_FILE} bytes")));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad("readable by group or others (chmod 600)".into()));
        }
        let mut buf = Vec::new();
        f.take(MAX_TOKEN_FILE)
            .read_to_end(&mut buf)
            .map_err(|e| bad(e.to_string()))?;
        let text = String::from_utf8_lossy(&buf);
        Token::new(text.trim().as_bytes()).map_err(|e| match e {
            MigrateError::Token(why) => bad(why),
            e => e,
        })
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("kernel randomness");
    hex(&b)
}

fn role_name(r: Role) -> &'static [u8] {
    match r {
        Role::Control => b"control",
        Role::Data => b"data",
    }
}

/// Source side: proves knowledge of the token and checks the destination's proof. Returns
/// the session id (the destination's for a control connection, `session` for a data one).
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    token: &Token,
    role: Role,
    session: Option<&str>,
) -> Result<String, MigrateError> {
    Msg::Hello(Hello {
        version: PROTOCOL_VERSION,
        role,
        session: session.map(str::to_string),
    })
    .write_to(s)?;
    let ch = match check_peer(Msg::read_from(s, HANDSHAKE_CAP)?)? {
        Msg::Challenge(c) => c,
        other => {
            return Err(WireError::Unexpected {
                got: other.kind(),
                state: "waiting for the challenge",
            }
            .into())
        }
    };
    if ch.version != PROTOCOL_VERSION {
        return Err(MigrateError::Incompatible(format!(
            "destination speaks protocol {}, this ferry {PROTOCOL_VERSION}",
            ch.version
        )));
    }
    let nonce_d =
        unhex(&ch.nonce).ok_or_else(|| MigrateError::Auth("malformed challenge".into()))?;
    let nonce_s = random_hex(NONCE_LEN);
    let nonce_s_bytes = unhex(&nonce_s).unwrap_or_default();
    let sess = session.unwrap_or("").as_bytes();
    let mac = token
        .mac(&[
            b"ferry/1 source",
            role_name(role),
            sess,
            &nonce_d,
            &nonce_s_bytes,
        ])
        .finalize()
        .into_bytes();
    Msg::Proof(Proof {
        nonce: nonce_s,
        mac: hex(&mac),
    })
    .write_to(s)?;
    let w = match Msg::read_from(s, HANDSHAKE_CAP)? {
        Msg::Welcome(w) => w,
        Msg::Error(e) if e.kind == "auth" => return Err(MigrateError::Auth(e.message)),
        other => {
            return Err(check_peer(other)
                .err()
                .map(MigrateError::from)
                .unwrap_or_else(|| {
                    MigrateError::Auth("destination did not accept the handshake".into())
                }))
        }
    };
    let theirs =
        unhex(&w.mac).ok_or_else(|| MigrateError::Auth("malformed destination proof".into()))?;
    let session_bytes = if role == Role::Control {
        w.session.as_bytes().to_vec()
    } else {
        sess.to_vec()
    };
    token
        .mac(&[
            b"ferry/1 destination",
            role_name(role),
            &session_bytes,
            &nonce_s_bytes,
            &nonce_d,
        ])
        .verify_slice(&theirs)
        .map_err(|_| MigrateError::Auth("the destination does not know the token".into()))?;
    Ok(w.session)
}

/// Destination side: reads Hello, challenges, verifies; `new_session` names a control
/// session. Returns the Hello and the session id.
pub fn server_handshake<S: Read + Write>(
    s: &mut S,
    token: &Token,
    new_session: impl FnOnce() -> String,
) -> Result<(Hello, String), MigrateError> {
    let hello = match Msg::read_from(s, HANDSHAKE_CAP)? {
        Msg::Hello(h) => h,
        other => {
            return Err(WireError::Unexpected {
                got: other.kind(),
                state: "waiting for hello",
            }
            .into())
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol {} is not supported (this ferry speaks {PROTOCOL_VERSION})",
            hello.version
        );
        let _ = Msg::Error(ErrorMsg {
            kind: "incompatible".into(),
            message: msg.clone(),
        })
        .write_to(s);
        return Err(MigrateError::Incompatible(msg));
    }
    let nonce_d = random_hex(NONCE_LEN);
    let nonce_d_bytes = unhex(&nonce_d).unwrap_or_default();
    Msg::Challenge(Challenge {
        version: PROTOCOL_VERSION,
        nonce: nonce_d,
    })
    .write_to(s)?;
    let proof = match Msg::read_from(s, HANDSHAKE_CAP)? {
        Msg::Proof(p) => p,
        other => {
            return Err(WireError::Unexpected {
                got: other.kind(),
                state: "waiting for the proof",
            }
            .into())
        }
    };
    let nonce_s = unhex(&proof.nonce).filter(|n| n.len() == NONCE_LEN);
    let theirs = unhex(&proof.mac);
    let sess_in = hello.session.clone().unwrap_or_default();
    let ok = match (&nonce_s, &theirs) {
        (Some(ns), Some(m)) => token
            .mac(&[
                b"ferry/1 source",
                role_name(hello.role),
                sess_in.as_bytes(),
                &nonce_d_bytes,
                ns,
            ])
            .verify_slice(m)
            .is_ok(),
        _ => false,
    };
    if !ok {
        let _ = Msg::Error(ErrorMsg {
            kind: "auth".into(),
            message: "authentication failed (wrong token?)".into(),
        })
        .write_to(s);
        return Err(MigrateError::Auth("a peer failed authentication".into()));
    }
    let session = match hello.role {
        Role::Control => new_session(),
        Role::Data => sess_in,
    };
    let mac = token
        .mac(&[
            b"ferry/1 destination",
            role_name(hello.role),
            session.as_bytes(),
            nonce_s.as_deref().unwrap_or_default(),
            &nonce_d_bytes,
        ])
        .finalize()
        .into_bytes();
    Msg::Welcome(Welcome {
        mac: hex(&mac),
        session: session.clone(),
    })
    .write_to(s)?;
    Ok((hello, session))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(
        client_token: &[u8],
        server_token: &[u8],
    ) -> (
        Result<String, MigrateError>,
        Result<(Hello, String), MigrateError>,
    ) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let st = Token::new(server_token).unwrap();
        let h = std::thread::spawn(move || server_handshake(&mut b, &st, || "sess-1".into()));
        let ct = Token::new(client_token).unwrap();
        let c = client_handshake(&mut a, &ct, Role::Control, None);
        drop(a);
        (c, h.join().unwrap())
    }

    #[test]
    fn same_token_authenticates_both_ways() {
        let (c, s) = run(b"0123456789abcdef0123", b"0123456789abcdef0123");
        assert_eq!(c.unwrap(), "sess-1");
        assert_eq!(s.unwrap().1, "sess-1");
    }

    #[test]
    fn wrong_token_is_refused() {
        let (c, s) = run(b"0123456789abcdef0123", b"ffffffffffffffffffff");
        assert!(matches!(c, Err(MigrateError::Auth(_))), "{c:?}");
        assert!(matches!(s, Err(MigrateError::Auth(_))));
    }

    #[test]
    fn short_tokens_and_open_token_files_are_rejected() {
        assert!(Token::new(b"short").is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Token::load(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::load(&p).is_ok());
    }

    #[test]
    fn nothing_but_hello_is_accepted_first() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            server_handshake(&mut b, &Token::new(b"0123456789abcdef").unwrap(), || {
                "s".into()
            })
        });
        Msg::Commit.write_to(&mut a).unwrap();
        assert!(h.join().unwrap().is_err());
    }
}
