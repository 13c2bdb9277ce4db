use super::*;
use flate2::write::GzEncoder;

/// One tar entry written with its raw name, so tests can make what `tar::Builder` refuses.
struct E<'a> {
    name: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: &'a str,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        name,
        kind: tar::EntryType::Regular,
        data,
        link: "",
    }
}

fn link<'a>(name: &'a str, kind: tar::EntryType, target: &'a str) -> E<'a> {
    E {
        name,
        kind,
        data: b"",
        link: target,
    }
}

fn targz(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        old.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        old.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("muster-archive-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Unpacks into a fresh dir; on refusal checks the parent was left as it was (empty).
fn try_unpack(tag: &str, bytes: &[u8], limits: &Limits) -> Result<Unpacked> {
    let parent = scratch(tag);
    let r = unpack(bytes, &parent.join("bundle"), limits);
    if r.is_err() {
        let left: Vec<_> = fs::read_dir(&parent)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    fs::remove_dir_all(&parent).unwrap();
    r
}

#[test]
fn a_good_archive_unpacks_with_links_inside() {
    let data = targz(&[
        E {
            name: "Iris/",
            kind: tar::EntryType::Directory,
            data: b"",
            link: "",
        },
        file("Iris/bundle.json", b"{}"),
        file("Iris/lib/helper.py", b"x = 1\n"),
        link("Iris/helper.py", tar::EntryType::Symlink, "lib/helper.py"),
        link(
            "Iris/lib/again.py",
            tar::EntryType::Link,
            "Iris/lib/helper.py",
        ),
        link("Iris/lib/up", tar::EntryType::Symlink, ".."),
    ]);
    let parent = scratch("good");
    let u = unpack(&data[..], &parent.join("b"), &Limits::default()).unwrap();
    assert_eq!(u.root, parent.join("b/Iris"));
    assert_eq!(u.entries, 6);
    assert_eq!(
        fs::read_to_string(u.root.join("helper.py")).unwrap(),
        "x = 1\n"
    );
    assert_eq!(
        fs::read_to_string(u.root.join("lib/again.py")).unwrap(),
        "x = 1\n"
    );
    let names: Vec<_> = fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("b")],
        "no temp dir left"
    );
    fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn hostile_archives_are_refused_and_leave_nothing() {
    use tar::EntryType::*;
    let d = Limits::default();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", targz(&[file("a/../../evil", b"x")]), "climbs out"),
        (
            "absolute",
            targz(&[file("/tmp/evil", b"x")]),
            "absolute path",
        ),
        (
            "symlink-abs",
            targz(&[link("l", Symlink, "/etc")]),
            "symlink pointing out",
        ),
        (
            "symlink-up",
            targz(&[link("d/l", Symlink, "../../x")]),
            "symlink pointing out",
        ),
        (
            "through-link",
            targz(&[link("l", Symlink, "."), file("l/f", b"x")]),
            "written through a link",
        ),
        (
            "chain",
            // Each link alone stays inside by name; resolved, d/t leads out.
            targz(&[
                link("d/s", Symlink, ".."),
                link("t", Symlink, "d/s/.."),
                link("d/t", Symlink, "s/.."),
            ]),
            "leading out",
        ),
        (
            "hardlink-out",
            targz(&[link("h", Link, "../etc/passwd")]),
            "hard link",
        ),
        (
            "hardlink-abs",
            targz(&[link("h", Link, "/etc/passwd")]),
            "hard link",
        ),
        (
            "hardlink-missing",
            targz(&[link("h", Link, "nothing")]),
            "hard link",
        ),
        (
            "hardlink-through-link",
            targz(&[
                link("d/s", Symlink, ".."),
                link("t", Symlink, "d/s/.."),
                link("h", Link, "t/passwd"),
            ]),
            "hard link through a symlink",
        ),
        (
            "device",
            targz(&[link("dev", Char, "")]),
            "device or a fifo",
        ),
        ("fifo", targz(&[link("f", Fifo, "")]), "device or a fifo"),
        (
            "twice",
            targz(&[file("a", b"1"), file("a", b"2")]),
            "appears twice",
        ),
        (
            "garbage",
            b"not a gzip stream at all".to_vec(),
            "cannot be read",
        ),
    ];
    for (tag, bytes, want) in cases {
        let e = try_unpack(tag, &bytes, &d).expect_err(tag).to_string();
        assert!(e.contains(want), "{tag}: {e:?} should say {want:?}");
        assert!(e.len() < 300, "{tag}: {e}");
    }
}

#[test]
fn bombs_are_refused() {
    let zeros = vec![0u8; 4 << 20];
    let small = Limits {
        file_bytes: 1 << 20,
        ..Limits::default()
    };
    let e = try_unpack("file-cap", &targz(&[file("big", &zeros)]), &small).unwrap_err();
    assert!(e.to_string().contains("allowed for a file"), "{e}");
    let total = Limits {
        total_bytes: 6 << 20,
        ..Limits::default()
    };
    let two = targz(&[file("a", &zeros), file("b", &zeros)]);
    let e = try_unpack("total-cap", &two, &total).unwrap_err();
    assert!(e.to_string().contains("more than the 6291456 bytes"), "{e}");
    let ratio = Limits {
        ratio_floor: 1 << 20,
        ..Limits::default()
    };
    let e = try_unpack("ratio", &targz(&[file("z", &zeros)]), &ratio).unwrap_err();
    assert!(e.to_string().contains("archive bomb"), "{e}");
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let many: Vec<E> = names.iter().map(|n| file(n, b"")).collect();
    let few = Limits {
        entries: 20,
        ..Limits::default()
    };
    let e = try_unpack("entries", &targz(&many), &few).unwrap_err();
    assert!(e.to_string().contains("more than 20 entries"), "{e}");
    // Within the default limits, 4 MiB of zeros is fine (under the ratio floor).
    try_unpack("fine", &targz(&[file("z", &zeros)]), &Limits::default()).unwrap();
}
