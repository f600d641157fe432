//! Clusters of real processes on loopback for benchmarks and tests: control-plane replicas
//! (any binary that takes `--id --peers --data-dir`) and etcd members. Every process is
//! killed when its cluster is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stellar_proto::client::ClusterClient;
use stellar_proto::v1 as pb;

/// Picks `n` distinct free loopback ports.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Waits until the first leader of a new cluster has written its admin token into
/// `data_dir` (gateways authenticate with it) and returns the token file's path.
pub fn wait_for_admin_token(data_dir: &Path, timeout: Duration) -> Result<PathBuf, String> {
    let deadline = stellar_proto::clock::now() + timeout;
    while stellar_proto::tokens::read_admin_token(data_dir).is_none() {
        if stellar_proto::clock::now() > deadline {
            return Err(format!(
                "the replica wrote no admin token into {} within {} s; its log says why",
                data_dir.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(data_dir.join(stellar_proto::tokens::ADMIN_TOKEN_FILE))
}

/// Control-plane replicas as child processes, each with a data dir and a log file.
#[derive(Debug)]
pub struct ReplicaProcesses {
    dir: PathBuf,
    binary: PathBuf,
    prefix: Vec<String>,
    extra: Vec<String>,
    /// Client addresses, index = id - 1.
    pub addresses: Vec<String>,
    procs: Vec<Option<Child>>,
}

impl ReplicaProcesses {
    /// Starts `n` replicas of a new cluster: `binary prefix.. --id I --peers .. --data-dir ..
    /// extra..`, with data and logs under `dir` (which must be on the disk to measure).
    pub fn start(
        dir: &Path,
        binary: &Path,
        prefix: &[&str],
        n: usize,
        extra: &[String],
    ) -> std::io::Result<ReplicaProcesses> {
        std::fs::create_dir_all(dir)?;
        let ports = free_ports(n)?;
        let mut c = ReplicaProcesses {
            dir: dir.to_path_buf(),
            binary: binary.to_path_buf(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            extra: extra.to_vec(),
            addresses: ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            procs: (0..n).map(|_| None).collect(),
        };
        for id in 1..=n as u64 {
            c.spawn(id)?;
        }
        Ok(c)
    }

    fn peers(&self) -> String {
        self.addresses
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data dir of replica `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("replica-{id}"))
    }

    /// The log file of replica `id`.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("replica-{id}.log"))
    }

    /// Starts (or restarts) replica `id` from its data dir.
    pub fn spawn(&mut self, id: u64) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let child = Command::new(&self.binary)
            .args(&self.prefix)
            .arg("--id")
            .arg(id.to_string())
            .arg("--peers")
            .arg(self.peers())
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(&self.extra)
            .env(
                "STELLAR_LOG",
                std::env::var("STELLAR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.procs[(id - 1) as usize] = Some(child);
        Ok(())
    }

    /// `kill -9` replica `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs[(id - 1) as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether replica `id` runs.
    pub fn is_up(&self, id: u64) -> bool {
        self.procs[(id - 1) as usize].is_some()
    }

    /// The OS process id of replica `id`.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs[(id - 1) as usize].as_ref().map(Child::id)
    }

    /// A leader-following admin client over every replica (the admin token is read from the
    /// data dir of whichever replica bootstrapped the cluster).
    pub fn client(&self) -> ClusterClient {
        let dirs = (1..=self.addresses.len() as u64)
            .map(|id| self.data_dir(id))
            .collect();
        ClusterClient::new(&self.addresses)
            .expect("loopback addresses are valid")
            .with_admin_token_from(dirs)
    }

    /// One replica's own view, if it answers.
    pub async fn status(&self, id: u64) -> Option<pb::ClusterStatusResponse> {
        let mut cl = self
            .client()
            .client_for(&self.addresses[(id - 1) as usize])
            .ok()?;
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            cl.cluster_status(pb::ClusterStatusRequest {}),
        )
        .await
        .ok()?;
        r.ok().map(|r| r.into_inner())
    }

    /// Polls (bounded by `attempts` × 20 ms) until a running replica says it leads.
    pub async fn wait_leader(&self, attempts: u32) -> Option<u64> {
        for _ in 0..attempts {
            for id in 1..=self.addresses.len() as u64 {
                if self.is_up(id)
                    && let Some(s) = self.status(id).await
                    && s.role == "leader"
                {
                    return Some(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for ReplicaProcesses {
    fn drop(&mut self) {
        for id in 1..=self.procs.len() as u64 {
            self.kill(id);
        }
    }
}

/// A 3-member etcd cluster (Debian's `etcd-server`) on loopback, fsync on (etcd's default).
#[derive(Debug)]
pub struct EtcdCluster {
    /// Client URLs.
    pub endpoints: Vec<String>,
    procs: Vec<Child>,
}

impl EtcdCluster {
    /// Starts `n` members with data under `dir`; fails with a hint if `etcd` is missing.
    pub fn start(dir: &Path, n: usize) -> std::io::Result<EtcdCluster> {
        let etcd = which("etcd").ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "`etcd` not found: install Debian's etcd-server (apt-get install etcd-server), \
                 or pass --skip-etcd",
            )
        })?;
        std::fs::create_dir_all(dir)?;
        let ports = free_ports(2 * n)?;
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let client_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i]);
        let initial: Vec<String> = (0..n).map(|i| format!("e{i}={}", peer_url(i))).collect();
        let mut procs = Vec::new();
        for i in 0..n {
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new(&etcd)
                .arg("--name")
                .arg(format!("e{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-{i}")))
                .arg("--listen-client-urls")
                .arg(client_url(i))
                .arg("--advertise-client-urls")
                .arg(client_url(i))
                .arg("--listen-peer-urls")
                .arg(peer_url(i))
                .arg("--initial-advertise-peer-urls")
                .arg(peer_url(i))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg("stellar-bench")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            procs.push(child);
        }
        Ok(EtcdCluster {
            endpoints: (0..n).map(client_url).collect(),
            procs,
        })
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An S3-compatible server on loopback for tests: moto's `moto_server` (PyPI `moto[server]`;
/// scripts/test.sh installs it into a virtualenv) with one bucket made. Found through
/// `STELLAR_MOTO_SERVER`, then `PATH`, then `~/.cache/stellar-test/venv/bin`.
#[derive(Debug)]
pub struct S3Server {
    /// Its `http://127.0.0.1:PORT` address.
    pub endpoint: String,
    /// The bucket made at start.
    pub bucket: String,
    child: Child,
}

/// Where `moto_server` is, if installed.
pub fn moto_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STELLAR_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    which("moto_server").or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".cache/stellar-test/venv/bin/moto_server");
        p.is_file().then_some(p)
    })
}

impl S3Server {
    /// Starts the server (its log in `dir`) and makes `bucket`; a hint when moto is missing.
    pub fn start(dir: &Path, bucket: &str) -> std::io::Result<S3Server> {
        let moto = moto_server().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "`moto_server` not found: run scripts/test.sh (it installs moto[server] from PyPI \
                 into ~/.cache/stellar-test/venv) or set STELLAR_MOTO_SERVER",
            )
        })?;
        std::fs::create_dir_all(dir)?;
        let port = free_ports(1)?[0];
        let log = std::fs::File::create(dir.join("moto.log"))?;
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
            child,
        };
        let deadline = stellar_proto::clock::now() + Duration::from_secs(60);
        loop {
            match server.http("PUT", &format!("/{bucket}")) {
                Ok(r) if r.starts_with("HTTP/1.1 200") => return Ok(server),
                Ok(r) => {
                    return Err(std::io::Error::other(format!(
                        "moto refused to make bucket {bucket}: {}",
                        r.lines().next().unwrap_or("")
                    )));
                }
                Err(_) if stellar_proto::clock::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One unsigned path-style request (moto takes them); the whole response.
    fn http(&self, method: &str, path: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let host = self.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The bucket's object keys under `prefix` (one page: up to 1000).
    pub fn keys(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        let r = self.http(
            "GET",
            &format!("/{}?list-type=2&prefix={prefix}", self.bucket),
        )?;
        Ok(xml_values(&r, "Key"))
    }

    /// Multipart uploads begun and neither completed nor aborted.
    pub fn open_uploads(&self) -> std::io::Result<Vec<String>> {
        let r = self.http("GET", &format!("/{}?uploads", self.bucket))?;
        Ok(xml_values(&r, "UploadId"))
    }

    /// The `stellar scheduler` flags that keep blobs in this server's bucket under `prefix`.
    pub fn scheduler_args(&self, prefix: &str) -> Vec<String> {
        let mut args = vec![
            "--blob-store".to_string(),
            format!("s3://{}/{prefix}", self.bucket),
        ];
        for (k, v) in self.options() {
            args.push("--blob-store-opt".into());
            args.push(format!("{k}={v}"));
        }
        args
    }

    /// The object_store settings that reach this server (any credentials do).
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of every `<tag>…</tag>` in `xml` (S3's listings; no nesting of the same tag).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Resident and peak resident memory of a process, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used so far, seconds, from `/proc/PID/stat`
/// (`None` for this process: `/proc/self/stat`). Every thread of the process is counted.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15, in clock ticks of USER_HZ (100 on Linux).
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Starts one role of the shipped `stellar` binary (`exe args…`) with `env` set, its stderr to
/// `log`, at `STELLAR_LOG` or warn; `runtime_threads` > 0 sets `TOKIO_WORKER_THREADS`.
/// Killed on drop.
pub(crate) fn spawn_role(
    exe: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
    runtime_threads: usize,
) -> Result<crate::wasmbench::KillOnDrop, String> {
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    if runtime_threads > 0 {
        cmd.env("TOKIO_WORKER_THREADS", runtime_threads.to_string());
    }
    cmd.args(args)
        .env(
            "STELLAR_LOG",
            std::env::var("STELLAR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("STELLAR_WORKER_CHEAT") // honest unless `env` says otherwise
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(crate::wasmbench::KillOnDrop)
        .map_err(|e| format!("{}: {e}", exe.display()))
}

/// What a [`LocalCluster`] runs besides its one replica.
#[derive(Debug, Clone, Default)]
pub struct LocalClusterConfig {
    /// Gateways (at least one is started).
    pub gateways: usize,
    /// Workers joined to the gateways round-robin.
    pub workers: usize,
    /// Extra flags of every worker.
    pub worker_args: Vec<String>,
    /// Extra flags of every gateway.
    pub gateway_args: Vec<String>,
    /// > 0 caps each process's tokio threads.
    pub runtime_threads: usize,
}

/// A one-replica cluster of the shipped `stellar` binary on loopback: a scheduler, gateways
/// in front of it and workers joined to them round-robin, each process killed on drop. What
/// the benchmarks start when not pointed at an existing cluster.
#[derive(Debug)]
pub struct LocalCluster {
    /// The replica's address.
    pub replica: String,
    /// The gateways' gRPC addresses (workers and clients).
    pub gateways: Vec<String>,
    /// The replica's data dir (where its admin token is).
    pub plane: PathBuf,
    /// The admin token's file.
    pub token_file: PathBuf,
    dir: PathBuf,
    runtime_threads: usize,
    workers: usize,
    procs: Vec<crate::wasmbench::KillOnDrop>,
}

/// The join token a [`LocalCluster`]'s workers present.
const LOCAL_JOIN_TOKEN: &str = "local-cluster-join";

impl LocalCluster {
    /// Starts it under `dir` (data and logs) with `exe` for every role.
    pub fn start(exe: &Path, dir: &Path, cfg: &LocalClusterConfig) -> Result<LocalCluster, String> {
        if !exe.is_file() {
            return Err(format!(
                "the `stellar` binary is not at {} (build it: cargo build --release -p stellar-cli, or pass --stellar PATH)",
                exe.display()
            ));
        }
        let g = cfg.gateways.max(1);
        let ports = free_ports(1 + g).map_err(|e| e.to_string())?;
        let replica = format!("127.0.0.1:{}", ports[0]);
        let gateways: Vec<String> = ports[1..]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let plane = dir.join("plane");
        let plane_s = plane.to_string_lossy().into_owned();
        let peers = format!("1={replica}");
        let procs = vec![spawn_role(
            exe,
            &[
                "scheduler",
                "--id",
                "1",
                "--peers",
                &peers,
                "--data-dir",
                &plane_s,
            ],
            &[],
            &dir.join("plane.log"),
            cfg.runtime_threads,
        )?];
        let token_file = wait_for_admin_token(&plane, Duration::from_secs(30))?;
        let mut c = LocalCluster {
            replica,
            gateways,
            plane,
            token_file,
            dir: dir.to_path_buf(),
            runtime_threads: cfg.runtime_threads,
            workers: 0,
            procs,
        };
        let token_s = c.token_file.to_string_lossy().into_owned();
        for (i, addr) in c.gateways.clone().iter().enumerate() {
            let mut args = vec![
                "gateway",
                "--control",
                &c.replica,
                "--listen",
                addr,
                "--http-listen",
                "off",
                "--token-file",
                &token_s,
                "--join-token",
                LOCAL_JOIN_TOKEN,
            ];
            args.extend(cfg.gateway_args.iter().map(String::as_str));
            let gw = spawn_role(
                exe,
                &args,
                &[],
                &dir.join(format!("gateway-{i}.log")),
                cfg.runtime_threads,
            )?;
            c.procs.push(gw);
        }
        let worker_args: Vec<&str> = cfg.worker_args.iter().map(String::as_str).collect();
        for _ in 0..cfg.workers {
            c.add_worker(exe, &worker_args, &[])?;
        }
        Ok(c)
    }

    /// Starts one more worker (`exe worker …` with `args` and `env`), joined to the next
    /// gateway round-robin; returns its data dir (its identity is there once it registers).
    pub fn add_worker(
        &mut self,
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<PathBuf, String> {
        let i = self.workers;
        let data = self.dir.join(format!("worker-{i}"));
        let data_s = data.to_string_lossy().into_owned();
        let gateway = self.gateways[i % self.gateways.len()].clone();
        let mut all = vec![
            "worker",
            "--join",
            &gateway,
            "--token",
            LOCAL_JOIN_TOKEN,
            "--data-dir",
            &data_s,
        ];
        all.extend_from_slice(args);
        let p = spawn_role(
            exe,
            &all,
            env,
            &self.dir.join(format!("worker-{i}.log")),
            self.runtime_threads,
        )?;
        self.procs.push(p);
        self.workers += 1;
        Ok(data)
    }

    /// The admin token the replica wrote.
    pub fn admin_token(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{}: {e}", self.token_file.display()))
    }

    /// Its processes' ids (for their cpu time).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}
