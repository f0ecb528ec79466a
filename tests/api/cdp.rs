//! A real browser for the tests: headless Chromium from Debian's `chromium`
//! package, started with a throwaway profile and driven over the Chrome
//! DevTools Protocol on a loopback WebSocket. Only what the tests use:
//! navigate, evaluate, screenshot, and the page's errors.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// How long Chromium may take to start, or to answer one command.
const LIMIT: Duration = Duration::from_secs(30);

/// Where the tests leave files for people to look at (`target/test-output`).
pub fn test_output_dir() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory");
    let dir = target.join("test-output");
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    dir
}

/// A headless Chromium process; killed, with every process it started, when
/// dropped (a test that panics included).
pub struct Browser {
    child: Child,
    profile: PathBuf,
    port: u16,
}

impl Browser {
    /// Starts Chromium on a DevTools port of its choosing and waits until it
    /// says which one.
    pub async fn launch() -> Browser {
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("chromium-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile).expect("create the Chromium profile directory");
        let log_path = test_output_dir().join("chromium.log");
        let log = std::fs::File::create(&log_path).expect("create chromium.log");
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--remote-debugging-port=0",
                // The tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // Loopback only: no update checks, sync or proxies.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                "--window-size=1100,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so dropping it ends its helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "the watch page test needs Chromium (Debian: apt-get install -y chromium): \
                     cannot start `chromium`: {e}"
                )
            });
        let mut browser = Browser {
            child,
            profile,
            port: 0,
        };
        browser.port = browser.devtools_port(&log_path).await;
        browser
    }

    /// The port in `<profile>/DevToolsActivePort`, written once Chromium
    /// listens.
    async fn devtools_port(&mut self, log_path: &Path) -> u16 {
        let file = self.profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
            {
                return port;
            }
            let exited = self.child.try_wait().expect("poll chromium");
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                panic!(
                    "Chromium did not open its DevTools port ({exited:?}); its log ({}):\n{log}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A DevTools session on the browser's page (the `about:blank` it
    /// opened with).
    pub async fn page(&self) -> Page {
        let list = format!("http://127.0.0.1:{}/json/list", self.port);
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + LIMIT;
        let url = loop {
            let targets: Value = match http.get(&list).send().await {
                Ok(response) => response.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let page = targets.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            });
            if let Some(url) = page {
                break url.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no page target in {list}: {targets}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("connect to the DevTools page {url}: {e}"));
        Page {
            socket,
            next_id: 0,
            problems: Vec::new(),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and its renderer, GPU and zygote
        // processes. Falls back to the browser alone.
        let group = format!("-{}", self.child.id());
        let killed = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !killed {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A DevTools Protocol session on one page.
pub struct Page {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// What the page reported going wrong: uncaught exceptions, console
    /// errors and browser log errors other than failed requests (a
    /// Content-Security-Policy violation is one).
    pub problems: Vec<Value>,
}

impl Page {
    /// Sends one command and returns its result; events that arrive
    /// meanwhile are kept when they report a problem.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket
            .send(Message::Text(command.into()))
            .await
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        tokio::time::timeout(LIMIT, self.answer(id))
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} within {LIMIT:?}"))
            .unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    async fn answer(&mut self, id: u64) -> Result<Value, Value> {
        loop {
            let message = self
                .socket
                .next()
                .await
                .expect("the DevTools connection closed")
                .expect("read from DevTools");
            let Message::Text(text) = message else {
                continue;
            };
            let mut message: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if message["id"] == id {
                return match message.get_mut("error") {
                    Some(error) => Err(error.take()),
                    None => Ok(message["result"].take()),
                };
            }
            self.keep_problem(message);
        }
    }

    fn keep_problem(&mut self, event: Value) {
        let problem = match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => true,
            Some("Runtime.consoleAPICalled") => event["params"]["type"] == "error",
            // A failed request is logged too: the API's error answers are
            // expected (the page shows them), the page's own checks say more.
            Some("Log.entryAdded") => {
                let entry = &event["params"]["entry"];
                entry["level"] == "error" && entry["source"] != "network"
            }
            _ => false,
        };
        if problem {
            self.problems.push(event["params"].clone());
        }
    }

    /// Reports exceptions, console errors and log entries from now on.
    pub async fn watch_problems(&mut self) {
        self.call("Runtime.enable", json!({})).await;
        self.call("Log.enable", json!({})).await;
    }

    pub async fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(
            result.get("errorText").is_none(),
            "navigate to {url}: {result}"
        );
    }

    /// Evaluates `expression` in the page and returns its value (a promise
    /// is awaited); panics when it throws.
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let mut result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {exception}");
        }
        result["result"]["value"].take()
    }

    /// Saves a PNG of what the page shows at `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
