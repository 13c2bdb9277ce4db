use super::*;
use serde_json::json;

fn parse(v: Value) -> Result<Bundle> {
    Bundle::parse(v.to_string().as_bytes(), Path::new("/nonexistent"))
}

fn err(v: Value) -> String {
    parse(v).expect_err("should be refused").to_string()
}

fn iris() -> Value {
    json!({"name": "Iris", "runtime": "python", "entrypoint": "model.py:IrisModel",
           "requirements": ["scikit-learn==1.5.2"], "replicas": 1, "workers": 2})
}

#[test]
fn the_spec_example_and_every_key() {
    let b = parse(iris()).unwrap();
    assert_eq!(b.name, "Iris");
    assert_eq!(b.runtime, Runtime::Python);
    assert_eq!(
        b.entrypoint,
        Some(Entrypoint {
            file: "model.py".into(),
            class: Some("IrisModel".into())
        })
    );
    assert_eq!((b.replicas, b.workers), (1, 2));
    let mut full = iris();
    let o = full.as_object_mut().unwrap();
    o.insert("node_selector".into(), json!({"gpu": "no"}));
    o.insert("limits".into(), json!({"memory": "512M", "cpu": 1.5}));
    o.insert("example".into(), json!({"data": [[5.1, 3.5, 1.4, 0.2]]}));
    o.insert("python".into(), json!(">=3.9,<3.14"));
    let b = parse(full).unwrap();
    assert_eq!(b.limits.memory, Some(512 << 20));
    assert_eq!(b.limits.cpu, Some(1.5));
    assert_eq!(b.example, Some(json!([[5.1, 3.5, 1.4, 0.2]])));
    assert!(b.python.unwrap().matches([3, 11, 7]));
    let onnx = parse(json!({"name": "m", "runtime": "onnx", "model": "model.onnx"})).unwrap();
    assert_eq!((onnx.replicas, onnx.workers), (1, 1));
    let r = parse(json!({"name": "m", "runtime": "r", "entrypoint": "model.R"})).unwrap();
    assert_eq!(r.entrypoint.unwrap().class, None);
}

#[test]
fn refusals_name_the_key_and_quote_little() {
    let long = "x".repeat(10_000);
    let with = |k: &str, v: Value| {
        let mut b = iris();
        b.as_object_mut().unwrap().insert(k.into(), v);
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!([1]), "must be a JSON object"),
        (with(&long, json!(1)), "unknown key"),
        (with("replica", json!(1)), "unknown key \"replica\""),
        (with("name", json!(long.clone())), "name"),
        (with("name", json!("bad name")), "name \"bad name\""),
        (with("name", json!(1)), "name must be a string"),
        (
            with("runtime", json!("julia")),
            "runtime \"julia\" is not one of",
        ),
        (with("entrypoint", json!("model.py")), "FILE.py:CLASS"),
        (
            with("entrypoint", json!("../model.py:M")),
            "relative path inside",
        ),
        (
            with("entrypoint", json!("/etc/model.py:M")),
            "relative path inside",
        ),
        (
            with("entrypoint", json!("model.py:1x")),
            "not a Python identifier",
        ),
        (
            with("requirements", json!("numpy")),
            "requirements must be a list",
        ),
        (
            with("requirements", json!(["--index-url=http://x"])),
            "pip option",
        ),
        (
            with("requirements", json!([long.clone()])),
            "requirements[0]",
        ),
        (
            with("replicas", json!(0)),
            "replicas must be a whole number from 1 to 64",
        ),
        (with("workers", json!(1000)), "workers must be"),
        (with("workers", json!("2")), "workers must be"),
        (
            with("node_selector", json!({"k": 1})),
            "node_selector label \"k\"",
        ),
        (with("limits", json!({"memory": "lots"})), "limits.memory"),
        (with("limits", json!({"cpu": 0})), "limits.cpu"),
        (
            with("limits", json!({"disk": 1})),
            "unknown key limits.\"disk\"",
        ),
        (with("example", json!([1, 2])), "example must be"),
        (
            with("python", json!("3.x")),
            "python \"3.x\" must be a version constraint",
        ),
        (with("python", json!(long.clone())), "python"),
        (with("compat", json!("bento")), "compat"),
        (
            with("model", json!("m.onnx")),
            "model is used by the onnx runtime only",
        ),
        (json!({"runtime": "python"}), "name is missing"),
        (json!({"name": "m"}), "runtime is missing"),
        (
            json!({"name": "m", "runtime": "python"}),
            "entrypoint is missing",
        ),
        (json!({"name": "m", "runtime": "onnx"}), "model is missing"),
        (
            json!({"name": "m", "runtime": "r", "entrypoint": "model.py"}),
            "must be an R file",
        ),
        (
            json!({"name": "m", "runtime": "r", "entrypoint": "m.R", "python": "3"}),
            "python is a constraint",
        ),
    ];
    for (v, want) in cases {
        let e = err(v.clone());
        assert!(e.contains(want), "{e:?} should contain {want:?}");
        assert!(e.starts_with("bundle.json: "), "{e}");
        assert!(e.len() < 300, "too long: {e}");
    }
    assert!(err(json!(null)).contains("object"));
    let e = Bundle::parse(b"{\"name\": ", Path::new("/x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn python_constraints() {
    let yes = |c: &str, v: [u32; 3]| PythonConstraint::parse(c).unwrap().matches(v);
    assert!(yes("3.11", [3, 11, 7]));
    assert!(!yes("3.11", [3, 12, 0]));
    assert!(yes("==3.11.*", [3, 11, 0]));
    assert!(yes("==3.11.7", [3, 11, 7]));
    assert!(!yes("==3.11", [3, 11, 7]));
    assert!(yes(">=3.9, <3.13", [3, 12, 9]));
    assert!(!yes(">=3.9,<3.13", [3, 13, 0]));
    assert!(!yes(">=3.9,<3.13", [3, 8, 19]));
    assert!(yes("~=3.10", [3, 12, 1]));
    assert!(!yes("~=3.10", [4, 0, 0]));
    assert!(yes("~=3.10.2", [3, 10, 9]));
    assert!(!yes("~=3.10.2", [3, 11, 0]));
    assert!(yes("!=3.12.*", [3, 11, 0]));
    assert!(!yes("!=3.12.*", [3, 12, 4]));
    assert!(yes(">3", [3, 0, 1]));
    assert!(yes("<=3.11", [3, 11, 0]));
    for bad in [
        "",
        "3.x",
        "~=3",
        ">=3.*",
        "3.11.2.1",
        "py3",
        ">= ",
        &"3".repeat(200),
    ] {
        assert!(PythonConstraint::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn files_are_checked_on_load() {
    let dir = std::env::temp_dir().join(format!("muster-bundle-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("bundle.json", &iris().to_string());
    let e = Bundle::load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("entrypoint file \"model.py\" is not in the bundle"),
        "{e}"
    );
    write("model.py", "import pickle\n\nclass Other:\n    pass\n");
    let e = Bundle::load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("entrypoint class \"IrisModel\" is not defined"),
        "{e}"
    );
    write("model.py", "import pickle\n\nclass IrisModel(object):\n    def execute(self, data):\n        return data\n");
    assert_eq!(Bundle::load(&dir).unwrap().name, "Iris");
    write("model.py", "from elsewhere import IrisModel\n");
    Bundle::load(&dir).unwrap();
    write("model.py", "IrisModel = make()\n");
    Bundle::load(&dir).unwrap();
    write(
        "model.py",
        "IrisModelX = make()\nclass IrisModels: pass\n    class IrisModel: pass\n",
    );
    assert!(Bundle::load(&dir).is_err());
    std::fs::remove_file(dir.join("model.py")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("model.py")).unwrap();
    let e = Bundle::load(&dir).unwrap_err().to_string();
    assert!(e.contains("leads out of the bundle"), "{e}");
    std::fs::remove_file(dir.join("bundle.json")).unwrap();
    let e = Bundle::load(&dir).unwrap_err().to_string();
    assert!(e.contains("no bundle.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
