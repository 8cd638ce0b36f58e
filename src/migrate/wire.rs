//! Wire format of the migration control channel.
//!
//! Every frame: `b"FY"`, u16 kind, u32 payload length (big endian), payload. The length is
//! checked against [`MAX_FRAME`] before anything is allocated; an unknown kind or a bad magic
//! fails to decode. File data travels in [`Kind::Chunk`] frames as raw bytes; every other
//! message's payload is one JSON object.
//!
//! Protocol version 5 — the message sequence (S = source, `ferry migrate`; D = destination,
//! `ferry serve`). Version 1 carried one network interface's facts at the top of `net`; 2
//! carries a list, `net.ifaces`; 3 adds `room` to PageServerReady; 4 splits Need into
//! frames (`last` on the final one), so a rootfs of many files no longer overflows one, and
//! gives manifest entries their `mtime`, `xattrs`, `link_of` and `blocks`; a file's holes
//! travel as Hole frames, and content hashes are [`crate::migrate::rootfs`]'s block hashes;
//! 5 adds `file_locks` and `locks` to Prepare (an older destination would ignore them and
//! restore without the container's locks).
//!
//! ```text
//! S→D Hello{version, role: control}        D→S Challenge{version, nonce_d}
//! S→D Proof{nonce_s, mac_s}                D→S Welcome{mac_d, session}   (or Error, close)
//! S→D Prepare{container, config, versions, features, mode, tcp_*, file_locks, locks, net}
//!                                          with net: D creates the namespace, locks it,
//!                                          configures its interfaces, probes the addresses
//!                                          D→S Prepared{criu_version, features} | Error
//! S→D File{cpuinfo} Chunk* FileEnd         (CPUINFO_CHECK on D)  D→S Ok | Error
//! S→D Manifest{entries, last}*             D→S Need{paths, last}*
//! S→D (File{rootfs, path} (Chunk | Hole{len})* FileEnd)* SyncDone
//!   second connection, S→D Hello{role: data, session} … Welcome: D hands it to its page
//!   server                                 D→S PageServerReady{room}
//!   (room: the bytes D's work dir can still take, less other migrations' claims; S's rounds
//!   policy keeps room there for the final dump)
//! pre-copy / hybrid only, once per pre-dump round k = 1, 2, …: S PRE_DUMPs while the
//!   container runs, pages through the data connection into D's page server (images dir
//!   pre-k, parent pre-(k-1)); then
//! S→D RoundDone{round: k, next_final}      D waits for its page server to exit, starts the
//!                                          next one (pre-(k+1), or the final dir with parent
//!                                          pre-k; none for a lazy final dump)
//!                                          hybrid: D→S (File{image: pagemap-*/pages-*}
//!                                          Chunk* FileEnd)* — the round's page maps, the
//!                                          pages images as empty names
//!                                          D→S PageServerReady{room}
//! S freezes and dumps; pages go through the data connection; at post-dump S holds:
//! S→D Manifest*  (final rootfs delta)     D→S Need*
//! S→D files, SyncDone{deleted}, (File{image} Chunk* FileEnd)*, Restore{meta}
//!                                          D restores, holds at post-restore
//!                                          D→S Restored{pid} | Error
//! S→D Commit                               D resumes, hands to runc  D→S Committed{pid} | Error
//! S releases its hold: the source tasks end.
//! post-copy / hybrid: pages flow on through the data connection as the container faults
//!   them in; D closes the control connection once every page has arrived, or first sends
//!                                          D→S Error (its memory could not all arrive: D
//!                                          killed the container)
//! ```
//! Any error before S receives `Committed` resumes the source; D undoes everything when the
//! connection ends before `Commit`.
//!
//! With `--tls-*` on both sides, each connection starts with a TLS 1.3 handshake (certificates
//! both ways, see [`super::tls`]) and this whole sequence, from Hello on, and the raw CRIU
//! bytes of the data connection run inside TLS. A TLS destination answers a plaintext Hello
//! with Error{kind: "tls"}; a plaintext destination reports a TLS record as a bad magic.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 5;
/// Versions this build speaks (`ferry --version` prints them; keep the two in step).
pub const SUPPORTED_VERSIONS: &[u32] = &[5];
pub const MAGIC: [u8; 2] = *b"FY";
pub const HEADER_LEN: usize = 8;
/// Largest payload accepted.
pub const MAX_FRAME: u32 = 16 * 1024 * 1024;
/// File data per chunk frame.
pub const CHUNK: usize = 1024 * 1024;
/// Largest config.json a Prepare carries (the source checks before sending).
pub const MAX_CONFIG: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("bad frame magic {0:02x?}{hint}", hint = magic_hint(.0))]
    Magic([u8; 2]),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("frame of {len} bytes exceeds the cap of {cap}")]
    TooLarge { len: u32, cap: u32 },
    #[error("undecodable {kind:?} message: {why}")]
    Decode { kind: Kind, why: String },
    #[error("unexpected {got:?} while {state}")]
    Unexpected { got: Kind, state: &'static str },
    #[error("peer error ({kind}): {message}")]
    Peer { kind: String, message: String },
}

/// What a bad magic most likely is: a TLS record (handshake 0x16 or alert 0x15, version
/// 3.x) means the peer speaks TLS and this side does not.
fn magic_hint(m: &[u8; 2]) -> &'static str {
    if matches!(m, [0x15 | 0x16, 0x03]) {
        " (a TLS record: the peer uses TLS, this side has no --tls-cert/--tls-key/--tls-ca)"
    } else {
        ""
    }
}

/// Frame kinds; 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Welcome = 4,
    Prepare = 5,
    Prepared = 6,
    Manifest = 7,
    Need = 8,
    File = 9,
    Chunk = 10,
    FileEnd = 11,
    SyncDone = 12,
    PageServerReady = 13,
    Restore = 14,
    Restored = 15,
    Commit = 16,
    Committed = 17,
    Ok = 18,
    Error = 19,
    RoundDone = 20,
    Hole = 21,
}

impl Kind {
    pub fn from_u16(v: u16) -> Result<Kind, WireError> {
        use Kind::*;
        Result::Ok(match v {
            1 => Hello,
            2 => Challenge,
            3 => Proof,
            4 => Welcome,
            5 => Prepare,
            6 => Prepared,
            7 => Manifest,
            8 => Need,
            9 => File,
            10 => Chunk,
            11 => FileEnd,
            12 => SyncDone,
            13 => PageServerReady,
            14 => Restore,
            15 => Restored,
            16 => Commit,
            17 => Committed,
            18 => Kind::Ok,
            19 => Kind::Error,
            20 => RoundDone,
            21 => Hole,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Control,
    Data,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub role: Role,
    /// For a data connection: the session it belongs to.
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub version: u32,
    pub nonce: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub nonce: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub mac: String,
    pub session: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub container: String,
    /// The bundle's config.json.
    pub config: String,
    pub criu_version: String,
    pub runc_version: String,
    pub mem_track: bool,
    pub lazy_pages: bool,
    pub mode: String,
    /// Established TCP connections travel (CRIU's TCP repair); otherwise they are closed
    /// (tcp_close). Absent from older sources: false.
    #[serde(default)]
    pub tcp_established: bool,
    #[serde(default)]
    pub tcp_close: bool,
    /// The file locks the container holds are in its images, to be taken again here
    /// (CRIU's `file_locks` on the restore). Absent: false.
    #[serde(default)]
    pub file_locks: bool,
    /// With `file_locks`: the locks the container holds, each with its file's path in the
    /// container. The destination tests those on bind-mounted files (a lock on a file the
    /// hosts share is still the frozen source's when the restore would take it again, and
    /// the restore would wait for it). At most [`MAX_LOCKS`].
    #[serde(default)]
    pub locks: Vec<LockedFile>,
    /// The container's network namespace given by path: what the destination rebuilds
    /// (validated there, sizes capped: see `net::facts::NetFacts::validate`).
    #[serde(default)]
    pub net: Option<Box<crate::net::facts::NetFacts>>,
    /// The container's cgroup layout on the source, "v1" or "v2" (v2-only host): its
    /// limits and device rules can be written back only on a host of the same layout.
    /// Absent from older sources: not checked before the restore.
    #[serde(default)]
    pub cgroups: Option<String>,
    /// The CPUs and memory nodes the container is pinned to, where its limits set them: the
    /// destination checks that it can give them. Absent from older sources or when nothing
    /// is pinned: left to the restore.
    #[serde(default)]
    pub cpuset: Option<Cpuset>,
    /// The memory the container holds, which its restore allocates again: the destination
    /// checks that it has room for it. Absent from older sources: left to the restore.
    #[serde(default)]
    pub memory: Option<Box<Memory>>,
    /// The container's cgroup limits: the destination checks that the cgroups it will make
    /// can take them. Absent from older sources: left to the restore.
    #[serde(default)]
    pub limits: Option<Box<Limits>>,
    /// Bytes of deleted files the container keeps open, which its final dump copies into
    /// the images (CRIU's ghost files): the destination counts them with the room its work
    /// dir needs. Absent from older sources: 0.
    #[serde(default)]
    pub ghosts: u64,
}

/// A container's cgroup limits on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Its cgroup directories (runc's `cgroup_paths`: controller → dir), which the
    /// destination maps as it maps the container's cgroups.
    pub paths: BTreeMap<String, String>,
    /// The limit files and values its restore writes (without the v1 device rules).
    pub settings: BTreeMap<String, String>,
}

/// A container's memory on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Its memory cgroup directory (v1 `memory`, v2 the one hierarchy), which the destination
    /// maps as it maps the container's cgroups.
    pub dir: String,
    /// Bytes of anonymous and shared memory its tasks hold.
    pub bytes: u64,
}

/// Most locks a [`Prepare`] lists.
pub const MAX_LOCKS: usize = 4096;

/// A lock the container holds, and its file's path in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockedFile {
    pub path: String,
    #[serde(flatten)]
    pub lock: crate::runtime::locks::Lock,
}

/// A container's cpuset on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpuset {
    /// Its cpuset cgroup directory (v1 `cpuset`, v2 the one hierarchy), which the destination
    /// maps as it maps the container's cgroups.
    pub dir: String,
    /// `cpuset.cpus`, when its limits set it.
    pub cpus: Option<String>,
    /// `cpuset.mems`, when its limits set it.
    pub mems: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub criu_version: String,
    pub mem_track: bool,
    pub lazy_pages: bool,
    pub runc_version: String,
}

/// One rootfs entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    /// "f" file, "d" directory, "l" symlink, "p" named pipe (the node only; a destination
    /// older than this kind refuses the first manifest, before the freeze).
    pub kind: String,
    pub mode: u32,
    pub size: u64,
    /// sha256 of a file's content or a symlink's target.
    pub hash: String,
    /// Owner and group (numeric, as in the rootfs: a container has no user namespace).
    /// Absent from older sources: root.
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: [i64; 2],
    /// Bytes a file takes on disk (its blocks, at most its size): less than `size` for a
    /// sparse file, whose holes are not sent.
    pub blocks: u64,
    /// Carried extended attributes (see [`super::xattr`]): name → hex of the value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// A file's other name: the path of an earlier entry (a file, itself no link) whose
    /// inode this path shares; the rest of this entry repeats that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_of: Option<String>,
}

impl Entry {
    /// About how many bytes this entry takes in a Manifest frame (for [`batches`]).
    pub fn wire_size(&self) -> usize {
        let xattrs: usize = self.xattrs.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let link = self.link_of.as_ref().map_or(0, String::len);
        self.path.len() + self.hash.len() + xattrs + link + 160
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<Entry>,
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    pub paths: Vec<String>,
    /// The last of this round's Need frames.
    pub last: bool,
}

/// Most bytes of paths (or of manifest entries) put into one frame: far below [`MAX_FRAME`]
/// even after JSON's escaping, which at worst makes six bytes of one.
pub const BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Splits `items` into consecutive runs of at most `max` items whose `size`s add up to at
/// most [`BATCH_BYTES`] (a single larger item is a run of its own). Always at least one run,
/// empty when `items` is.
pub fn batches<T>(items: &[T], max: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        let n = size(it);
        if i > start && (i - start >= max || bytes + n > BATCH_BYTES) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    out.push(&items[start..]);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Rootfs,
    Image,
    Cpuinfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStart {
    pub target: Target,
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    /// Paths present on the destination but gone on the source (applied on the final sync).
    pub deleted: Vec<String>,
    pub final_sync: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMsg {
    /// The checkpoint metadata (ferry.json) as the source wrote it.
    pub meta: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pid {
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// "auth", "invalid", "environment", "criu", "conflict", "internal".
    pub kind: String,
    pub message: String,
}

/// Pre-copy: a pre-dump round has been written into the destination's page server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundDone {
    /// 1-based number of the round just finished.
    pub round: u32,
    /// Whether the next transfer is the final dump (else another pre-dump).
    pub next_final: bool,
}

/// The destination's page server for the next transfer is listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ready {
    /// Bytes the destination's work dir can still take (free space less what other
    /// migrations under way have still to write there), when it could tell.
    #[serde(default)]
    pub room: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Empty {}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Hello(Hello),
    Challenge(Challenge),
    Proof(Proof),
    Welcome(Welcome),
    Prepare(Box<Prepare>),
    Prepared(Prepared),
    Manifest(Manifest),
    Need(Need),
    File(FileStart),
    Chunk(Vec<u8>),
    FileEnd,
    SyncDone(SyncDone),
    PageServerReady(Ready),
    Restore(RestoreMsg),
    Restored(Pid),
    Commit,
    Committed(Pid),
    Ok,
    Error(ErrorMsg),
    RoundDone(RoundDone),
    /// Inside a file: `len` bytes of zeros, a hole in the sender's file (written as one).
    Hole(Hole),
}

/// A run of zeros in a file being sent, which the sender's filesystem holds as a hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hole {
    pub len: u64,
}

impl Msg {
    pub fn kind(&self) -> Kind {
        match self {
            Msg::Hello(_) => Kind::Hello,
            Msg::Challenge(_) => Kind::Challenge,
            Msg::Proof(_) => Kind::Proof,
            Msg::Welcome(_) => Kind::Welcome,
            Msg::Prepare(_) => Kind::Prepare,
            Msg::Prepared(_) => Kind::Prepared,
            Msg::Manifest(_) => Kind::Manifest,
            Msg::Need(_) => Kind::Need,
            Msg::File(_) => Kind::File,
            Msg::Chunk(_) => Kind::Chunk,
            Msg::FileEnd => Kind::FileEnd,
            Msg::SyncDone(_) => Kind::SyncDone,
            Msg::PageServerReady(_) => Kind::PageServerReady,
            Msg::Restore(_) => Kind::Restore,
            Msg::Restored(_) => Kind::Restored,
            Msg::Commit => Kind::Commit,
            Msg::Committed(_) => Kind::Committed,
            Msg::Ok => Kind::Ok,
            Msg::Error(_) => Kind::Error,
            Msg::RoundDone(_) => Kind::RoundDone,
            Msg::Hole(_) => Kind::Hole,
        }
    }

    /// Appends the payload to `out` (JSON, or a chunk's bytes as they are).
    fn write_payload(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        fn j<T: Serialize>(out: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
            serde_json::to_writer(out, v)
        }
        match self {
            Msg::Hello(m) => j(out, m),
            Msg::Challenge(m) => j(out, m),
            Msg::Proof(m) => j(out, m),
            Msg::Welcome(m) => j(out, m),
            Msg::Prepare(m) => j(out, m),
            Msg::Prepared(m) => j(out, m),
            Msg::Manifest(m) => j(out, m),
            Msg::Need(m) => j(out, m),
            Msg::File(m) => j(out, m),
            Msg::Chunk(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
            Msg::SyncDone(m) => j(out, m),
            Msg::Restore(m) => j(out, m),
            Msg::Restored(m) | Msg::Committed(m) => j(out, m),
            Msg::Error(m) => j(out, m),
            Msg::RoundDone(m) => j(out, m),
            Msg::Hole(m) => j(out, m),
            Msg::PageServerReady(m) => j(out, m),
            Msg::FileEnd | Msg::Commit | Msg::Ok => j(out, &Empty {}),
        }
    }

    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Msg, WireError> {
        fn j<T: for<'a> Deserialize<'a>>(kind: Kind, p: &[u8]) -> Result<T, WireError> {
            serde_json::from_slice(p).map_err(|e| WireError::Decode {
                kind,
                why: e.to_string(),
            })
        }
        Ok(match kind {
            Kind::Invalid => return Err(WireError::UnknownKind(0)),
            Kind::Hello => Msg::Hello(j(kind, payload)?),
            Kind::Challenge => Msg::Challenge(j(kind, payload)?),
            Kind::Proof => Msg::Proof(j(kind, payload)?),
            Kind::Welcome => Msg::Welcome(j(kind, payload)?),
            Kind::Prepare => Msg::Prepare(j(kind, payload)?),
            Kind::Prepared => Msg::Prepared(j(kind, payload)?),
            Kind::Manifest => Msg::Manifest(j(kind, payload)?),
            Kind::Need => Msg::Need(j(kind, payload)?),
            Kind::File => Msg::File(j(kind, payload)?),
            Kind::Chunk => Msg::Chunk(payload.to_vec()),
            Kind::FileEnd => {
                j::<Empty>(kind, payload)?;
                Msg::FileEnd
            }
            Kind::SyncDone => Msg::SyncDone(j(kind, payload)?),
            Kind::PageServerReady => Msg::PageServerReady(j(kind, payload)?),
            Kind::Restore => Msg::Restore(j(kind, payload)?),
            Kind::Restored => Msg::Restored(j(kind, payload)?),
            Kind::Commit => {
                j::<Empty>(kind, payload)?;
                Msg::Commit
            }
            Kind::Committed => Msg::Committed(j(kind, payload)?),
            Kind::Ok => {
                j::<Empty>(kind, payload)?;
                Msg::Ok
            }
            Kind::Error => Msg::Error(j(kind, payload)?),
            Kind::RoundDone => Msg::RoundDone(j(kind, payload)?),
            Kind::Hole => Msg::Hole(j(kind, payload)?),
        })
    }

    /// Writes the frame, header and payload in one write: one segment for a small frame, not
    /// two (the final phase sends ≈ 100 small frames while the container is frozen).
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        let mut frame = Vec::with_capacity(HEADER_LEN + 256);
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&(self.kind() as u16).to_be_bytes());
        frame.extend_from_slice(&[0; 4]); // the length, below
        if self.write_payload(&mut frame).is_err() {
            frame.truncate(HEADER_LEN); // as before: an unserializable message goes empty
        }
        let len = u32::try_from(frame.len() - HEADER_LEN).unwrap_or(u32::MAX);
        if len > MAX_FRAME {
            return Err(WireError::TooLarge {
                len,
                cap: MAX_FRAME,
            });
        }
        frame[4..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        w.write_all(&frame)?;
        w.flush()?;
        Ok(())
    }

    /// Reads one frame, capping its payload at `cap` (≤ [`MAX_FRAME`]).
    pub fn read_from(r: &mut impl Read, cap: u32) -> Result<Msg, WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        if let Err(e) = r.read_exact(&mut hdr) {
            return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Closed
            } else {
                WireError::Io(e)
            });
        }
        let magic = [hdr[0], hdr[1]];
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let kind = Kind::from_u16(u16::from_be_bytes([hdr[2], hdr[3]]))?;
        let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let cap = cap.min(MAX_FRAME);
        if len > cap {
            return Err(WireError::TooLarge { len, cap });
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Closed
            } else {
                WireError::Io(e)
            }
        })?;
        Msg::decode(kind, &payload)
    }
}

/// Turns a peer's Error message into a [`WireError::Peer`], passing other messages through.
pub fn check_peer(m: Msg) -> Result<Msg, WireError> {
    match m {
        Msg::Error(e) => Err(WireError::Peer {
            kind: e.kind,
            message: e.message,
        }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Msg) {
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        let back = Msg::read_from(&mut buf.as_slice(), MAX_FRAME).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Msg::Hello(Hello {
            version: 1,
            role: Role::Data,
            session: Some("s".into()),
        }));
        round_trip(Msg::Challenge(Challenge {
            version: 1,
            nonce: "ab".into(),
        }));
        round_trip(Msg::Proof(Proof {
            nonce: "cd".into(),
            mac: "ef".into(),
        }));
        round_trip(Msg::Welcome(Welcome {
            mac: "01".into(),
            session: "x".into(),
        }));
        round_trip(Msg::Manifest(Manifest {
            entries: vec![Entry {
                path: "bin/sh".into(),
                kind: "l".into(),
                mode: 0o777,
                size: 7,
                hash: "h".into(),
                uid: 999,
                gid: 998,
                mtime: [981_173_106, 5],
                blocks: 4096,
                xattrs: [("security.capability".to_string(), "0100".to_string())].into(),
                link_of: Some("bin/busybox".into()),
            }],
            last: true,
        }));
        round_trip(Msg::Need(Need {
            paths: vec!["bin/sh".into()],
            last: false,
        }));
        round_trip(Msg::File(FileStart {
            target: Target::Image,
            path: "core-1.img".into(),
            size: 3,
            mode: 0o600,
        }));
        round_trip(Msg::Chunk(vec![1, 2, 3]));
        round_trip(Msg::Hole(Hole { len: 1 << 40 }));
        round_trip(Msg::FileEnd);
        round_trip(Msg::SyncDone(SyncDone {
            deleted: vec!["a".into()],
            final_sync: true,
        }));
        round_trip(Msg::Restored(Pid { pid: 42 }));
        round_trip(Msg::Commit);
        round_trip(Msg::PageServerReady(Ready {
            room: Some(7 << 30),
        }));
        round_trip(Msg::PageServerReady(Ready::default()));
        round_trip(Msg::RoundDone(RoundDone {
            round: 2,
            next_final: true,
        }));
        round_trip(Msg::Error(ErrorMsg {
            kind: "auth".into(),
            message: "no".into(),
        }));
    }

    #[test]
    fn bad_frames_fail_before_allocation() {
        let mut big = Vec::from(MAGIC);
        big.extend_from_slice(&(Kind::Chunk as u16).to_be_bytes());
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Msg::read_from(&mut big.as_slice(), MAX_FRAME),
            Err(WireError::TooLarge { .. })
        ));

        let mut bad_magic = b"GET / HTTP/1.1\r\n".to_vec();
        assert!(matches!(
            Msg::read_from(&mut bad_magic.as_slice(), MAX_FRAME),
            Err(WireError::Magic(_))
        ));
        bad_magic.clear();

        let mut unknown = Vec::from(MAGIC);
        unknown.extend_from_slice(&999u16.to_be_bytes());
        unknown.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            Msg::read_from(&mut unknown.as_slice(), MAX_FRAME),
            Err(WireError::UnknownKind(999))
        ));

        let mut zero = Vec::from(MAGIC);
        zero.extend_from_slice(&0u16.to_be_bytes());
        zero.extend_from_slice(&0u32.to_be_bytes());
        assert!(Msg::read_from(&mut zero.as_slice(), MAX_FRAME).is_err());

        let mut garbage_json = Vec::from(MAGIC);
        garbage_json.extend_from_slice(&(Kind::Hello as u16).to_be_bytes());
        garbage_json.extend_from_slice(&3u32.to_be_bytes());
        garbage_json.extend_from_slice(b"{{{");
        assert!(matches!(
            Msg::read_from(&mut garbage_json.as_slice(), MAX_FRAME),
            Err(WireError::Decode { .. })
        ));

        let truncated = &[b'F', b'Y', 0][..];
        assert!(matches!(
            Msg::read_from(&mut &truncated[..], MAX_FRAME),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn an_oversized_frame_is_not_written() {
        let mut out = Vec::new();
        let m = Msg::Chunk(vec![0; MAX_FRAME as usize + 1]);
        assert!(matches!(
            m.write_to(&mut out),
            Err(WireError::TooLarge { cap: MAX_FRAME, .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn a_smaller_cap_applies() {
        let mut buf = Vec::new();
        Msg::Chunk(vec![0; 100]).write_to(&mut buf).unwrap();
        assert!(matches!(
            Msg::read_from(&mut buf.as_slice(), 64),
            Err(WireError::TooLarge { len: 100, cap: 64 })
        ));
    }
}

#[cfg(test)]
mod batch_tests {
    use super::{batches, BATCH_BYTES};

    #[test]
    fn batches_keep_order_and_stay_under_both_limits() {
        let none: Vec<&[u32]> = batches(&[] as &[u32], 3, |_| 1);
        assert_eq!(none, vec![&[] as &[u32]]);
        let items: Vec<u32> = (0..10).collect();
        let by_count = batches(&items, 3, |_| 1);
        assert_eq!(by_count.len(), 4);
        assert_eq!(by_count.concat(), items);
        // A third of the budget each: three fit, the fourth starts a new frame.
        let by_bytes = batches(&items, 100, |_| BATCH_BYTES / 3);
        assert_eq!(
            by_bytes.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        // An item over the budget travels alone.
        let big = batches(
            &items[..3],
            100,
            |&i| if i == 1 { BATCH_BYTES * 2 } else { 1 },
        );
        assert_eq!(big, vec![&[0][..], &[1][..], &[2][..]]);
    }
}

#[cfg(test)]
mod version_tests {
    /// `ferry --version` names the protocol versions; it must follow SUPPORTED_VERSIONS.
    #[test]
    fn cli_version_text_matches() {
        let text = include_str!("../bin/ferry.rs");
        let listed: Vec<String> = super::SUPPORTED_VERSIONS
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert!(text.contains(&format!(
            "(migration protocol versions: {})",
            listed.join(", ")
        )));
    }
}
