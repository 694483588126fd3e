//! Redis high availability (issue 19): helpers that start, on loopback and free ports, a
//! Redis Cluster of three primaries with one replica each ([`RedisCluster`]) and a primary
//! with one replica watched by three sentinels ([`RedisSentinel`]), and kill primaries to
//! force a failover; plus smoke tests showing that a fred client follows each failover.
//!
//! Every redis-server comes from [`localstack::redis_on`] (no persistence, loopback only) and
//! every process is killed when its helper drops. Timings are short so that a failover takes
//! about 2-3 s: `cluster-node-timeout 1000` and `down-after-milliseconds 1000`.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;
use hokusai_deployer::localstack::{self, Service};
use tokio::process::{Child, Command};

/// The sentinel service name of [`RedisSentinel`].
pub(crate) const SERVICE_NAME: &str = "mymaster";

/// How long a set of servers may take to agree on its topology after start-up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a failover may take: a sentinel election that splits is retried only after twice
/// `failover-timeout` (10 s), so leave room for one retry.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one `redis-cli` call may take: a SIGSTOPped server never answers.
const CLI_TIMEOUT: Duration = Duration::from_secs(2);

/// The number of hash slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` and returns its output, or `None` when it
/// cannot connect, gets an error reply, or takes longer than 2 s.
pub(crate) async fn cli(port: u16, args: &[&str]) -> Option<String> {
    let bin = localstack::find_tool("redis-cli", "HOKUSAI_REDIS_CLI").expect("redis-cli");
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CLI_TIMEOUT, out).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    // redis-cli may exit 0 on an error reply and print it as plain text.
    let failed = text.starts_with("Could not connect")
        || text.starts_with("ERR")
        || text.starts_with("Error:");
    (out.status.success() && !failed).then_some(text)
}

/// The value of `name:` in an `INFO`/`CLUSTER INFO` reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Polls `probe` every 100 ms until it returns `Some`, and panics after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a redis-server on a free port with `args(port)` after the defaults of
/// [`localstack::redis_on`]; a port taken meanwhile by someone else is retried on another.
async fn server(dir: &Path, args: impl Fn(u16) -> Vec<String>) -> Service {
    server_with_args(dir, args).await.0
}

/// [`server`], also returning the arguments it was started with (to restart it the same way).
async fn server_with_args(dir: &Path, args: impl Fn(u16) -> Vec<String>) -> (Service, Vec<String>) {
    let mut last = None;
    for _ in 0..5 {
        let port = localstack::free_port();
        let owned = args(port);
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        match localstack::redis_on(dir, port, &args).await {
            Ok(s) => return (s, owned),
            Err(e) => last = Some(e),
        }
    }
    panic!("redis-server must start (make tools): {last:?}");
}

/// The pid of the redis-server on `port`, from `INFO server`.
async fn pid_of(port: u16) -> u32 {
    let info = cli(port, &["INFO", "server"])
        .await
        .expect("redis-server answers INFO");
    field(&info, "process_id")
        .and_then(|p| p.parse().ok())
        .expect("INFO server has process_id")
}

/// Waits until the server on `port` is a replica with its link to the primary up.
async fn synced_replica(port: u16, what: &str, within: Duration) {
    eventually(what, within, || async {
        let info = cli(port, &["INFO", "replication"]).await?;
        (field(&info, "role") == Some("slave") && field(&info, "master_link_status") == Some("up"))
            .then_some(())
    })
    .await;
}

/// Sends a signal (`"STOP"`, `"CONT"`, ...) to a process with `kill(1)`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1) runs")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// A fred client for `url` built the way the service builds one (src/queue.rs), with short
/// timeouts and a reconnect policy that retries forever, 100 ms doubling to 2 s. Call
/// `init()` to connect.
pub(crate) fn fred_client(url: &str) -> Client {
    let config = Config::from_url(url).unwrap_or_else(|e| panic!("fred accepts {url}: {e}"));
    Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 3;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .expect("fred builds the client")
}

// ------------------------------------------------------------------------------------------
// Redis Cluster
// ------------------------------------------------------------------------------------------

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct ClusterNode {
    port: u16,
    primary: bool,
    replica: bool,
    /// `fail`, `fail?`, `handshake` or `noaddr`: not (yet) a working member.
    failing: bool,
    slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong>
/// <epoch> <link> <slot>...`, where a slot is `a-b` or `a` (and `[...]` while migrating).
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let has = |x: &str| flags.contains(&x);
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(ClusterNode {
                port,
                primary: has("master"),
                replica: has("slave"),
                failing: has("fail") || has("fail?") || has("handshake") || has("noaddr"),
                slots,
            })
        })
        .collect()
}

/// The working primary that serves `slot` in this view of the cluster.
fn owner(nodes: &[ClusterNode], slot: u16) -> Option<u16> {
    nodes
        .iter()
        .find(|n| n.primary && !n.failing && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
        .map(|n| n.port)
}

/// A Redis Cluster on loopback: six redis-servers, three primaries with one replica each,
/// `cluster-node-timeout 1000` (a replica takes over about 2.5 s after its primary dies).
/// Every node is killed when this drops.
pub(crate) struct RedisCluster {
    nodes: Vec<Service>,
    /// Each node's port and arguments, killed or not (to start it again).
    args: Vec<(u16, Vec<String>)>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create ... --cluster-replicas 1`,
    /// and returns once every node reports `cluster_state:ok`, knows all six nodes (three
    /// primaries covering the 16384 slots, three replicas), and every replica is in sync.
    pub(crate) async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        let mut all_args = Vec::new();
        for _ in 0..6 {
            let (node, args) = server_with_args(dir.path(), |port| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "1000",
                    // The bus port: `port + 10000` is out of range for most ephemeral ports.
                    "--cluster-port",
                    &localstack::free_port().to_string(),
                    // A replica may always take over, however long its link was down.
                    "--cluster-replica-validity-factor",
                    "0",
                    // The first sync of a replica starts at once, not after 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .map(String::from)
                .to_vec()
            })
            .await;
            all_args.push((node.port, args));
            nodes.push(node);
        }
        let cluster = RedisCluster {
            nodes,
            args: all_args,
            dir,
        };
        cluster.create().await;
        eventually("the cluster settles", SETTLE_TIMEOUT, || cluster.settled()).await;
        cluster
    }

    async fn create(&self) {
        let bin = localstack::find_tool("redis-cli", "HOKUSAI_REDIS_CLI").expect("redis-cli");
        let mut cmd = Command::new(bin);
        cmd.arg("--cluster").arg("create");
        for n in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(SETTLE_TIMEOUT, cmd.output())
            .await
            .expect("redis-cli --cluster create finishes")
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `Some` when every node sees the full, healthy topology and every replica is in sync.
    async fn settled(&self) -> Option<()> {
        for n in &self.nodes {
            let info = cli(n.port, &["CLUSTER", "INFO"]).await?;
            if field(&info, "cluster_state") != Some("ok") {
                return None;
            }
            let view = parse_cluster_nodes(&cli(n.port, &["CLUSTER", "NODES"]).await?);
            let primaries: Vec<_> = view.iter().filter(|v| v.primary).collect();
            let covered: u32 = primaries
                .iter()
                .flat_map(|p| &p.slots)
                .map(|&(a, b)| u32::from(b - a) + 1)
                .sum();
            if view.len() != 6
                || view.iter().any(|v| v.failing)
                || primaries.len() != 3
                || covered != SLOTS
                || view.iter().filter(|v| v.replica).count() != 3
            {
                return None;
            }
            let repl = cli(n.port, &["INFO", "replication"]).await?;
            if field(&repl, "role") == Some("slave")
                && field(&repl, "master_link_status") != Some("up")
            {
                return None;
            }
        }
        Some(())
    }

    /// The ports of the nodes still running.
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The directory of the nodes' files (`nodes-<port>.conf`).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fred URL with every running node as a seed:
    /// `redis-cluster://127.0.0.1:p1?node=127.0.0.1:p2&node=127.0.0.1:p3...`.
    pub(crate) fn seed_url(&self) -> String {
        let mut ports = self.ports().into_iter();
        let first = ports.next().expect("a node is running");
        let rest: Vec<String> = ports.map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// The topology as the first running node that answers sees it.
    async fn view(&self) -> Option<Vec<ClusterNode>> {
        for n in &self.nodes {
            if let Some(text) = cli(n.port, &["CLUSTER", "NODES"]).await {
                return Some(parse_cluster_nodes(&text));
            }
        }
        None
    }

    /// The port of the primary serving `key`'s hash slot (hash tags count). Panics when no
    /// working primary serves it (e.g. between a kill and the replica's promotion).
    pub(crate) async fn primary_of(&self, key: &str) -> u16 {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let view = self.view().await.expect("a cluster node answers");
        owner(&view, slot).unwrap_or_else(|| panic!("no working primary serves slot {slot}"))
    }

    /// SIGKILLs the node on `port` (a crash) and forgets it; no waiting for the cluster.
    pub(crate) async fn kill_node(&mut self, port: u16) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no running node on port {port}"));
        let mut node = self.nodes.remove(i);
        node.kill().await;
    }

    /// Starts a killed node again on its port with its arguments and node file: it rejoins
    /// the cluster as a replica of the primary that took over its slots. Returns once it is
    /// in sync.
    pub(crate) async fn restart_node(&mut self, port: u16) {
        let args = self
            .args
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| a.clone())
            .expect("a node this cluster started");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let node = localstack::redis_on(self.dir.path(), port, &args)
            .await
            .expect("the node starts again");
        self.nodes.push(node);
        synced_replica(
            port,
            "the restarted node syncs as a replica",
            SETTLE_TIMEOUT,
        )
        .await;
    }

    /// SIGKILLs the primary serving `key`, then waits until every running node reports
    /// `cluster_state:ok` with the slot served by another, working primary (its promoted
    /// replica), which answers `ROLE` as master. Returns the new primary's port.
    pub(crate) async fn kill_primary_of(&mut self, key: &str) -> u16 {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let old = self.primary_of(key).await;
        self.kill_node(old).await;
        let this = &*self;
        eventually("a replica takes over", FAILOVER_TIMEOUT, || async move {
            let mut new = None;
            for n in &this.nodes {
                let info = cli(n.port, &["CLUSTER", "INFO"]).await?;
                if field(&info, "cluster_state") != Some("ok") {
                    return None;
                }
                let view = parse_cluster_nodes(&cli(n.port, &["CLUSTER", "NODES"]).await?);
                let port = owner(&view, slot).filter(|&p| p != old)?;
                if new.is_some_and(|q| q != port) {
                    return None;
                }
                new = Some(port);
            }
            let role = cli(new?, &["ROLE"]).await?;
            (role.lines().next() == Some("master")).then_some(new?)
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------
// Redis Sentinel
// ------------------------------------------------------------------------------------------

/// A running `redis-server <conf> --sentinel`, killed on drop.
struct SentinelProcess {
    port: u16,
    _child: Child,
}

/// A primary and a replica watched by three sentinels (quorum 2, `down-after-milliseconds
/// 1000`, `failover-timeout 5000`), on loopback. Every process is killed when this drops.
pub(crate) struct RedisSentinel {
    /// The data servers still running: the one started as primary, the one started as replica.
    servers: Vec<Service>,
    replica_port: u16,
    replica_pid: u32,
    sentinels: Vec<SentinelProcess>,
    dir: tempfile::TempDir,
}

impl RedisSentinel {
    /// Starts the primary and the replica (`--replicaof`), waits for `master_link_status:up`,
    /// then starts three sentinels and returns once each one monitors the primary, knows the
    /// replica and both other sentinels.
    pub(crate) async fn start() -> RedisSentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let fast_sync = || vec!["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let primary = server(dir.path(), |_| fast_sync()).await;
        let primary_port = primary.port;
        let replica = server(dir.path(), |_| {
            let mut a = fast_sync();
            a.extend(["--replicaof", "127.0.0.1", &primary_port.to_string()].map(String::from));
            a
        })
        .await;
        let replica_port = replica.port;
        eventually("the replica syncs", SETTLE_TIMEOUT, || async {
            let info = cli(replica_port, &["INFO", "replication"]).await?;
            (field(&info, "master_link_status") == Some("up")).then_some(())
        })
        .await;
        let replica_pid = pid_of(replica_port).await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            sentinels.push(Self::sentinel(dir.path(), i, primary_port).await);
        }
        let set = RedisSentinel {
            servers: vec![primary, replica],
            replica_port,
            replica_pid,
            sentinels,
            dir,
        };
        eventually("the sentinels know each other", SETTLE_TIMEOUT, || {
            set.sentinels_settled()
        })
        .await;
        set
    }

    /// Starts sentinel `i` on a free port (retried on a clash) with a writable config file,
    /// and waits until it answers `PING`.
    async fn sentinel(dir: &Path, i: usize, primary_port: u16) -> SentinelProcess {
        let bin = localstack::find_tool("redis-server", "HOKUSAI_REDIS_SERVER")
            .expect("redis-server (make tools)");
        for _ in 0..5 {
            let port = localstack::free_port();
            let conf: PathBuf = dir.join(format!("sentinel-{i}.conf"));
            let text = format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 dir \"{dir}\"\n\
                 sentinel resolve-hostnames no\n\
                 sentinel monitor {SERVICE_NAME} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {SERVICE_NAME} 1000\n\
                 sentinel failover-timeout {SERVICE_NAME} 5000\n\
                 sentinel parallel-syncs {SERVICE_NAME} 1\n",
                dir = dir.display(),
            );
            std::fs::write(&conf, text).expect("sentinel config written");
            let log = std::fs::File::create(dir.join(format!("sentinel-{i}.log"))).expect("log");
            let mut child = Command::new(&bin)
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server --sentinel starts");
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break; // Exited: most likely the port was taken meanwhile; try another.
                }
                if cli(port, &["PING"]).await.as_deref().map(str::trim) == Some("PONG") {
                    return SentinelProcess {
                        port,
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill().await;
        }
        panic!("sentinel {i} did not start; see {}", dir.display());
    }

    /// `Some` when every sentinel monitors a primary with one replica and two other sentinels.
    async fn sentinels_settled(&self) -> Option<()> {
        for s in &self.sentinels {
            let text = cli(s.port, &["SENTINEL", "MASTER", SERVICE_NAME]).await?;
            let lines: Vec<&str> = text.lines().collect();
            let get = |k: &str| {
                lines
                    .chunks(2)
                    .find(|c| c[0] == k)
                    .and_then(|c| c.get(1).copied())
            };
            if get("flags") != Some("master")
                || get("num-slaves") != Some("1")
                || get("num-other-sentinels") != Some("2")
            {
                return None;
            }
        }
        Some(())
    }

    /// The sentinel service name: `mymaster`.
    pub(crate) fn service_name(&self) -> &'static str {
        SERVICE_NAME
    }

    /// The sentinels' ports.
    pub(crate) fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The directory of the sentinels' config files and logs (`sentinel-<i>.{conf,log}`).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fred URL naming all three sentinels (the first as host, the others as `node`s):
    ///
    /// `redis-sentinel://127.0.0.1:s1?sentinelServiceName=mymaster&node=127.0.0.1:s2&node=127.0.0.1:s3`
    pub(crate) fn sentinel_url(&self) -> String {
        let ports = self.sentinel_ports();
        let rest: String = ports[1..]
            .iter()
            .map(|p| format!("&node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SERVICE_NAME}{rest}",
            ports[0]
        )
    }

    /// The primary's port as the first sentinel that answers reports it
    /// (`SENTINEL get-master-addr-by-name mymaster`).
    pub(crate) async fn primary_port(&self) -> u16 {
        for s in &self.sentinels {
            if let Some(p) = Self::primary_per(s.port).await {
                return p;
            }
        }
        panic!("no sentinel knows the primary of {SERVICE_NAME}");
    }

    async fn primary_per(sentinel: u16) -> Option<u16> {
        let text = cli(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", SERVICE_NAME],
        )
        .await?;
        text.lines().nth(1)?.trim().parse().ok()
    }

    /// SIGKILLs the current primary, then waits until every sentinel names another server as
    /// the primary and that server answers `ROLE` as master. Returns the new primary's port.
    pub(crate) async fn kill_primary(&mut self) -> u16 {
        let old = self.primary_port().await;
        let i = self
            .servers
            .iter()
            .position(|s| s.port == old)
            .unwrap_or_else(|| panic!("the primary on {old} is not running"));
        let mut primary = self.servers.remove(i);
        primary.kill().await;
        let this = &*self;
        eventually(
            "the sentinels promote the replica",
            FAILOVER_TIMEOUT,
            || async move {
                let mut seen = HashSet::new();
                for s in &this.sentinels {
                    seen.insert(Self::primary_per(s.port).await?);
                }
                let new = *seen.iter().next()?;
                if seen.len() != 1 || new == old {
                    return None;
                }
                let role = cli(new, &["ROLE"]).await?;
                (role.lines().next() == Some("master")).then_some(new)
            },
        )
        .await
    }

    /// Starts the server killed by [`RedisSentinel::kill_primary`] again on its port; the
    /// sentinels turn it into a replica of the new primary. Returns once it is in sync.
    pub(crate) async fn restart_old_primary(&mut self, port: u16) {
        let server =
            localstack::redis_on(self.dir.path(), port, &["--repl-diskless-sync-delay", "0"])
                .await
                .expect("the old primary starts again");
        self.servers.push(server);
        synced_replica(
            port,
            "the sentinels make the old primary a replica",
            FAILOVER_TIMEOUT,
        )
        .await;
    }

    /// The port of the server started as the replica (the primary once
    /// [`RedisSentinel::kill_primary`] has run).
    pub(crate) fn replica_port(&self) -> u16 {
        self.replica_port
    }

    /// The pid of the server started as the replica.
    pub(crate) fn replica_pid(&self) -> u32 {
        self.replica_pid
    }

    /// Freezes the replica (SIGSTOP): its connections stay open but nothing answers.
    pub(crate) fn stop_replica(&self) {
        signal(self.replica_pid, "STOP");
    }

    /// Resumes the replica (SIGCONT) after [`RedisSentinel::stop_replica`].
    pub(crate) fn cont_replica(&self) {
        signal(self.replica_pid, "CONT");
    }
}

// ------------------------------------------------------------------------------------------
// Smoke tests
// ------------------------------------------------------------------------------------------

/// What a client saw while writing a key every 100 ms: the errors (with the time since it
/// began), and how soon after the `since` mark its first write succeeded.
#[derive(Default)]
struct Writes {
    errors: Vec<(Duration, String)>,
    ok_after_since: Option<Duration>,
    since: Option<Instant>,
}

/// Writes `key` every 100 ms until `stop` is set, recording into `log`.
fn keep_writing(
    client: Client,
    key: &'static str,
    log: Arc<Mutex<Writes>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let start = Instant::now();
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let r: Result<(), _> = client.set(key, i, None, None, false).await;
            {
                let mut w = log.lock().unwrap();
                match r {
                    Err(e) => w.errors.push((start.elapsed(), e.to_string())),
                    Ok(()) => {
                        if let (Some(since), None) = (w.since, w.ok_after_since) {
                            w.ok_after_since = Some(since.elapsed());
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Retries `SET key value` + `GET key` until both succeed, for up to `within`; returns how
/// long it took.
async fn write_read(client: &Client, key: &str, value: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let r: Result<Option<String>, fred::error::Error> = async {
            let _: () = client.set(key, value, None, None, false).await?;
            client.get(key).await
        }
        .await;
        match r {
            Ok(v) => {
                assert_eq!(v.as_deref(), Some(value), "{key} reads back");
                return start.elapsed();
            }
            Err(e) => {
                assert!(
                    start.elapsed() < within,
                    "{key}: no write within {within:?}: {e}"
                );
                eprintln!("{:>6.2?} {key}: {e}", start.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Prints fred's connection events (errors, reconnections, cluster changes) with the time
/// since `t0`, so that a test's output shows how the client went through a failover.
fn print_events(client: &Client, t0: Instant) {
    client.on_error(move |(e, server)| async move {
        eprintln!("{:>8.2?} fred error ({server:?}): {e}", t0.elapsed());
        Ok(())
    });
    client.on_reconnect(move |server| async move {
        eprintln!("{:>8.2?} fred reconnected to {server}", t0.elapsed());
        Ok(())
    });
    client.on_cluster_change(move |changes| async move {
        eprintln!("{:>8.2?} fred cluster change: {changes:?}", t0.elapsed());
        Ok(())
    });
}

fn report(what: &str, log: &Mutex<Writes>) {
    let w = log.lock().unwrap();
    eprintln!(
        "{what}: first background write after the failover: {:?}; {} errors in all",
        w.ok_after_since,
        w.errors.len()
    );
    let mut distinct = BTreeSet::new();
    for (t, e) in &w.errors {
        if distinct.insert(e.clone()) {
            eprintln!("  {t:>8.2?} {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_primaries_serves_every_slot_and_promotes_a_replica() {
    let t = Instant::now();
    let mut cluster = RedisCluster::start().await;
    eprintln!(
        "cluster up in {:?}: {} ({})",
        t.elapsed(),
        cluster.seed_url(),
        cluster.dir().display()
    );

    let client = fred_client(&cluster.seed_url());
    client.init().await.expect("the cluster client connects");
    let t0 = Instant::now();
    print_events(&client, t0);

    let keys: Vec<String> = (0..10).map(|i| format!("hokusai-ha:{i}")).collect();
    let mut primaries = BTreeSet::new();
    let mut slots = BTreeSet::new();
    for k in &keys {
        slots.insert(fred::util::redis_keyslot(k.as_bytes()));
        primaries.insert(cluster.primary_of(k).await);
    }
    assert_eq!(slots.len(), keys.len(), "the keys hash to different slots");
    assert_eq!(primaries.len(), 3, "the keys reach every primary");
    for (i, k) in keys.iter().enumerate() {
        let _: () = client
            .set(k.as_str(), i, None, None, false)
            .await
            .expect("set");
    }
    for (i, k) in keys.iter().enumerate() {
        let v: Option<u64> = client.get(k.as_str()).await.expect("get");
        assert_eq!(v, Some(i as u64), "{k}");
    }

    let key = "{hokusai}:x";
    let _: () = client
        .set(key, "before", None, None, false)
        .await
        .expect("set");
    let old = cluster.primary_of(key).await;

    let log = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(client.clone(), "{hokusai}:bg", log.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    eprintln!("{:>8.2?} killing the primary of {key}", t0.elapsed());
    let t = Instant::now();
    let new = cluster.kill_primary_of(key).await;
    let failover = t.elapsed();
    log.lock().unwrap().since = Some(Instant::now());
    assert_ne!(new, old);
    assert_eq!(cluster.primary_of(key).await, new);
    assert_eq!(cluster.ports().len(), 5);
    eprintln!(
        "{:>8.2?} cluster failover {old} -> {new} took {failover:?}",
        t0.elapsed()
    );

    let took = write_read(&client, key, "after", Duration::from_secs(10)).await;
    eprintln!("the client wrote {key} {took:?} after the failover");
    assert_eq!(
        cli(new, &["GET", key]).await.as_deref().map(str::trim),
        Some("after"),
        "the write went to the promoted replica"
    );
    for (i, k) in keys.iter().enumerate() {
        let v: Option<u64> = client.get(k.as_str()).await.expect("every slot is served");
        if v != Some(i as u64) {
            eprintln!("{k} after the failover: {v:?} (a write the replica had not received)");
        }
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    report("cluster", &log);
    let _ = client.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_set_follows_the_primary_through_failover() {
    let t = Instant::now();
    let mut set = RedisSentinel::start().await;
    eprintln!(
        "sentinel set up in {:?}: {} ({})",
        t.elapsed(),
        set.sentinel_url(),
        set.dir().display()
    );
    assert_eq!(set.service_name(), "mymaster");

    let old = set.primary_port().await;
    assert_ne!(old, set.replica_port());
    assert_eq!(pid_of(set.replica_port()).await, set.replica_pid());
    let client = fred_client(&set.sentinel_url());
    client.init().await.expect("the sentinel client connects");
    let t0 = Instant::now();
    print_events(&client, t0);
    let _: () = client
        .set("{hokusai}:s", "before", None, None, false)
        .await
        .expect("set");
    let v: Option<String> = client.get("{hokusai}:s").await.expect("get");
    assert_eq!(v.as_deref(), Some("before"));

    // The replica can be frozen and resumed.
    set.stop_replica();
    assert_eq!(cli(set.replica_port(), &["PING"]).await, None, "stopped");
    set.cont_replica();
    let pong = cli(set.replica_port(), &["PING"]).await;
    assert_eq!(pong.as_deref().map(str::trim), Some("PONG"), "resumed");

    let log = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(client.clone(), "{hokusai}:bg", log.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    eprintln!("{:>8.2?} killing the primary", t0.elapsed());
    let t = Instant::now();
    let new = set.kill_primary().await;
    let failover = t.elapsed();
    log.lock().unwrap().since = Some(Instant::now());
    eprintln!(
        "{:>8.2?} sentinel failover {old} -> {new} took {failover:?}",
        t0.elapsed()
    );
    assert_ne!(new, old);
    assert_eq!(new, set.replica_port(), "the replica is the primary now");
    assert_eq!(set.primary_port().await, new);

    let took = write_read(&client, "{hokusai}:s", "after", Duration::from_secs(15)).await;
    eprintln!("the client wrote {{hokusai}}:s {took:?} after the failover");
    assert_eq!(
        cli(new, &["GET", "{hokusai}:s"])
            .await
            .as_deref()
            .map(str::trim),
        Some("after"),
        "the write went to the new primary"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    report("sentinel", &log);
    let _ = client.quit().await;
}
