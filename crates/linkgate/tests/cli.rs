//! The command line (DESIGN §1) and the configuration fixtures.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// Runs `linkgate check` from the fixture's folder, so messages name the
/// file as the user would have typed it.
fn check_in_dir(file: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(linkgate_bin())
        .current_dir(file.parent().unwrap())
        .args(["check", "-c"])
        .arg(file.file_name().unwrap())
        .env_remove("LINKGATE_TEST_SURELY_UNSET")
        .env("LINKGATE_MAIN_PW", "example-password")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_invalid_fixture_fails_with_its_expected_message() {
    let mut failures = Vec::new();
    for file in fixtures("invalid") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect: ' first line", file.display()));
        let (code, stdout, stderr) = check_in_dir(&file);
        if code != 2 || !stdout.is_empty() || !stderr.contains(expected) {
            failures.push(format!(
                "{}: exit {code}\n expected: {expected}\n got:      {stderr}{stdout}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_valid_fixture_passes() {
    for file in fixtures("valid") {
        let (code, stdout, stderr) = check_in_dir(&file);
        assert_eq!(code, 0, "{}: {stderr}", file.display());
        assert!(
            !stdout.is_empty(),
            "{}: check printed no services",
            file.display()
        );
    }
}

#[test]
fn examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, _, stderr) = check_in_dir(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            count += 1;
        }
    }
    assert!(count > 0);
}

#[test]
fn check_prints_one_line_per_service() {
    let file = fixtures("valid")
        .into_iter()
        .find(|f| f.ends_with("mapping_every_key.toml"))
        .unwrap();
    let (code, stdout, _) = check_in_dir(&file);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        "intranet-web\tmapping\tlisten=0.0.0.0:2080,[::]:2080\ttarget=[2001:db8::10]:80\tvia=-"
    );
    assert!(lines[1].starts_with("mail\tmapping\tlisten=127.0.0.1:2525"));
}

#[test]
fn check_of_missing_file_says_so() {
    let (code, _, stderr) = run_cli(&["check", "-c", "/nonexistent/linkgate.toml"], "");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/linkgate.toml: cannot read the configuration"),
        "{stderr}"
    );
}

#[test]
fn errors_never_show_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[user]]\nname = \"alice\"\npassword = \"hunter2-secret\"\nbogus = 1\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()], "");
    assert_eq!(code, 2);
    assert!(stderr.contains("user[1].bogus: unknown field"), "{stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
}

#[test]
fn default_config_is_printed_and_is_the_contracts() {
    let (code, stdout, _) = run_cli(&["default-config"], "");
    assert_eq!(code, 0);
    let value: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(value["gateway"]["admin"].as_str(), Some("127.0.0.1:9180"));
    let services = value["service"].as_array().unwrap();
    assert_eq!(services[0]["name"].as_str(), Some("socks"));
    assert_eq!(services[0]["listen"].as_str(), Some("127.0.0.1:1080"));
    assert_eq!(services[1]["name"].as_str(), Some("http"));
    assert_eq!(services[1]["listen"].as_str(), Some("127.0.0.1:3128"));
    // No `allow`: loopback clients only.
    assert!(services.iter().all(|s| s.get("allow").is_none()));
}

#[test]
fn passwd_prints_a_verifiable_argon2id_hash() {
    use argon2::{Argon2, PasswordHash, PasswordVerifier};
    let (code, stdout, _) = run_cli(&["passwd"], "s3cret pass\n");
    assert_eq!(code, 0);
    let phc = stdout.trim();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    let hash = PasswordHash::new(phc).unwrap();
    assert!(Argon2::default()
        .verify_password(b"s3cret pass", &hash)
        .is_ok());
    let (code, _, stderr) = run_cli(&["passwd"], "");
    assert_eq!(code, 1);
    assert!(stderr.contains("password is empty"));
}

#[test]
fn version_and_help() {
    let (code, stdout, _) = run_cli(&["--version"], "");
    assert_eq!(code, 0);
    assert!(stdout.starts_with("linkgate "));
    let (code, stdout, _) = run_cli(&["--help"], "");
    assert_eq!(code, 0);
    for word in [
        "run",
        "check",
        "passwd",
        "peer-record",
        "public-key",
        "default-config",
        "status",
    ] {
        assert!(stdout.contains(word), "--help lacks {word}");
    }
}

/// `peer-record` reads only what it needs (another peer's unset
/// `password_env` does not stop it), refuses a peer the config does not
/// have, naming those it has, and prints a line to paste.
#[test]
fn peer_record_reads_only_what_it_needs_and_refuses_unknown_peers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[gateway]\nidentity = \"hub.key\"\n\n[link]\nlisten = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"branch\"\npassword = \"x\"\n\n\
         [[peer]]\nname = \"other\"\npassword_env = \"LINKGATE_TEST_SURELY_UNSET\"\n",
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let (code, out, err) = run_cli(&["peer-record", "-c", path, "branch"], "secret\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().starts_with("record = \""), "{out}");
    let (code, out, err) = run_cli(&["peer-record", "-c", path, "nobody"], "secret\n");
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(
        err.contains("no [[peer]] named \"nobody\" (its peers: branch, other)"),
        "{err}"
    );
}

/// `public-key` reads only the identity setting: it works on a config that
/// is not complete yet, creates the identity file (mode 0600) next to it,
/// prints the same key every time, and exits 2 on a file it cannot parse.
#[test]
fn public_key_prints_a_stable_key_from_a_partial_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    // Not valid for `check` (a peer without any credential), yet fine here.
    std::fs::write(
        &config,
        "[gateway]\nidentity = \"keys/gw.key\"\n\n[[peer]]\nname = \"main\"\nconnect = \"main.example.net:7000\"\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let (code, first, stderr) = run_cli(&["public-key", "-c", config.to_str().unwrap()], "");
    assert_eq!(code, 0, "{stderr}");
    let key = first.trim();
    assert_eq!(key.len(), 44, "{key}");
    let identity = dir.path().join("keys/gw.key");
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (_, again, _) = run_cli(&["public-key", "-c", config.to_str().unwrap()], "");
    assert_eq!(again.trim(), key);
    std::fs::write(&config, "[gateway\n").unwrap();
    let (code, _, stderr) = run_cli(&["public-key", "-c", config.to_str().unwrap()], "");
    assert_eq!(code, 2);
    assert!(stderr.contains("gw.toml"), "{stderr}");
}

#[test]
fn run_with_bad_config_exits_2_and_port_in_use_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway]\nlog = \"xml\"\n").unwrap();
    let (code, _, stderr) = run_cli(&["run", "-c", bad.to_str().unwrap()], "");
    assert_eq!(code, 2);
    assert!(stderr.contains("gateway.log"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!("[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:{port}\"\ntarget = \"127.0.0.1:9\"\n"),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["run", "-c", busy.to_str().unwrap()], "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!(
            "service \"web\": cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{stderr}"
    );
}

/// A listener that cannot be opened is reported with the OS's reason, the
/// admin endpoint's like the services'.
#[test]
fn an_admin_address_in_use_is_reported_with_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nadmin = \"{}\"\n\n[[service]]\nname = \"m\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:9\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["run", "-c", config.to_str().unwrap()], "");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("admin: cannot listen on") && stderr.contains("in use"),
        "{stderr}"
    );
}

/// `check` says what it found about links too: the `[link]` listeners and
/// each peer (dialed or accepted, how it authenticates, through what).
#[test]
fn check_lists_the_link_listeners_and_the_peers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let (code, stdout, stderr) = check_in_dir(&dir.join("hub-main-office.toml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("[link]\taccepts\tlisten=0.0.0.0:7000,[::]:7000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("peer branch\taccepts\tauth=password"),
        "{stdout}"
    );
    let (code, stdout, stderr) = check_in_dir(&dir.join("spoke-behind-proxy.toml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("peer main\tdials\tauth=password\tconnect=wss://main.example.net:443/linkgate,main.example.net:7000\tvia=http://branch-gw:****@proxy.corp.example:3128"),
        "{stdout}"
    );
}

/// `completions` and `man` come from the same definitions as `--help`:
/// bash loads the completion script and completes the subcommands; the
/// manual page is roff naming every subcommand.
#[test]
fn completions_and_the_manual_page_come_from_the_command_definitions() {
    let (code, script, err) = run_cli(&["completions", "bash"], "");
    assert_eq!(code, 0, "{err}");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{script}\nCOMP_WORDS=(linkgate pe); COMP_CWORD=1; _linkgate linkgate pe linkgate; echo \"${{COMPREPLY[@]}}\""
        ))
        .output()
        .unwrap();
    let completed = String::from_utf8_lossy(&out.stdout);
    assert!(
        completed.contains("peer-record"),
        "{completed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish"] {
        let (code, script, _) = run_cli(&["completions", shell], "");
        assert_eq!(code, 0);
        assert!(script.contains("peer-record"), "{shell}");
    }
    let (code, page, _) = run_cli(&["man"], "");
    assert_eq!(code, 0);
    assert!(page.contains(".TH linkgate 1"), "{page}");
    for word in [
        "run",
        "check",
        "passwd",
        "peer\\-record",
        "public\\-key",
        "status",
        "completions",
    ] {
        assert!(page.contains(word), "man page lacks {word}");
    }
}

/// A SOCKS service that wants a login yet listens on links: `check`
/// accepts it (a peer's mapping can carry clients that log in) but warns,
/// at the line, that `link://` via hops will be refused.
#[test]
fn check_warns_that_link_via_hops_cannot_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("linkgate.toml");
    std::fs::write(
        &config,
        "[gateway]\nname = \"hub\"\n\n[link]\nlisten = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"branch\"\npassword = \"pw\"\n\n\
         [[user]]\nname = \"alice\"\npassword = \"a\"\n\n\
         [[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nauth = \"password\"\nallow = \"peer:branch\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", config.to_str().unwrap()], "");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("linkgate.toml:19:")
            && stderr.contains("link hops speak SOCKS5 without a login"),
        "{stderr}"
    );
}
