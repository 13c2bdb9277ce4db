//! Accounts and access (SPEC §13): the role × route × workspace table, scopes and expiry,
//! cookies with CSRF, websocket origins, password rehash, login rate limiting, metrics, perf logs.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Creates a user (as the admin) and logs them in; returns their token.
fn user(s: &Server, name: &str) -> String {
    let (st, body) = s.call(
        "POST",
        "/api/v1/users",
        Some(json!({"username": name, "password": "a long password 1"})),
    );
    assert_eq!(st, 201, "{body}");
    login(s, name, "a long password 1").0
}

fn login(s: &Server, name: &str, password: &str) -> (String, String) {
    let mut out = (0, Value::Null);
    assert!(wait_until(Duration::from_secs(10), || {
        out = s.call_as(
            None,
            "POST",
            "/api/v1/login",
            Some(json!({"username": name, "password": password}).to_string()),
            &[],
        );
        out.0 != 429
    }));
    assert_eq!(out.0, 200, "{}", out.1);
    (
        out.1["token"].as_str().unwrap().to_string(),
        out.1["csrf_token"].as_str().unwrap().to_string(),
    )
}

fn set_role(s: &Server, ws: &str, user: &str, role: &str) {
    let (st, body) = s.call(
        "PUT",
        &format!("/api/v1/workspaces/{ws}/members/{user}"),
        Some(json!({"role": role})),
    );
    assert_eq!(st, 200, "{body}");
}

#[test]
fn role_route_workspace_table() {
    let s = Server::start();
    let (st, body) = s.call("POST", "/api/v1/workspaces", Some(json!({"name": "acme"})));
    assert_eq!(st, 201, "{body}");
    let viewer = user(&s, "vera");
    let operator = user(&s, "otto");
    let ws_admin = user(&s, "ada");
    let outsider = user(&s, "olga");
    set_role(&s, "acme", "vera", "viewer");
    set_role(&s, "acme", "otto", "operator");
    set_role(&s, "acme", "ada", "admin");
    // A tree in acme, made by the cluster admin.
    let (acme_tree, _) =
        s.create(json!({"name": "acme-job", "shell": "sleep 30", "tags": {"workspace": "acme"}}));
    let new_tree = |ws: &str| {
        Some(json!({"name": "t", "exec": ["true"], "tags": {"workspace": ws}}).to_string())
    };
    let member = Some(json!({"role": "viewer"}).to_string());
    let admin = s.token.clone();
    let mine = Some(json!({"name": "mine", "noop": true}).to_string());
    let x1 = Some(json!({"username": "x1", "password": "a long password 1"}).to_string());
    let job = format!("/api/v1/jobs/{acme_tree}");
    let log = format!("/api/v1/jobs/{acme_tree}/log");
    let abort = format!("/api/v1/jobs/{acme_tree}/abort");
    let olga = "/api/v1/workspaces/acme/members/olga";
    // (who, token, method, path, body, expected status)
    type Row<'a> = (&'a str, &'a str, &'a str, &'a str, Option<String>, u16);
    let table: Vec<Row> = vec![
        ("viewer", &viewer, "GET", &job, None, 200),
        ("operator", &operator, "GET", &job, None, 200),
        ("outsider", &outsider, "GET", &job, None, 404),
        ("outsider", &outsider, "GET", &log, None, 404),
        (
            "viewer",
            &viewer,
            "POST",
            "/api/v1/jobs",
            new_tree("acme"),
            403,
        ),
        (
            "operator",
            &operator,
            "POST",
            "/api/v1/jobs",
            new_tree("acme"),
            201,
        ),
        (
            "ws-admin",
            &ws_admin,
            "POST",
            "/api/v1/jobs",
            new_tree("acme"),
            201,
        ),
        (
            "outsider",
            &outsider,
            "POST",
            "/api/v1/jobs",
            new_tree("acme"),
            403,
        ),
        (
            "outsider",
            &outsider,
            "POST",
            "/api/v1/jobs",
            new_tree("olga"),
            201,
        ),
        ("viewer", &viewer, "POST", "/api/v1/jobs", mine, 201),
        ("viewer", &viewer, "POST", &abort, None, 403),
        ("outsider", &outsider, "POST", &abort, None, 404),
        ("viewer", &viewer, "PUT", olga, member.clone(), 403),
        ("operator", &operator, "PUT", olga, member.clone(), 403),
        ("outsider", &outsider, "PUT", olga, member.clone(), 404),
        ("ws-admin", &ws_admin, "PUT", olga, member.clone(), 200),
        ("ws-admin", &ws_admin, "POST", "/api/v1/users", x1, 403),
        (
            "ws-admin",
            &ws_admin,
            "DELETE",
            "/api/v1/users/vera",
            None,
            403,
        ),
        ("cluster-admin", &admin, "GET", &job, None, 200),
        ("operator", &operator, "POST", &abort, None, 202),
    ];
    for (who, tok, method, path, body, expected) in table {
        let (st, resp) = s.call_as(Some(tok), method, path, body, &[]);
        assert_eq!(st, expected, "{who} {method} {path}: {resp}");
    }
    // Listings show each caller only their workspaces (olga leaves acme first).
    let (st, body) = s.call_as(Some(&ws_admin), "DELETE", olga, None, &[]);
    assert_eq!(st, 204, "{body}");
    let (_, list) = s.call_as(Some(&outsider), "GET", "/api/v1/jobs", None, &[]);
    let ws: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tags"]["workspace"].as_str().unwrap())
        .collect();
    assert!(!ws.is_empty() && ws.iter().all(|w| *w == "olga"), "{ws:?}");
    let (_, list) = s.call_as(
        Some(&viewer),
        "GET",
        "/api/v1/jobs?workspace=acme",
        None,
        &[],
    );
    assert!(list["items"].as_array().unwrap().len() >= 3);
    // The default workspace is the caller's own.
    let (_, mine) = s.call_as(
        Some(&viewer),
        "GET",
        "/api/v1/jobs?workspace=vera",
        None,
        &[],
    );
    assert_eq!(mine["items"][0]["name"], "mine");
}

#[test]
fn token_scopes_expiry_and_revocation() {
    let s = Server::start();
    let (st, t) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "ci", "scopes": ["read"]})),
    );
    assert_eq!(st, 201, "{t}");
    let read_only = t["token"].as_str().unwrap().to_string();
    assert!(read_only.starts_with(t["prefix"].as_str().unwrap()));
    assert_eq!(
        s.call_as(Some(&read_only), "GET", "/api/v1/jobs", None, &[])
            .0,
        200
    );
    let (st, body) = s.call_as(
        Some(&read_only),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "x", "noop": true}).to_string()),
        &[],
    );
    assert_eq!(st, 403, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("operate"));
    // A token cannot grant what it lacks, nor unknown scopes.
    assert_eq!(
        s.call_as(
            Some(&read_only),
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "y", "scopes": ["read"]}).to_string()),
            &[]
        )
        .0,
        403
    );
    assert_eq!(
        s.call(
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "y", "scopes": ["root"]}))
        )
        .0,
        400
    );
    // Expiry.
    let (_, t2) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "short", "scopes": ["read", "operate"], "expires_in_s": 1})),
    );
    let short = t2["token"].as_str().unwrap().to_string();
    assert_eq!(
        s.call_as(
            Some(&short),
            "POST",
            "/api/v1/jobs",
            Some(json!({"name": "x", "noop": true}).to_string()),
            &[]
        )
        .0,
        201
    );
    assert!(wait_until(Duration::from_secs(5), || s
        .call_as(Some(&short), "GET", "/api/v1/jobs", None, &[])
        .0
        == 401));
    // Listing shows no secrets; revocation works at once.
    let (_, list) = s.call("GET", "/api/v1/tokens", None);
    let text = list.to_string();
    assert!(
        !text.contains(&read_only) && !text.contains("\"hash\""),
        "{text}"
    );
    let id = t["id"].as_str().unwrap();
    assert_eq!(
        s.call("DELETE", &format!("/api/v1/tokens/{id}"), None).0,
        204
    );
    assert_eq!(
        s.call_as(Some(&read_only), "GET", "/api/v1/jobs", None, &[])
            .0,
        401
    );
    assert_eq!(
        s.call("DELETE", &format!("/api/v1/tokens/{id}"), None).0,
        404
    );
}

#[test]
fn cookie_sessions_need_csrf_and_websockets_check_origin() {
    let s = Server::start();
    let (token, csrf) = login(&s, "admin", "correct horse battery");
    let cookie = format!("muster_session={token}");
    let body = Some(json!({"name": "c", "noop": true}).to_string());
    // Reads work with the cookie alone; writes need the CSRF header.
    assert_eq!(
        s.call_as(None, "GET", "/api/v1/jobs", None, &[("cookie", &cookie)])
            .0,
        200
    );
    let (st, resp) = s.call_as(
        None,
        "POST",
        "/api/v1/jobs",
        body.clone(),
        &[("cookie", &cookie)],
    );
    assert_eq!(st, 403, "{resp}");
    assert_eq!(
        s.call_as(
            None,
            "POST",
            "/api/v1/jobs",
            body.clone(),
            &[("cookie", &cookie), ("x-csrf-token", "wrong")]
        )
        .0,
        403
    );
    assert_eq!(
        s.call_as(
            None,
            "POST",
            "/api/v1/jobs",
            body,
            &[("cookie", &cookie), ("x-csrf-token", &csrf)]
        )
        .0,
        201
    );
    // The login response sets the cookies with the right attributes.
    let resp = http()
        .post(&format!("{}/api/v1/login", s.url))
        .header("content-type", "application/json")
        .send(json!({"username": "admin", "password": "correct horse battery"}).to_string())
        .unwrap();
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("muster_session="))
        .unwrap();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    // Websocket upgrades from another origin are refused.
    let host = s.url.trim_start_matches("http://").to_string();
    let ws_headers = [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let mut evil = ws_headers.to_vec();
    evil.push(("origin", "http://evil.example"));
    let (st, resp) = s.call_as(Some(&s.token), "GET", "/api/v1/events/ws", None, &evil);
    assert_eq!(st, 403, "{resp}");
    let same = format!("http://{host}");
    let mut good = ws_headers.to_vec();
    good.push(("origin", &same));
    // (ureq cannot complete an upgrade; 101 is the answer we look for.)
    let (st, _) = s.raw(Some(&s.token), "GET", "/api/v1/events/ws", None, &good);
    assert_eq!(st, 101);
}

#[test]
fn a_login_rehashes_to_the_configured_algorithm() {
    let s = Server::start_with(|c| c.auth.password_hash = "scrypt".into());
    // The harness made the admin through setup with scrypt; switch the stored hash to bcrypt
    // (as an older install would have), then log in: it becomes scrypt again.
    let mut u = s.app.store.user("admin").unwrap().unwrap();
    assert!(
        u.password_hash.starts_with("$scrypt$"),
        "{}",
        u.password_hash
    );
    u.password_hash = muster_server::auth::hash_password_with(
        muster_server::auth::Algo::Bcrypt,
        "correct horse battery",
    )
    .unwrap();
    s.app.store.put_user(&u).unwrap();
    login(&s, "admin", "correct horse battery");
    let after = s.app.store.user("admin").unwrap().unwrap().password_hash;
    assert!(after.starts_with("$scrypt$"), "{after}");
    // Passwords: 12 characters, not the user name.
    assert_eq!(
        s.call(
            "POST",
            "/api/v1/users",
            Some(json!({"username": "shorty", "password": "too short"}))
        )
        .0,
        400
    );
    assert_eq!(
        s.call(
            "POST",
            "/api/v1/users",
            Some(json!({"username": "samename12345", "password": "samename12345"}))
        )
        .0,
        400
    );
}

#[test]
fn failed_logins_get_growing_delays_not_a_lockout() {
    // (The growth of the delays is unit-tested on the limiter with a given clock; here, the
    // server's answers, with a base delay long enough for a busy machine.)
    let s = Server::start_with(|c| c.auth.login_delay = Duration::from_secs(2));
    let attempt = |pw: &str| {
        s.raw(
            None,
            "POST",
            "/api/v1/login",
            Some(json!({"username": "admin", "password": pw}).to_string()),
            &[],
        )
    };
    assert_eq!(attempt("wrong password 1").0, 401);
    let (st, body) = attempt("wrong password 2");
    assert_eq!(st, 429, "{body}");
    assert!(
        body.contains("slow_down") && body.contains("try again in"),
        "{body}"
    );
    let resp = http()
        .post(&format!("{}/api/v1/login", s.url))
        .header("content-type", "application/json")
        .send(json!({"username": "admin", "password": "whatever it is"}).to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    // Not a lockout: once the delay has passed, the right password gets in.
    assert!(wait_until(Duration::from_secs(15), || attempt(
        "correct horse battery"
    )
    .0 == 200));
    // A success clears the counter: the next failure is heard at once (401, not 429).
    assert_eq!(attempt("wrong password 3").0, 401);
}

/// A login sent from the loopback address `127.0.0.{last}`: the request, by hand, on a socket
/// bound there (the server listens on 127.0.0.1; all of 127/8 is this host). Returns the status.
fn login_from(s: &Server, last: u8, name: &str, password: &str) -> u16 {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let server: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    let std::net::SocketAddr::V4(server) = server else {
        panic!("the test server is on IPv4 loopback")
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, bound and connected with sockaddr_in values that live across the
    // calls, then owned by the TcpStream.
    let mut stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let local = sin(std::net::Ipv4Addr::new(127, 0, 0, last), 0);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(
            rc,
            0,
            "bind 127.0.0.{last}: {}",
            std::io::Error::last_os_error()
        );
        let remote = sin(*server.ip(), server.port());
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    };
    let body = json!({"username": name, "password": password}).to_string();
    write!(
        stream,
        "POST /api/v1/login HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|st| st.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[test]
fn guesses_from_other_addresses_never_lock_a_user_out() {
    // A delay long enough that no one could wait it out within the test: a 200 below is one
    // that was never delayed.
    let s = Server::start_with(|c| c.auth.login_delay = Duration::from_secs(600));
    // Four addresses guess admin's password; each is slowed after its first failure.
    for last in 2..=5 {
        assert_eq!(login_from(&s, last, "admin", "a wrong guess 1"), 401);
        assert_eq!(login_from(&s, last, "admin", "a wrong guess 2"), 429);
    }
    // The real admin, from a fifth address, is let in at once.
    assert_eq!(
        login_from(&s, 6, "admin", "correct horse battery"),
        200,
        "guesses from elsewhere delayed the user"
    );
    // Having logged in from there, a typo from that address is not slowed either...
    assert_eq!(login_from(&s, 6, "admin", "a typo of mine"), 401);
    assert_eq!(login_from(&s, 6, "admin", "correct horse battery"), 200);
    // ...while the guessers still are.
    assert_eq!(login_from(&s, 2, "admin", "correct horse battery"), 429);
}

#[test]
fn metrics_are_exposed() {
    let s = Server::start();
    let (id, _) = s.create(json!({"name": "m", "exec": ["true"]}));
    s.wait_tree(&id, Duration::from_secs(10));
    let (st, text) = s.raw(None, "GET", "/metrics", None, &[]);
    assert_eq!(st, 200);
    for needle in [
        "muster_http_requests_total{route=\"POST /api/v1/jobs\",status=\"201\"} 1",
        "muster_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"GET /api/v1/jobs/{id}/tree\"}",
        "muster_jobs_finished_total{state=\"succeeded\"} 1",
        "muster_jobs{state=\"running\"} 0",
        "muster_job_queue_depth 0",
        "muster_job_start_latency_seconds_count 1",
        "muster_nodes{state=\"ready\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

#[test]
fn perf_logs_record_every_call() {
    let s = Server::start_with(|c| c.perf.enabled = true);
    for _ in 0..5 {
        assert_eq!(s.call("GET", "/api/v1/jobs", None).0, 200);
    }
    let dir = s.app.perf.as_ref().unwrap().dir.clone();
    assert!(dir.starts_with(s.dir.0.join("perf/logs")));
    let mut summary = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            summary = muster_server::perf::summary(&s.dir.0, None).unwrap();
            summary.lines().any(|l| {
                l.starts_with("GET /api/v1/jobs ") && l.split_whitespace().nth(2) == Some("5")
            })
        }),
        "{summary}"
    );
}

#[test]
fn me_says_who_the_caller_is_and_what_they_may_do() {
    let s = Server::start();
    // A cluster admin: admin everywhere, every scope.
    let (st, me) = s.call("GET", "/api/v1/me", None);
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"], "admin");
    assert_eq!(me["admin"], true);
    assert_eq!(me["scopes"], json!(["read", "operate", "admin", "predict"]));
    let (_, ws) = s.call("POST", "/api/v1/workspaces", Some(json!({"name": "acme"})));
    assert_eq!(ws["name"], "acme");
    let (_, me) = s.call("GET", "/api/v1/me", None);
    assert_eq!(
        me["workspaces"],
        json!([{"name": "acme", "role": "admin"}, {"name": "admin", "role": "admin"}])
    );
    assert!(
        me["token"]["id"].is_string() && me["token"]["name"].is_string(),
        "{me}"
    );

    // A member: their roles; a token with fewer scopes says so.
    let bob = user(&s, "bob");
    set_role(&s, "acme", "bob", "viewer");
    let (st, me) = s.call_as(Some(&bob), "GET", "/api/v1/me", None, &[]);
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"], "bob");
    assert_eq!(me["admin"], false);
    assert_eq!(
        me["workspaces"],
        json!([{"name": "acme", "role": "viewer"}, {"name": "bob", "role": "admin"}])
    );
    let (st, t) = s.call_as(
        Some(&bob),
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "peek", "scopes": ["read"]}).to_string()),
        &[],
    );
    assert_eq!(st, 201, "{t}");
    let (st, me) = s.call_as(t["token"].as_str(), "GET", "/api/v1/me", None, &[]);
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["scopes"], json!(["read"]));
    assert_eq!(me["token"]["name"], "peek");

    // A job's own token: its tree's workspace only, at most as an operator, never an admin.
    let go = s.dir.0.join("go");
    let (id, _) = s.create(json!({"name": "who", "tags": {"workspace": "acme"},
        "shell": format!("echo \"token=$MUSTER_TOKEN\"; while [ ! -e {} ]; do sleep 0.02; done", go.display())}));
    let mut token = String::new();
    assert!(wait_until(Duration::from_secs(20), || {
        let (_, log) = s.raw(
            Some(&s.token),
            "GET",
            &format!("/api/v1/jobs/{id}/log"),
            None,
            &[],
        );
        match log.split_once(" out token=") {
            Some((_, rest)) => {
                token = rest.lines().next().unwrap_or("").to_string();
                !token.is_empty()
            }
            None => false,
        }
    }));
    let (st, me) = s.call_as(Some(&token), "GET", "/api/v1/me", None, &[]);
    std::fs::write(&go, b"").unwrap();
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["admin"], false, "{me}");
    assert_eq!(
        me["workspaces"],
        json!([{"name": "acme", "role": "operator"}]),
        "{me}"
    );
    assert_eq!(me["token"]["workspace"], "acme", "{me}");
    s.wait_tree(&id, Duration::from_secs(20));

    // No token, no answer.
    let (st, _) = s.call_as(None, "GET", "/api/v1/me", None, &[]);
    assert_eq!(st, 401);
}
