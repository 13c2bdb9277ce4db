use super::*;

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/yhat")
            .join(name),
    )
    .unwrap()
}

fn content_type() -> String {
    let req: Value = serde_json::from_slice(&capture("deploy_request.json")).unwrap();
    req["headers"]["Content-Type"].as_str().unwrap().to_string()
}

#[test]
fn the_captured_deploy_decodes_to_the_captured_bundle() {
    let body = capture("deploy_body.bin");
    let part = model_part(&content_type(), &body).unwrap();
    assert_eq!(&part[..2], b"\x78\x9c", "a zlib stream");
    let json = decompress(part, MAX_BUNDLE).unwrap();
    assert_eq!(json, capture("deploy_body.json"), "byte for byte");
    let y = YhatBundle::parse(&json).unwrap();
    assert_eq!(
        (y.modelname.as_str(), y.class_name.as_str()),
        ("Greeter", "Greeter")
    );
    assert_eq!(y.username, "alice");
    assert_eq!(y.reqs, vec!["six"]);
    assert_eq!(y.future, "from __future__ import division");
    assert_eq!(y.objects.len(), 2);
    // The .yhat files are the same format.
    let hello =
        YhatBundle::parse(&decompress(&capture("HelloWorld.yhat"), MAX_BUNDLE).unwrap()).unwrap();
    let expected: Value = serde_json::from_slice(&capture("HelloWorld.bundle.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&hello.raw).unwrap(),
        expected
    );
    let greeter = decompress(&capture("Greeter.yhat"), MAX_BUNDLE).unwrap();
    assert_eq!(YhatBundle::parse(&greeter).unwrap().class_name, "Greeter");
}

#[test]
fn requirements_leave_out_the_client_and_add_what_the_code_needs() {
    let parse = |f: &str| YhatBundle::parse(&capture(f)).unwrap();
    // "six" is the client's own: muster's yhat set provides it.
    assert!(parse("deploy_body.json").requirements().is_empty());
    // Python 2's auto-detected pins of the client's packages are dropped.
    assert!(parse("deploy_body_py27.json").requirements().is_empty());
    // pandas for the code; numpy for the WEIGHTS array a previous deploy of that client session
    // left among the objects (PROTOCOL.md §9).
    assert_eq!(
        parse("deploy_body_dfgreeter.json").requirements(),
        vec!["pandas", "numpy"]
    );
    // A numpy array among the pickled objects.
    assert_eq!(
        parse("deploy_body_numpy.json").requirements(),
        vec!["numpy"]
    );
    assert_eq!(package_name("Scikit_Learn>=1.2"), "scikit-learn");
    assert_eq!(base64_decode("gAJ9cQAu").unwrap(), b"\x80\x02}q\x00.");
}

#[test]
fn the_bundle_dir_is_a_muster_bundle() {
    let dir = std::env::temp_dir().join(format!("muster-yhat-write-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut y = YhatBundle::parse(&capture("deploy_body_dfgreeter.json")).unwrap();
    y.modules.push(Module {
        parent_dir: "pkg/sub".into(),
        name: "helper.py".into(),
        source: "X = 1\n".into(),
    });
    let b = y.write(&dir).unwrap();
    assert_eq!(b.name, "DfGreeter");
    assert_eq!(b.compat, Some(crate::bundle::Compat::Yhat));
    assert_eq!(b.entrypoint.unwrap().class.as_deref(), Some("DfGreeter"));
    assert_eq!(b.requirements, vec!["pandas", "numpy"]);
    let model = std::fs::read_to_string(dir.join("model.py")).unwrap();
    assert!(
        model.starts_with("from __future__ import division\n"),
        "{model}"
    );
    assert!(model.contains("class DfGreeter(YhatModel):"));
    assert_eq!(
        std::fs::read_to_string(dir.join("src/pkg/sub/helper.py")).unwrap(),
        "X = 1\n"
    );
    assert_eq!(
        std::fs::read(dir.join("yhat.json")).unwrap(),
        capture("deploy_body_dfgreeter.json")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_uploads_are_refused_clearly() {
    let body = capture("deploy_body.bin");
    let ct = content_type();
    let e = |r: Result<&[u8]>| r.unwrap_err().to_string();
    assert!(e(model_part("application/json", &body)).contains("multipart/form-data"));
    assert!(e(model_part("multipart/form-data", &body)).contains("no multipart boundary"));
    assert!(
        e(model_part("multipart/form-data; boundary=other", &body)).contains("no multipart part")
    );
    let renamed = String::from_utf8_lossy(&body)
        .replace("model_name", "other_name")
        .into_bytes();
    // The zlib bytes are not UTF-8: replace by bytes instead.
    let mut renamed_bytes = body.clone();
    let at = find(&body, b"model_name", 0).unwrap();
    renamed_bytes[at..at + 10].copy_from_slice(b"other_part");
    assert!(e(model_part(&ct, &renamed_bytes)).contains("no part named model_name"));
    drop(renamed);
    let truncated = &body[..body.len() - 60];
    assert!(e(model_part(&ct, truncated)).contains("not closed"));
    let d = |b: &[u8]| decompress(b, MAX_BUNDLE).unwrap_err().to_string();
    assert!(d(b"not zlib").contains("not a zlib stream"));
    let big = {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&vec![b' '; 1 << 20]).unwrap();
        z.finish().unwrap()
    };
    assert!(decompress(&big, 1000)
        .unwrap_err()
        .to_string()
        .contains("more than 1000 bytes"));
    let json = |v: Value| {
        YhatBundle::parse(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    };
    let good = serde_json::json!({"modelname": "M", "className": "M", "code": "class M: pass", "language": "python"});
    let with = |k: &str, v: Value| {
        let mut g = good.clone();
        g[k] = v;
        g
    };
    assert!(json(with("language", "r".into())).contains("language \"r\""));
    assert!(json(with("modelname", "a b".into())).contains("modelname \"a b\""));
    assert!(json(with("modelname", "x".repeat(5000).into())).len() < 300);
    assert!(json(with("className", "1x".into())).contains("className"));
    assert!(json(with("code", "".into())).contains("no code"));
    assert!(json(with("objects", serde_json::json!({"a": 1}))).contains("objects"));
    assert!(json(with(
        "modules",
        serde_json::json!([{"parent_dir": "../..", "name": "x.py", "source": ""}])
    ))
    .contains("below the bundle"));
    assert!(json(with(
        "modules",
        serde_json::json!([{"parent_dir": "", "name": "../x.py", "source": ""}])
    ))
    .contains("below the bundle"));
    assert!(json(with("reqs", "numpy\n--index-url http://x".into())).contains("not a requirement"));
    assert!(YhatBundle::parse(b"[1]").is_err());
}
