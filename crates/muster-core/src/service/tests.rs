use super::*;
use crate::service_plan::{plan, Action, Recorded};

fn hq(files: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    files
        .iter()
        .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
        .collect()
}

const KV_IFACE: &str =
    "description = \"a key-value store\"\n[keys]\nhost = \"string\"\nport = \"integer\"\n";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("interfaces/kv.toml", KV_IFACE),
        (
            "services/demo__kv__main/service.toml",
            "domain = \"demo\"\nname = \"kv\"\ninstance = \"main\"\nversion = \"1\"\n\
             [params]\nport = 6400\n\
             [consumes.host]\ninterface = \"node\"\n\
             [provides.kv]\ninterface = \"kv\"\ndata = { host = \"${node.address}\", port = \"${params.port}\" }\n",
        ),
        ("services/demo__kv__main/actions/install", "#!/bin/sh\necho kv\n"),
        (
            "services/demo__app__web/service.toml",
            "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n\
             [params]\ngreeting = \"hello\"\nurl = \"kv://${consumes.db.host}:${consumes.db.port}\"\n\
             [consumes.db]\ninterface = \"kv\"\n",
        ),
        ("services/demo__app__web/actions/install", "#!/bin/sh\necho app\n"),
        (
            "services/demo__app__web/demo__cron__backup/service.toml",
            "domain = \"demo\"\nname = \"cron\"\ninstance = \"backup\"\n",
        ),
    ]
}

fn nodes() -> Vec<NodeInfo> {
    vec![NodeInfo {
        name: "n1".into(),
        address: "10.0.0.1".into(),
        labels: [("zone".to_string(), "a".to_string())].into(),
    }]
}

fn graph(files: &[(&str, &str)]) -> Result<Graph, Vec<Problem>> {
    resolve(&load(&hq(files))?, &nodes())
}

fn err(files: &[(&str, &str)]) -> String {
    let p = graph(files).expect_err("should be refused");
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn with(files: &[(&str, &str)], path: &str, text: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = files
        .iter()
        .filter(|(p, _)| *p != path)
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    v.push((path.to_string(), text.to_string()));
    v
}

fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

#[test]
fn an_environment_resolves_in_dependency_order() {
    let g = graph(&env()).unwrap();
    assert_eq!(
        g.order,
        vec![
            "demo__kv__main",
            "demo__app__web",
            "demo__app__web/demo__cron__backup"
        ]
    );
    let kv = &g.services["demo__kv__main"];
    assert_eq!(kv.node.as_deref(), Some("n1"));
    // A whole-value reference keeps its type; the node's address comes from the node.
    assert_eq!(kv.provides["kv"]["data"]["port"], serde_json::json!(6400));
    assert_eq!(
        kv.provides["kv"]["data"]["host"],
        serde_json::json!("10.0.0.1")
    );
    let app = &g.services["demo__app__web"];
    assert_eq!(app.node, None);
    assert_eq!(app.deps, vec!["demo__kv__main"]);
    assert_eq!(app.params["url"], serde_json::json!("kv://10.0.0.1:6400"));
    assert_eq!(app.consumed["db"]["port"], serde_json::json!(6400));
    assert!(app.actions.contains("install"));
    let child = &g.services["demo__app__web/demo__cron__backup"];
    assert_eq!(child.parent.as_deref(), Some("demo__app__web"));
    assert_eq!(child.deps, vec!["demo__app__web"]);
}

#[test]
fn the_same_triple_under_two_parents_is_two_services() {
    let mut files = env();
    files.push((
        "services/demo__kv__main/demo__cron__backup/service.toml",
        "domain = \"demo\"\nname = \"cron\"\ninstance = \"backup\"\n",
    ));
    let g = graph(&files).unwrap();
    assert!(g.services.contains_key("demo__kv__main/demo__cron__backup"));
    assert!(g.services.contains_key("demo__app__web/demo__cron__backup"));
}

#[test]
fn bad_directories_are_named_with_file_and_line() {
    let e = err(&refs(&with(
        &env(),
        "services/demo__kv__main/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"main\"\ncolour = \"red\"\n",
    )));
    assert!(
        e.contains("services/demo__kv__main/service.toml:4:") && e.contains("colour"),
        "{e}"
    );
    let e = err(&refs(&with(
        &env(),
        "services/demo__kv__main/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"other\"\n",
    )));
    assert!(e.contains("do not match the directory name"), "{e}");
    let e = err(&[(
        "services/demo__bad name__x/service.toml",
        "domain = \"demo\"\n",
    )]);
    assert!(e.contains("name"), "{e}");
    let e = err(&[("services/just-one/service.toml", "domain = \"demo\"\n")]);
    assert!(e.contains("domain__name__instance"), "{e}");
    let e = err(&[("services/a__b__c/actions/install", "x")]);
    assert!(
        e.contains("services/a__b__c: a service directory needs a service.toml"),
        "{e}"
    );
    let e = err(&refs(&with(
        &env(),
        "services/demo__app__web/service.toml",
        "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n[params]\nx = 1\n[process]\nexec = [\"${params.nope}\"]\n",
    )));
    assert!(
        e.contains("service.toml:7:") && e.contains("${params.nope} names nothing"),
        "{e}"
    );
    let e = err(&refs(&with(
        &env(),
        "services/demo__app__web/service.toml",
        "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n[params]\ny = \"${consumes.db.nope}\"\n",
    )));
    assert!(e.contains("${consumes.db.nope} names nothing"), "{e}");
    let e = err(&[(
        "services/a__b__c/service.toml",
        "domain = \"a\"\nname = \"b\"\ninstance = \"c\"\nversion = 3\n",
    )]);
    assert!(e.contains(":4:"), "{e}");
    let e = err(&[("interfaces/x.toml", "[keys]\na = \"str\"\n")]);
    assert!(e.contains("interfaces/x.toml:2:"), "{e}");
}

#[test]
fn relations_are_checked() {
    // Missing producer.
    let files: Vec<_> = env()
        .into_iter()
        .filter(|(p, _)| !p.starts_with("services/demo__kv__main"))
        .collect();
    let e = err(&files);
    assert!(
        e.contains("demo__app__web/service.toml") && e.contains("missing producer"),
        "{e}"
    );
    // Unknown interface.
    let e = err(&refs(&with(
        &env(),
        "services/demo__app__web/service.toml",
        "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n[consumes.db]\ninterface = \"sql\"\n",
    )));
    assert!(e.contains("no interface \"sql\""), "{e}");
    // Two candidates and no choice: both named.
    let mut files = env();
    files.push((
        "services/demo__kv__spare/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"spare\"\n[provides.kv]\ninterface = \"kv\"\ndata = { host = \"h\", port = 1 }\n",
    ));
    let e = err(&files);
    assert!(
        e.contains("ambiguous") && e.contains("demo__kv__main") && e.contains("demo__kv__spare"),
        "{e}"
    );
    // instance chooses; any producer of the interface may replace another.
    let v = with(
        &files,
        "services/demo__app__web/service.toml",
        "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n[consumes.db]\ninterface = \"kv\"\ninstance = \"spare\"\n",
    );
    let g = graph(&refs(&v)).unwrap();
    assert_eq!(g.services["demo__app__web"].deps, vec!["demo__kv__spare"]);
    // max lets several in, as a list.
    let v = with(
        &files,
        "services/demo__app__web/service.toml",
        "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\n[consumes.db]\ninterface = \"kv\"\nmax = 5\n",
    );
    let g = graph(&refs(&v)).unwrap();
    assert_eq!(
        g.services["demo__app__web"].consumed["db"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Published data checked against the interface.
    let e = err(&refs(&with(
        &env(),
        "services/demo__kv__main/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"main\"\n[provides.kv]\ninterface = \"kv\"\ndata = { host = \"h\", port = \"not a number\" }\n",
    )));
    assert!(e.contains("\"port\" that is not integer"), "{e}");
    // A node chosen by label, or by name; none matching is a missing producer.
    let v = with(
        &env(),
        "services/demo__kv__main/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"main\"\n[consumes.host]\ninterface = \"node\"\nselect = { zone = \"b\" }\n",
    );
    assert!(err(&refs(&v)).contains("missing producer"));
}

#[test]
fn cycles_are_named() {
    let files = [
        ("interfaces/a.toml", "[keys]\n"),
        ("interfaces/b.toml", "[keys]\n"),
        (
            "services/x__one__1/service.toml",
            "domain = \"x\"\nname = \"one\"\ninstance = \"1\"\n[provides.a]\ninterface = \"a\"\n[consumes.b]\ninterface = \"b\"\n",
        ),
        (
            "services/x__two__1/service.toml",
            "domain = \"x\"\nname = \"two\"\ninstance = \"1\"\n[provides.b]\ninterface = \"b\"\n[consumes.a]\ninterface = \"a\"\n",
        ),
    ];
    let e = err(&files);
    assert!(
        e.contains("cycle") && e.contains("x__one__1") && e.contains("x__two__1"),
        "{e}"
    );
}

fn recorded(g: &Graph) -> BTreeMap<String, Recorded> {
    g.services
        .values()
        .map(|r| {
            (
                r.path.clone(),
                Recorded {
                    hash: r.hash.clone(),
                    parts: r.parts.clone(),
                    installed: true,
                    deps: r.deps.clone(),
                },
            )
        })
        .collect()
}

#[test]
fn plans_install_then_nothing_then_only_what_changed() {
    let g = graph(&env()).unwrap();
    let p = plan(&g, &BTreeMap::new());
    assert_eq!(p.steps.len(), 3);
    assert!(p.steps.iter().all(|s| s.action == Action::Install));
    assert_eq!(p.steps[1].after, vec!["demo__kv__main"]);
    // Recorded as applied: planning again gives nothing to do.
    let rec = recorded(&g);
    let again = plan(&graph(&env()).unwrap(), &rec);
    assert!(again.steps.is_empty(), "{again:?}");
    assert_eq!(again.unchanged.len(), 3);
    // A param of the producer changes: it and its consumer reconfigure, nothing else.
    let v = with(
        &env(),
        "services/demo__kv__main/service.toml",
        "domain = \"demo\"\nname = \"kv\"\ninstance = \"main\"\nversion = \"1\"\n\
         [params]\nport = 6401\n\
         [consumes.host]\ninterface = \"node\"\n\
         [provides.kv]\ninterface = \"kv\"\ndata = { host = \"${node.address}\", port = \"${params.port}\" }\n",
    );
    let p = plan(&graph(&refs(&v)).unwrap(), &rec);
    let got: Vec<(&str, Action)> = p
        .steps
        .iter()
        .map(|s| (s.path.as_str(), s.action))
        .collect();
    assert_eq!(
        got,
        vec![
            ("demo__kv__main", Action::Reconfigure),
            ("demo__app__web", Action::Reconfigure)
        ]
    );
    assert!(
        p.steps[0].reason.contains("params"),
        "{}",
        p.steps[0].reason
    );
    assert!(
        p.steps[1].reason.contains("producer data"),
        "{}",
        p.steps[1].reason
    );
    // An action file changes: that service alone.
    let v = with(
        &env(),
        "services/demo__app__web/actions/install",
        "#!/bin/sh\necho app2\n",
    );
    let p = plan(&graph(&refs(&v)).unwrap(), &rec);
    assert_eq!(p.steps.len(), 1);
    assert_eq!(p.steps[0].path, "demo__app__web");
    assert!(p.steps[0].reason.contains("action files"));
    // A service gone: reset, children before parents.
    let v: Vec<_> = env()
        .into_iter()
        .filter(|(p, _)| !p.starts_with("services/demo__app__web"))
        .collect();
    let p = plan(&graph(&v).unwrap(), &rec);
    let got: Vec<(&str, Action)> = p
        .steps
        .iter()
        .map(|s| (s.path.as_str(), s.action))
        .collect();
    assert_eq!(
        got,
        vec![
            ("demo__app__web/demo__cron__backup", Action::Reset),
            ("demo__app__web", Action::Reset)
        ]
    );
    assert_eq!(p.steps[1].after, vec!["demo__app__web/demo__cron__backup"]);
}

#[test]
fn the_hash_ignores_key_order() {
    let a = canonical(&serde_json::json!({"b": 1, "a": {"y": 2, "x": 3}}));
    let b = canonical(&serde_json::json!({"a": {"x": 3, "y": 2}, "b": 1}));
    assert_eq!(a, b);
}

#[test]
fn a_process_is_checked_at_plan_time() {
    let ok = graph(&[(
        "services/a__b__c/service.toml",
        "domain = \"a\"\nname = \"b\"\ninstance = \"c\"\n[params]\nport = 8\n[process]\nexec = [\"srv\", \"--port=${params.port}\"]\nports = [\"http\"]\n",
    )])
    .unwrap();
    let p = ok.services["a__b__c"].process.as_ref().unwrap();
    assert_eq!(p["exec"][1], serde_json::json!("--port=8"));
    let e = err(&[(
        "services/a__b__c/service.toml",
        "domain = \"a\"\nname = \"b\"\ninstance = \"c\"\n[process]\ncolour = 1\n",
    )]);
    assert!(e.contains(":4: [process]"), "{e}");
}

#[test]
fn a_whole_reference_in_an_argv_env_or_health_command_is_text() {
    let ok = graph(&[(
        "services/a__b__c/service.toml",
        "domain = \"a\"\nname = \"b\"\ninstance = \"c\"\n[params]\nport = 8\non = true\n[process]\nexec = [\"srv\", \"${params.port}\"]\nenv = { SRV_PORT = \"${params.port}\", ON = \"${params.on}\" }\n[process.health]\nexec = [\"check\", \"${params.port}\"]\n",
    )])
    .unwrap();
    let p = ok.services["a__b__c"].process.as_ref().unwrap();
    let spec = process_spec("a__b__c", p).unwrap();
    assert_eq!(spec.exec.unwrap(), vec!["srv", "8"]);
    assert_eq!(spec.env["SRV_PORT"], "8");
    assert_eq!(spec.env["ON"], "true");
    assert_eq!(spec.health.unwrap().exec.unwrap(), vec!["check", "8"]);
}

#[test]
fn secrets_must_be_set_stay_unresolved_and_their_version_is_an_input() {
    let files = [
        (
            "services/demo__db__main/service.toml",
            "domain = \"demo\"\nname = \"db\"\ninstance = \"main\"\n\
             [params]\npassword = \"${secrets.pw}\"\ndsn = \"db://u:${secrets.pw}@h\"\n\
             [secrets]\npw = \"the database password\"\n",
        ),
        ("services/demo__db__main/actions/install", "#!/bin/sh\n"),
    ];
    let mut cat = load(&hq(&files)).unwrap();
    // Not set: a plan error naming the service and the key.
    let e = resolve(&cat, &nodes()).unwrap_err();
    assert!(
        e[0].message.contains("demo__db__main") && e[0].message.contains("secret pw is not set"),
        "{e:?}"
    );
    cat.secret_versions
        .insert("demo__db__main".into(), [("pw".into(), "v1".into())].into());
    let g1 = resolve(&cat, &nodes()).unwrap();
    let s = &g1.services["demo__db__main"];
    // Left for the node.
    assert_eq!(s.params["password"], "${secrets.pw}");
    assert_eq!(s.params["dsn"], "db://u:${secrets.pw}@h");
    assert_eq!(s.secrets, vec!["pw".to_string()]);
    // Another version: another hash (only the secrets part).
    cat.secret_versions
        .insert("demo__db__main".into(), [("pw".into(), "v2".into())].into());
    let g2 = resolve(&cat, &nodes()).unwrap();
    let s2 = &g2.services["demo__db__main"];
    assert_ne!(s.hash, s2.hash);
    let changed: Vec<&String> = s
        .parts
        .iter()
        .filter(|(k, v)| s2.parts.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed, vec!["secrets"]);
    // A service without secrets has no secrets part (hashes recorded before stay valid).
    let g = graph(&env()).unwrap();
    assert!(!g.services["demo__kv__main"].parts.contains_key("secrets"));
}

#[test]
fn secrets_are_never_published_and_in_a_process_only_whole_env_values() {
    let base = "domain = \"demo\"\nname = \"db\"\ninstance = \"main\"\n[secrets]\npw = \"\"\n";
    for (extra, what) in [
        (
            "[provides.kv]\ninterface = \"kv\"\ndata = { host = \"${secrets.pw}\", port = 1 }\n",
            "a secret cannot be used in published data",
        ),
        (
            "[process]\nexec = [\"sleep\", \"${secrets.pw}\"]\n",
            "env only",
        ),
        (
            "[process]\nexec = [\"sleep\", \"9\"]\nenv = { PW = \"pw=${secrets.pw}\" }\n",
            "a secret is a whole value",
        ),
    ] {
        let files = [
            ("interfaces/kv.toml", KV_IFACE),
            (
                "services/demo__db__main/service.toml",
                &format!("{base}{extra}"),
            ),
        ];
        let mut cat = load(&hq(&files)).unwrap();
        cat.secret_versions
            .insert("demo__db__main".into(), [("pw".into(), "v1".into())].into());
        let e = resolve(&cat, &nodes()).unwrap_err();
        assert!(e[0].message.contains(what), "{e:?}");
    }
    // A whole env value is kept as the reference: the node puts the value in.
    let text = format!(
        "{base}[process]\nexec = [\"sleep\", \"9\"]\nenv = {{ PW = \"${{secrets.pw}}\" }}\n"
    );
    let mut cat = load(&hq(&[(
        "services/demo__db__main/service.toml",
        text.as_str(),
    )]))
    .unwrap();
    cat.secret_versions
        .insert("demo__db__main".into(), [("pw".into(), "v1".into())].into());
    let g = resolve(&cat, &nodes()).unwrap();
    let p = g.services["demo__db__main"].process.clone().unwrap();
    assert_eq!(p["env"]["PW"], "${secrets.pw}");
}

#[test]
fn globs_match_names_and_directories() {
    assert!(glob_match("out/*", "out/hello"));
    assert!(!glob_match("out/*", "out/sub/hello"));
    assert!(glob_match("out/**", "out/sub/hello"));
    assert!(glob_match("**/*.so", "a/b/lib.so"));
    assert!(glob_match("**/*.so", "lib.so"));
    assert!(glob_match("./bin/app?", "bin/app1"));
    assert!(!glob_match("bin/app?", "bin/app12"));
    assert!(!glob_match("*.txt", "dir/a.txt"));
    assert!(glob_match("hello", "hello"));
}

#[test]
fn bad_builds_are_named_with_their_file() {
    let toml = |build: &str| {
        format!("domain = \"x\"\nname = \"b\"\ninstance = \"b\"\n\n[build]\n{build}\n")
    };
    for (build, want) in [
        ("command = \"make\"\nartifacts = [\"out/*\"]", "give source"),
        (
            "source = \"src\"\ngit = \"/r\"\nrev = \"main\"\ncommand = \"make\"\nartifacts = [\"a\"]",
            "not both",
        ),
        ("git = \"/r\"\ncommand = \"make\"\nartifacts = [\"a\"]", "needs rev"),
        ("source = \"src\"\nartifacts = [\"a\"]", "actions/build"),
        ("source = \"src\"\ncommand = \"make\"", "nothing would be kept"),
        (
            "source = \"src\"\ncommand = \"make\"\nartifacts = [\"../etc/*\"]",
            "not a relative path",
        ),
        (
            "source = \"/etc\"\ncommand = \"make\"\nartifacts = [\"a\"]",
            "not a relative path",
        ),
        (
            "source = \"src\"\ncommand = \"make\"\nartifacts = [\"a\"]\nflags = 1",
            "unknown field",
        ),
    ] {
        let text = toml(build);
        let e = err(&[("services/x__b__b/service.toml", text.as_str())]);
        assert!(e.contains(want), "{build}: {e}");
        assert!(e.contains("services/x__b__b/service.toml"), "{e}");
    }
    // An actions/build stands for the command.
    let text = toml("source = \"src\"\nartifacts = [\"out/*\"]");
    graph(&[
        ("services/x__b__b/service.toml", text.as_str()),
        ("services/x__b__b/actions/build", "#!/bin/sh\n"),
    ])
    .unwrap();
}

#[test]
fn a_builds_source_is_an_input() {
    let text = "domain = \"x\"\nname = \"b\"\ninstance = \"b\"\n[build]\nsource = \"src\"\ncommand = \"make\"\nartifacts = [\"out/*\"]\n";
    let files = hq(&[("services/x__b__b/service.toml", text)]);
    let hash = |source: &str| {
        let mut cat = load(&files).unwrap();
        cat.build_sources
            .insert("x__b__b".to_string(), source.to_string());
        let g = resolve(&cat, &nodes()).unwrap();
        let r = &g.services["x__b__b"];
        (r.parts["build"].clone(), r.hash.clone())
    };
    let (b1, h1) = hash("one");
    let (b2, h2) = hash("two");
    assert_ne!(b1, b2);
    assert_ne!(h1, h2);
    assert_eq!(hash("one"), (b1, h1));
}
