//! The swrk message loop against a fake CRIU on a socketpair (no root, no CRIU needed).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    recv, send, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use protobuf::Message;

use super::client::{drive, features_on, version_on};
use super::swrk::{bare_request, Swrk, MAX_DATAGRAM};
use super::{CriuError, Notification, Reply, Script};
use crate::pb::{criu_req_type, CriuFeatures, CriuNotify, CriuReq, CriuResp, CriuVersionMsg};

fn pair() -> (Swrk, OwnedFd) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    (Swrk::from_socket(a), b)
}

fn resp(kind: criu_req_type, success: bool) -> CriuResp {
    let mut r = CriuResp::new();
    r.set_type(kind);
    r.set_success(success);
    r
}

fn notify(script: &str, pid: Option<i32>) -> CriuResp {
    let mut r = resp(criu_req_type::NOTIFY, true);
    let mut n = CriuNotify::new();
    n.set_script(script.into());
    if let Some(p) = pid {
        n.set_pid(p);
    }
    r.notify = protobuf::MessageField::some(n);
    r
}

fn peer_send(fd: &OwnedFd, r: &CriuResp) {
    send(
        fd.as_raw_fd(),
        &r.write_to_bytes().unwrap(),
        MsgFlags::empty(),
    )
    .unwrap();
}

fn peer_recv(fd: &OwnedFd) -> CriuReq {
    let mut buf = vec![0u8; 4096];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    CriuReq::parse_from_bytes(&buf[..n]).unwrap()
}

const T: Duration = Duration::from_secs(5);

#[test]
fn notifications_are_answered_then_the_final_response_returns() {
    let (mut s, peer) = pair();
    let h = thread::spawn(move || {
        for (script, pid) in [
            ("pre-dump", None),
            ("network-lock", None),
            ("post-dump", None),
        ] {
            peer_send(&peer, &notify(script, pid));
            let ans = peer_recv(&peer);
            assert_eq!(ans.type_(), criu_req_type::NOTIFY);
            assert!(ans.notify_success());
        }
        peer_send(&peer, &resp(criu_req_type::DUMP, true));
    });
    let mut seen = Vec::new();
    let mut cb = |n: Notification| {
        seen.push(n.script);
        Reply::Success
    };
    let r = drive(&mut s, criu_req_type::DUMP, "dump", &mut cb, T, None).unwrap();
    assert!(r.resp.success());
    assert_eq!(
        seen,
        vec![Script::PreDump, Script::NetworkLock, Script::PostDump]
    );
    h.join().unwrap();
}

#[test]
fn a_failed_notification_fails_the_operation_with_our_reason() {
    let (mut s, peer) = pair();
    let h = thread::spawn(move || {
        peer_send(&peer, &notify("post-restore", Some(77)));
        let ans = peer_recv(&peer);
        assert!(!ans.notify_success());
        peer_send(&peer, &resp(criu_req_type::RESTORE, false));
    });
    let mut cb = |n: Notification| {
        assert_eq!(n.pid, Some(77));
        Reply::Failure("state write failed".into())
    };
    let e = drive(&mut s, criu_req_type::RESTORE, "restore", &mut cb, T, None).unwrap_err();
    assert!(
        matches!(e, CriuError::Notify { ref reason, .. } if reason == "state write failed"),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn hold_keeps_criu_waiting_until_released() {
    let (mut s, peer) = pair();
    let (release_tx, release_rx) = mpsc::channel::<bool>();
    let (answered_tx, answered_rx) = mpsc::channel::<bool>();
    let h = thread::spawn(move || {
        peer_send(&peer, &notify("post-dump", None));
        let ans = peer_recv(&peer);
        answered_tx.send(ans.notify_success()).unwrap();
        peer_send(&peer, &resp(criu_req_type::DUMP, true));
    });
    let driver = thread::spawn(move || {
        let mut hold = Some(release_rx);
        let mut cb = move |_n: Notification| {
            let rx = hold.take().unwrap();
            Reply::Hold(Box::new(move || {
                if rx.recv().unwrap() {
                    Ok(())
                } else {
                    Err("aborted".into())
                }
            }))
        };
        drive(&mut s, criu_req_type::DUMP, "dump", &mut cb, T, None).map(|_| ())
    });
    // While held, CRIU has no answer.
    assert!(answered_rx
        .recv_timeout(Duration::from_millis(300))
        .is_err());
    release_tx.send(true).unwrap();
    assert!(answered_rx.recv_timeout(T).unwrap());
    driver.join().unwrap().unwrap();
    h.join().unwrap();
}

#[test]
fn orphan_pts_master_delivers_the_descriptor() {
    let (mut s, peer) = pair();
    let h = thread::spawn(move || {
        let f = std::fs::File::open("/dev/null").unwrap();
        let buf = notify("orphan-pts-master", None).write_to_bytes().unwrap();
        let fds = [f.as_raw_fd()];
        sendmsg::<()>(
            peer.as_raw_fd(),
            &[IoSlice::new(&buf)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(peer_recv(&peer).notify_success());
        peer_send(&peer, &resp(criu_req_type::RESTORE, true));
    });
    let mut got_fd = false;
    let mut cb = |n: Notification| {
        assert_eq!(n.script, Script::OrphanPtsMaster);
        got_fd = n.fd.is_some();
        Reply::Success
    };
    drive(&mut s, criu_req_type::RESTORE, "restore", &mut cb, T, None).unwrap();
    assert!(got_fd);
    h.join().unwrap();
}

#[test]
fn failure_reports_errno_and_ignores_rlimit_noise() {
    let (mut s, peer) = pair();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dump.log");
    std::fs::write(
        &log,
        "Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self\n\
         Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1 path=/tmp/out\n",
    )
    .unwrap();
    let mut r = resp(criu_req_type::DUMP, false);
    r.set_cr_errno(2);
    r.set_cr_errmsg("rlimit: Can't setup RLIMIT_NOFILE for self".into());
    peer_send(&peer, &r);
    let e = drive(
        &mut s,
        criu_req_type::DUMP,
        "dump",
        &mut super::notify::AcceptAll,
        T,
        Some(&log),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("errno 2") && text.contains("Can't lookup mount"),
        "{text}"
    );
    assert!(!text.contains("RLIMIT"), "{text}");
}

#[test]
fn garbage_oversized_and_silent_peers_are_errors() {
    let (mut s, peer) = pair();
    send(peer.as_raw_fd(), b"\xff\xff\xff garbage", MsgFlags::empty()).unwrap();
    assert!(matches!(
        s.recv("dump", Some(T)),
        Err(CriuError::Protocol { .. })
    ));

    send(
        peer.as_raw_fd(),
        &vec![0u8; MAX_DATAGRAM + 10],
        MsgFlags::empty(),
    )
    .unwrap();
    assert!(matches!(
        s.recv("dump", Some(T)),
        Err(CriuError::Protocol { .. })
    ));

    // a valid message of the wrong type
    peer_send(&peer, &resp(criu_req_type::RESTORE, true));
    let e = drive(
        &mut s,
        criu_req_type::DUMP,
        "dump",
        &mut super::notify::AcceptAll,
        T,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, CriuError::Protocol { .. }), "{e}");

    let e = s
        .recv("dump", Some(Duration::from_millis(100)))
        .unwrap_err();
    assert!(matches!(e, CriuError::Timeout { .. }), "{e}");

    drop(peer);
    let (mut s2, peer2) = pair();
    drop(peer2);
    assert!(matches!(
        s2.recv("dump", Some(T)),
        Err(CriuError::Closed { .. })
    ));
}

#[test]
fn version_and_features_are_decoded() {
    let (mut s, peer) = pair();
    let h = thread::spawn(move || {
        let req = peer_recv(&peer);
        assert_eq!(req.type_(), criu_req_type::VERSION);
        let mut r = resp(criu_req_type::VERSION, true);
        let mut v = CriuVersionMsg::new();
        v.set_major_number(4);
        v.set_minor_number(2);
        v.set_sublevel(1);
        r.version = protobuf::MessageField::some(v);
        peer_send(&peer, &r);
        let req = peer_recv(&peer);
        assert_eq!(req.type_(), criu_req_type::FEATURE_CHECK);
        assert!(req.features.mem_track());
        // CRIU answers success=false when a feature is missing, and still lists each one.
        let mut r = resp(criu_req_type::FEATURE_CHECK, false);
        let mut f = CriuFeatures::new();
        f.set_mem_track(false);
        f.set_lazy_pages(true);
        r.features = protobuf::MessageField::some(f);
        peer_send(&peer, &r);
    });
    let v = version_on(&mut s, T, true).unwrap();
    assert_eq!(v.to_string(), "4.2.1");
    let f = features_on(&mut s, T, true).unwrap();
    assert!(!f.mem_track && f.lazy_pages && !f.pidfd_store);
    h.join().unwrap();
    let _ = bare_request(criu_req_type::EMPTY);
}

fn dir_request() -> super::client::Request {
    super::client::Request {
        opts: crate::pb::CriuOpts::new(),
        images_dir: std::fs::File::open("/").unwrap().into(),
        work_dir: None,
        log_path: None,
    }
}

#[test]
fn pre_dump_rounds_then_final_dump_on_one_socket() {
    let (s, peer) = pair();
    let h = thread::spawn(move || {
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let req = peer_recv(&peer);
            kinds.push(req.type_());
            let parent = req.opts.parent_img().to_string();
            if req.type_() == criu_req_type::DUMP {
                peer_send(&peer, &notify("post-dump", None));
                assert!(peer_recv(&peer).notify_success());
                peer_send(&peer, &resp(criu_req_type::DUMP, true));
            } else {
                peer_send(&peer, &resp(criu_req_type::PRE_DUMP, true));
            }
            kinds.push(if parent.is_empty() {
                criu_req_type::EMPTY
            } else {
                criu_req_type::PRE_DUMP
            });
        }
        kinds
    });
    let mut session = super::client::PreDumpSession::on(s, T);
    let mut accept = super::notify::AcceptAll;
    let mut r1 = dir_request();
    r1.opts.set_track_mem(true);
    session.pre_dump(r1, &mut accept).unwrap();
    let mut r2 = dir_request();
    r2.opts.set_parent_img("../1".into());
    session.pre_dump(r2, &mut accept).unwrap();
    assert_eq!(session.rounds(), 2);
    let mut r3 = dir_request();
    r3.opts.set_parent_img("../2".into());
    session.dump(r3, &mut accept).unwrap();
    let kinds = h.join().unwrap();
    assert_eq!(
        kinds,
        vec![
            criu_req_type::PRE_DUMP,
            criu_req_type::EMPTY,
            criu_req_type::PRE_DUMP,
            criu_req_type::PRE_DUMP,
            criu_req_type::DUMP,
            criu_req_type::PRE_DUMP
        ]
    );
}
