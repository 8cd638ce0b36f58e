//! ferry's CRIU RPC client against the real CRIU (root): VERSION, FEATURE_CHECK, CHECK,
//! CPUINFO_DUMP/CHECK, and a dump whose pages go to a PAGE_SERVER_CHLD over a connected TCP
//! socket handed to both criu processes (`ps.fd`), the transport migration uses.
//! PRE_DUMP needs dirty-memory tracking, which this host's kernel lacks: it runs in the VM rig.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use common::*;
use ferry::criu::client::Request;
use ferry::criu::swrk::ChildFds;
use ferry::criu::{Criu, Notification, Reply, Script};
use ferry::oci::bundle::BundleConfig;
use ferry::oci::options::{dump_options, gather_dump_facts, DumpSettings, RealHost};
use ferry::oci::state::RuncRoot;
use ferry::pb::{CriuOpts, CriuPageServerInfo};

fn dir_fd(p: &Path) -> OwnedFd {
    std::fs::File::open(p).unwrap().into()
}

fn request(opts: CriuOpts, dir: &Path, log: &str) -> Request {
    Request {
        opts,
        images_dir: dir_fd(dir),
        work_dir: Some(dir_fd(dir)),
        log_path: Some(dir.join(log)),
    }
}

#[test]
fn version_features_check_and_cpuinfo() {
    if !require_root_and_criu() {
        return;
    }
    let criu = Criu::from_env();
    let v = criu.require_version().unwrap();
    assert!(v.at_least(4, 0), "{v}");
    let f = criu.features().unwrap();
    assert!(f.lazy_pages, "userfaultfd is available on the CI host");
    criu.check().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut o = CriuOpts::new();
    o.set_log_file("cpuinfo.log".into());
    criu.cpuinfo_dump(request(o.clone(), dir.path(), "cpuinfo.log"))
        .unwrap();
    assert!(dir.path().join("cpuinfo.img").is_file());
    criu.cpuinfo_check(request(o, dir.path(), "cpuinfo.log"))
        .unwrap();
}

#[test]
fn dump_streams_pages_to_a_page_server_over_a_handed_socket() {
    if !require_root_and_criu() {
        return;
    }
    let rc = Runc::new("pagesrv");
    let id = rc.id("");
    let (counter, _bundle) = start_file_counter(&rc, &id);
    wait_counter_lines(&counter, 10, Duration::from_secs(20));

    // One TCP connection on loopback: the accepted end goes to the page server, the
    // connecting end to the dumping criu. Nothing listens for CRIU itself.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();

    let criu = Criu::from_env();
    let dst = rc.mkdir("dst");
    let mut fds = ChildFds::default();
    let child_fd = fds.inherit(OwnedFd::from(server));
    let mut ps = CriuPageServerInfo::new();
    ps.set_fd(child_fd);
    let mut o = CriuOpts::new();
    o.set_log_file("page-server.log".into());
    o.ps = protobuf::MessageField::some(ps);
    let (server_info, ps_session) = criu
        .page_server(request(o, &dst, "page-server.log"), fds, true)
        .unwrap();
    assert!(server_info.pid > 0);

    let root = RuncRoot::open(&rc.root).unwrap();
    let c = root.load(&id).unwrap();
    let cfg = BundleConfig::load(&c.bundle).unwrap();
    let facts = gather_dump_facts(&RealHost, &cfg, &c).unwrap();
    let mut opts = dump_options(
        &cfg,
        &facts,
        &DumpSettings {
            leave_running: true,
            ..Default::default()
        },
    );
    let mut fds = ChildFds::default();
    let child_fd = fds.inherit(OwnedFd::from(client));
    let mut ps = CriuPageServerInfo::new();
    ps.set_fd(child_fd);
    opts.ps = protobuf::MessageField::some(ps);
    let src = rc.mkdir("src");
    let mut scripts = Vec::new();
    let mut notify = |n: Notification| {
        scripts.push(n.script);
        Reply::Success
    };
    criu.dump(request(opts, &src, "dump.log"), fds, &mut notify)
        .unwrap();
    ps_session.finish(Duration::from_secs(10));

    assert!(scripts.contains(&Script::PostDump), "{scripts:?}");
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let (src_files, dst_files) = (names(&src), names(&dst));
    assert!(
        dst_files.iter().any(|f| f.starts_with("pages-")),
        "no pages at the page server: {dst_files:?}"
    );
    assert!(
        !src_files.iter().any(|f| f.starts_with("pages-")),
        "pages staged on the source: {src_files:?}"
    );
    assert!(
        src_files.iter().any(|f| f == "inventory.img"),
        "{src_files:?}"
    );

    // Left running, still counting.
    assert_eq!(rc.status(&id).as_deref(), Some("running"));
    let n = read_counter_lines(&counter).len();
    wait_counter_lines(&counter, n + 5, Duration::from_secs(20));
    rc.teardown();
    leak_check(&rc.ids());
}
