#!/usr/bin/env python3
"""Side-by-side benchmark of Warren and RabbitMQ on this machine (driven by bench/run.sh).

Starts a single node and a 3-node cluster of each broker on loopback, runs the scenarios of
docs/benchmarks.md against both with the same load generator (warren-perf), interleaved and
repeated, prints every run as it finishes and then a table of medians with the
Warren/RabbitMQ ratio, and for every run the share of the machine's CPU time the hypervisor
took meanwhile (`host steal %`, from /proc/stat: on a shared VM, how far to trust the run).
RabbitMQ runs quorum queues on its cluster and a classic durable queue
on its single node (the 1-node reference). Raw results go to $BENCH_OUT (JSON lines).

Settings (environment):
  BENCH_SCENARIOS  comma-separated subset of: single,1,2,3,4,5,6,7,8,9,10 (default: all)
  BENCH_REPEATS    runs per broker of the throughput and latency scenarios (default 3)
  BENCH_COUNT      messages per throughput run (default 20000)
  BENCH_BACKLOG    backlog for scenarios 6, 8 and 9 (default 1000000)
  BENCH_IDLE_QUEUES  queues for scenario 7 (default 10000)
  BENCH_OUT        where the raw results go (default: a file in the work directory)
  BENCH_BASELINE   a directory with `warren` and `warrenctl` of another Warren build: it runs
                   as a third broker in every round, and the table adds this build's ratio to
                   it (what a change gained, measured in the same run)
  BENCH_MAX_STEAL  a run of scenarios single and 1-5 during which the hypervisor took more
                   than this percentage of the machine's CPU time (steal in /proc/stat) is
                   not counted and runs again, up to 3 times (default 5; the last attempt
                   counts whatever its steal). Either broker's runs alike: on a shared VM a
                   neighbour's burst otherwise decides the ratio
  BENCH_NODE_THREADS  scheduler threads of each node of the 3-node clusters, the same for
                   both brokers: Warren's `resources.worker_threads`, RabbitMQ's `+S N:N`
                   (default: each broker's own default, one per CPU, so three nodes on one
                   machine oversubscribe it). Single nodes keep their defaults.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/warren/target"))
WARREN = os.path.join(TARGET, "release", "warren")
WARRENCTL = os.path.join(TARGET, "release", "warrenctl")
PERF = os.path.join(TARGET, "release", "warren-perf")
RABBIT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
COUNT = int(os.environ.get("BENCH_COUNT", "20000"))
BACKLOG = int(os.environ.get("BENCH_BACKLOG", "1000000"))
IDLE_QUEUES = int(os.environ.get("BENCH_IDLE_QUEUES", "10000"))
ALL = ["single", "1", "2", "3", "4", "5", "10", "6", "8", "9", "7"]
SCENARIOS = [s for s in ALL if s in os.environ.get("BENCH_SCENARIOS", ",".join(ALL)).split(",")]
TICK = os.sysconf("SC_CLK_TCK")
BASELINE = os.environ.get("BENCH_BASELINE")
MAX_STEAL = float(os.environ.get("BENCH_MAX_STEAL", "5"))
STEAL_RETRIES = 3
# Scenarios that can simply run again; the others change the cluster (kills, backlogs) or
# take minutes.
RETRIED = ("single", "1", "2", "3", "4", "5")
NODE_THREADS = os.environ.get("BENCH_NODE_THREADS")
STARTUP_LIMIT = 180  # seconds a broker may take to start before the benchmark gives up
STOP_LIMIT = 300  # seconds a RabbitMQ node may take to stop before it is killed


def log(msg):
    print(msg, flush=True)


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def host_cpu_ticks():
    """(stolen, total) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def wait_until(what, check, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {limit}s waiting for {what}")


def perf(args, timeout=3600):
    """Runs warren-perf with --json and returns its report."""
    out = subprocess.run([PERF, "--json", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"warren-perf {' '.join(args)} failed: "
                           f"{out.stderr.strip()} {out.stdout.strip()[-2000:]}")
    return json.loads(out.stdout)


class Warren:
    """A Warren node or cluster; node i listens for AMQP on base+i, for peers on base+100+i."""

    kind = "warren"

    def __init__(self, work, nodes, base, bin_dir=None):
        self.warren = os.path.join(bin_dir, "warren") if bin_dir else WARREN
        self.warrenctl = os.path.join(bin_dir, "warrenctl") if bin_dir else WARRENCTL
        if bin_dir:
            self.kind = "baseline"
        self.dir = os.path.join(work, f"{self.kind}{nodes}")
        self.nodes = nodes
        self.base = base
        self.procs = {}

    def amqp_port(self, i):
        return self.base + i

    def uri(self, i):
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port(i)}/%2f"

    def queue_args(self):
        return []

    def _members(self):
        return ",".join(f"{i}@127.0.0.1:{self.base + 100 + i}" for i in range(1, self.nodes + 1))

    def start_node(self, i):
        node_dir = os.path.join(self.dir, f"node{i}")
        os.makedirs(node_dir, exist_ok=True)
        cmd = [self.warren, "--data-dir", os.path.join(node_dir, "data"),
               "--amqp-listen", f"127.0.0.1:{self.amqp_port(i)}", "--http-listen", "off"]
        if self.nodes > 1:
            cmd += ["--node-id", str(i), "--cluster-listen", f"127.0.0.1:{self.base + 100 + i}",
                    "--members", self._members()]
        else:
            cmd += ["--cluster-listen", "off"]
        env = dict(os.environ)
        if NODE_THREADS and self.nodes > 1:
            env["WARREN_WORKER_THREADS"] = NODE_THREADS
            # A baseline build from before the setting reads its runtime's own variable.
            env["TOKIO_WORKER_THREADS"] = NODE_THREADS
        out = open(os.path.join(node_dir, "stdout.log"), "w")
        err = open(os.path.join(node_dir, "warren.log"), "a")
        self.procs[i] = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)

    def ready(self, i):
        try:
            with open(os.path.join(self.dir, f"node{i}", "stdout.log")) as f:
                return "warren: ready" in f.read()
        except FileNotFoundError:
            return False

    def start(self):
        for i in range(1, self.nodes + 1):
            self.start_node(i)
        wait_until("warren to start",
                   lambda: all(self.ready(i) for i in range(1, self.nodes + 1)), STARTUP_LIMIT)

    def pids(self):
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def kill9(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def restart(self, i):
        self.start_node(i)
        wait_until(f"warren node {i} to restart", lambda: self.ready(i), STARTUP_LIMIT)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def leader_of(self, queue):
        """The node leading `queue`'s Raft group (1 for a single node)."""
        if self.nodes == 1:
            return 1
        for _ in range(100):
            out = subprocess.run([self.warrenctl, "--node", f"127.0.0.1:{self.base + 101}", "status"],
                                 capture_output=True, text=True, timeout=30).stdout
            for line in out.splitlines():
                cols = line.split()
                if len(cols) >= 3 and cols[1] == "//" + queue and cols[2].isdigit():
                    return int(cols[2])
            time.sleep(0.1)
        raise RuntimeError(f"no leader known for {queue}")


class Rabbit:
    """A RabbitMQ node or cluster from Debian's package; node i on port base+i."""

    kind = "rabbitmq"

    def __init__(self, work, nodes, base):
        self.dir = os.path.join(work, f"rabbit{nodes}")
        self.nodes = nodes
        self.base = base
        self.home = os.path.join(self.dir, "home")

    def amqp_port(self, i):
        return self.base + i

    def uri(self, i):
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port(i)}/%2f"

    def queue_args(self):
        return ["x-queue-type=quorum"] if self.nodes > 1 else []

    def name(self, i):
        return f"bench{self.nodes}n{i}@localhost"

    def _env(self, i):
        node_dir = os.path.join(self.dir, f"node{i}")
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.name(i),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port(i)),
            "RABBITMQ_DIST_PORT": str(self.base + 100 + i),
            "RABBITMQ_MNESIA_BASE": os.path.join(node_dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(node_dir, "log"),
            "RABBITMQ_PID_FILE": os.path.join(node_dir, "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.dir, "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "HOME": self.home,
        })
        if NODE_THREADS and self.nodes > 1:
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"+S {NODE_THREADS}:{NODE_THREADS}"
        return env

    def ctl(self, i, *args, timeout=120):
        return subprocess.run([RABBITMQCTL, "-n", self.name(i), *args], env=self._env(i),
                              capture_output=True, text=True, timeout=timeout)

    def start_node(self, i):
        node_dir = os.path.join(self.dir, f"node{i}")
        os.makedirs(node_dir, exist_ok=True)
        out = open(os.path.join(node_dir, "server.out"), "a")
        subprocess.Popen(["setsid", RABBIT_SERVER], env=self._env(i), stdout=out,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def await_node(self, i):
        wait_until(f"rabbitmq node {i}",
                   lambda: self.ctl(i, "await_startup", "--timeout", "5").returncode == 0,
                   STARTUP_LIMIT)

    def start(self):
        os.makedirs(self.home, exist_ok=True)
        cookie = os.path.join(self.home, ".erlang.cookie")
        if not os.path.exists(cookie):
            with open(cookie, "w") as f:
                f.write("WARRENBENCHCOOKIE")
            os.chmod(cookie, 0o400)
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write("loopback_users = none\n")
        open(os.path.join(self.dir, "rabbitmq-env.conf"), "w").close()
        fresh = not os.path.exists(os.path.join(self.dir, "node1", "mnesia"))
        for i in range(1, self.nodes + 1):
            self.kill_leftover(i)
            self.start_node(i)
        for i in range(1, self.nodes + 1):
            self.await_node(i)
        if fresh:
            for i in range(2, self.nodes + 1):
                for step in (["stop_app"], ["join_cluster", self.name(1)], ["start_app"]):
                    r = self.ctl(i, *step)
                    if r.returncode != 0:
                        raise RuntimeError(f"rabbitmq node {i} {step}: {r.stderr.strip()}")

    def kill_leftover(self, i):
        """A node of this name left running by an interrupted benchmark would take the new
        node's place in the cluster: it is killed first."""
        r = self.ctl(i, "eval", "list_to_integer(os:getpid()).", timeout=30)
        if r.returncode == 0 and r.stdout.strip().isdigit():
            pid = int(r.stdout.strip())
            log(f"bench: killing rabbitmq node {self.name(i)} left running (pid {pid})")
            os.kill(pid, signal.SIGKILL)
            wait_until("the left-over node to exit", lambda: not os.path.exists(f"/proc/{pid}"), 30)

    def pid(self, i):
        try:
            with open(os.path.join(self.dir, f"node{i}", "pid")) as f:
                return int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def pids(self):
        return [p for p in (self.pid(i) for i in range(1, self.nodes + 1)) if p]

    def kill9(self, i):
        pid = self.pid(i)
        if pid:
            os.kill(pid, signal.SIGKILL)
            wait_until("the killed node to exit", lambda: not os.path.exists(f"/proc/{pid}"), 30)

    def restart(self, i):
        self.start_node(i)
        self.await_node(i)

    def stop(self):
        def stop_node(i):
            try:
                self.ctl(i, "stop", timeout=STOP_LIMIT)
            except subprocess.TimeoutExpired:
                # With 10,000 quorum queues a graceful stop can take minutes.
                log(f"bench: rabbitmq node {i} did not stop within {STOP_LIMIT} s; killing it")
                self.kill9(i)
        # All at once: one after the other, three nodes that each need the whole limit took
        # a quarter of an hour.
        threads = [threading.Thread(target=stop_node, args=(i,)) for i in range(1, self.nodes + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def leader_of(self, queue):
        if self.nodes == 1:
            return 1
        r = self.ctl(1, "list_queues", "name", "leader", "--formatter", "json", "-q")
        for q in json.loads(r.stdout or "[]"):
            if q.get("name") == queue and q.get("leader"):
                m = re.search(r"n(\d+)@", q["leader"])
                if m:
                    return int(m.group(1))
        raise RuntimeError(f"no leader known for {queue}: {r.stdout} {r.stderr}")


# --- scenarios --------------------------------------------------------------------------
# Each takes a broker and a run number and returns {figure: value}. FIGURES says, per figure,
# whether higher is better (for reading the ratio).

FIGURES = {
    "publish msg/s": True, "consume msg/s": True,
    "confirm p50 ms": False, "confirm p99 ms": False,
    "e2e p50 ms": False, "e2e p99 ms": False, "e2e max ms": False,
    "lost": False, "duplicates": False,
    "drain msg/s": True, "drain s": False,
    "cpu % of a core per node": False, "rss MiB per node": False, "declare s": False,
    "rss MiB per node (backlog)": False, "start to first message s": False,
    "failover s": False,
    "host steal %": False,
}


def throughput_figures(r):
    return {
        "publish msg/s": r["publish_rate"], "consume msg/s": r["consume_rate"],
        "confirm p50 ms": r["confirm_latency_us"]["p50"] / 1000,
        "confirm p99 ms": r["confirm_latency_us"]["p99"] / 1000,
        "e2e p50 ms": r["end_to_end_latency_us"]["p50"] / 1000,
        "e2e p99 ms": r["end_to_end_latency_us"]["p99"] / 1000,
        "lost": r["lost"], "duplicates": r["duplicates"],
    }


def common(b, queue, duration=300):
    """Arguments every run shares; `duration` bounds the run in seconds (a backlog needs more
    than the default: it is sized for at least 2,000 msg/s)."""
    return ["--queue", queue, "--size", "1000", "--confirm", "64", "--prefetch", "100",
            "--duration", str(duration), *sum((["--queue-arg", a] for a in b.queue_args()), [])]


def backlog_duration():
    return max(300, BACKLOG // 2000)


def declare(b, queue, node=1, extra=()):
    perf(["--uri", b.uri(node), "--producers", "0", "--consumers", "0", *common(b, queue), *extra])


def scenario_single(b, run):
    q = f"single-{run}"
    return throughput_figures(perf(["--uri", b.uri(1), "--count", str(COUNT), *common(b, q)]))


def scenario_1(b, run):
    q = f"s1-{run}"
    declare(b, q)
    leader = b.leader_of(q)
    return throughput_figures(perf(["--uri", b.uri(leader), "--count", str(COUNT), *common(b, q)]))


def scenario_2(b, run):
    q = f"s2-{run}"
    declare(b, q)
    leader = b.leader_of(q)
    others = [i for i in range(1, b.nodes + 1) if i != leader]
    return throughput_figures(perf(["--uri", b.uri(others[0]), "--consumer-uri", b.uri(others[1]),
                                    "--count", str(COUNT), *common(b, q)]))


def all_uris(b, shift=0):
    return ",".join(b.uri((i + shift) % b.nodes + 1) for i in range(b.nodes))


def scenario_3(b, run):
    q = f"s3-{run}"
    args = ["--queues", "10", "--producers", "10", "--consumers", "10"]
    if b.kind == "rabbitmq":
        args += ["--queue-arg", "x-queue-leader-locator=balanced"]
    return throughput_figures(perf(["--uri", all_uris(b), "--consumer-uri", all_uris(b, 1),
                                    "--count", str(COUNT // 10), *args, *common(b, q)]))


def scenario_4(b, run):
    q = f"s4-{run}"
    return throughput_figures(perf(["--uri", b.uri(1), "--consumer-uri", all_uris(b),
                                    "--exchange", f"fan-{run}", "--exchange-type", "fanout",
                                    "--queues", "5", "--consumers", "5",
                                    "--count", str(COUNT // 5), *common(b, q)]))


def scenario_5(b, run):
    q = f"s5-{run}"
    declare(b, q)
    leader = b.leader_of(q)
    r = perf(["--uri", b.uri(leader), "--rate", "2000", "--count", str(2000 * 15), *common(b, q)])
    f = throughput_figures(r)
    f["e2e max ms"] = r["end_to_end_latency_us"]["max"] / 1000
    return {k: f[k] for k in ("publish msg/s", "e2e p50 ms", "e2e p99 ms", "e2e max ms",
                              "confirm p99 ms", "lost")}


def scenario_10(b, run):
    """Publishes at 500 msg/s through a follower, kills the queue's leader after 5 s: the
    longest wait for a confirm is the time the queue could not take messages."""
    q = f"s10-{run}"
    declare(b, q)
    leader = b.leader_of(q)
    others = [i for i in range(1, b.nodes + 1) if i != leader]
    args = ["--uri", b.uri(others[0]), "--consumer-uri", b.uri(others[1]), "--rate", "500",
            "--count", str(500 * 20), *common(b, q)]
    result = {}
    t = threading.Thread(target=lambda: result.update(perf(args)))
    t.start()
    time.sleep(5)
    b.kill9(leader)
    t.join()
    b.restart(leader)
    return {"failover s": result["confirm_latency_us"]["max"] / 1e6,
            "lost": result["lost"], "duplicates": result["duplicates"]}


def node_usage(b, seconds):
    """Mean CPU (% of one core) and RSS (MiB) per node over `seconds` of idling."""
    pids = b.pids()
    before = {p: proc_cpu_seconds(p) for p in pids}
    time.sleep(seconds)
    cpu = [100 * (proc_cpu_seconds(p) - before[p]) / seconds for p in pids]
    rss = [proc_rss_mib(p) for p in pids]
    return statistics.mean(cpu), statistics.mean(rss)


def scenario_7(b, run):
    q = f"idle-{run}"
    t0 = time.monotonic()
    perf(["--uri", b.uri(1), "--producers", "0", "--consumers", "0", "--queues",
          str(IDLE_QUEUES), *common(b, q)], timeout=7200)
    declared = time.monotonic() - t0
    time.sleep(10)  # let declaration work settle
    cpu, rss = node_usage(b, 30)
    return {"declare s": declared, "cpu % of a core per node": cpu, "rss MiB per node": rss}


def scenario_backlog(b, run):
    """Scenarios 8, 9 and 6 on one backlog: publish it (no consumers), measure RSS per node
    (8), restart every node and time from process start to the first message consumed (9),
    then drain it (6)."""
    q = f"backlog-{run}"
    fill = perf(["--uri", all_uris(b), "--producers", "4", "--consumers", "0", "--queues", "1",
                 "--count", str(BACKLOG // 4), *common(b, q, backlog_duration())],
                timeout=2 * backlog_duration() + 600)
    if fill["confirmed"] < 4 * (BACKLOG // 4):
        raise RuntimeError(f"the backlog fill confirmed {fill['confirmed']} of {BACKLOG}")
    time.sleep(5)
    _, rss = node_usage(b, 5)
    b.stop()
    t0 = time.monotonic()
    b.start()
    leader = b.leader_of(q)
    first = perf(["--uri", b.uri(leader), "--producers", "0", "--consumers", "1", "--expect", "1",
                  *common(b, q)], timeout=600)
    started = time.monotonic() - t0
    # The message taken for the start-up figure is acked: drain the rest.
    remaining = BACKLOG - first["consumed"]
    t1 = time.monotonic()
    drain = perf(["--uri", b.uri(leader), "--producers", "0", "--consumers", "1",
                  "--expect", str(remaining), *common(b, q, backlog_duration())],
                 timeout=2 * backlog_duration() + 600)
    drained = time.monotonic() - t1
    return {"rss MiB per node (backlog)": rss, "start to first message s": started,
            "drain s": drained, "drain msg/s": drain["consumed"] / max(drained, 1e-9)}


SINGLE = {"single": scenario_single}
CLUSTER = {"1": scenario_1, "2": scenario_2, "3": scenario_3, "4": scenario_4, "5": scenario_5,
           "10": scenario_10, "6": scenario_backlog, "7": scenario_7}
TITLES = {
    "single": "single node, 1 queue, 1 producer + 1 consumer (RabbitMQ: classic durable)",
    "1": "3 nodes, 1 queue, producer and consumer on the leader",
    "2": "3 nodes, 1 queue, producer on a follower, consumer on the other",
    "3": "3 nodes, 10 queues, 10 producers, 10 consumers, spread over the nodes",
    "4": "3 nodes, fan-out of each publish to 5 queues, 5 consumers",
    "5": "3 nodes, latency at a fixed 2,000 msg/s",
    "10": "3 nodes, kill -9 of the queue's leader under 500 msg/s",
    "6": f"3 nodes, {BACKLOG:,} backlog: RSS (8), restart to first message (9), drain (6)",
    "7": f"3 nodes, {IDLE_QUEUES:,} idle queues: declare time, CPU and RSS per node",
}


def stop_all(brokers):
    """Stops every broker; a failure to stop one is logged, never lost results."""
    for b in brokers:
        try:
            b.stop()
        except Exception as e:  # noqa: BLE001 - clean-up must go on
            log(f"bench: stopping {b.kind}: {e}")


def main():
    for path in (WARREN, WARRENCTL, PERF):
        if not os.path.exists(path):
            sys.exit(f"bench: {path} is missing (bench/run.sh builds it)")
    work = tempfile.mkdtemp(prefix="warren-bench.")
    out_path = os.environ.get("BENCH_OUT", os.path.join(work, "results.jsonl"))
    results = []
    brokers = []

    def record(scenario, broker, run, figures, counted=True):
        """Appends a run to the raw results; one not counted stays out of the table."""
        row = {"scenario": scenario, "broker": broker, "run": run, "figures": figures}
        if not counted:
            row["not_counted"] = True
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if counted:
            results.append(row)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            log(f"[{time.strftime('%H:%M:%S')}] {scenario} {broker} run {run}: {shown}")

    def run_set(pair, table, names):
        for name in names:
            fn = table[name]
            heavy = name in ("6", "7")
            for run in range(1, (1 if heavy else REPEATS) + 1):
                for b in pair:
                    attempts = 1 + (STEAL_RETRIES if name in RETRIED else 0)
                    for attempt in range(attempts):
                        # On a shared VM the hypervisor may give the cores to someone else
                        # mid-run; the share it took says how far to trust the run.
                        stolen0, total0 = host_cpu_ticks()
                        figures = fn(b, run if attempt == 0 else f"{run}-again{attempt}")
                        stolen1, total1 = host_cpu_ticks()
                        steal = 100 * (stolen1 - stolen0) / max(1, total1 - total0)
                        figures["host steal %"] = steal
                        if steal <= MAX_STEAL or attempt == attempts - 1:
                            record(name, b.kind, run, figures)
                            break
                        log(f"[{time.strftime('%H:%M:%S')}] {name} {b.kind} run {run}: the "
                            f"hypervisor took {steal:.1f} % of the machine (over "
                            f"BENCH_MAX_STEAL={MAX_STEAL:g}); not counted, run again")
                        record(name, b.kind, run, figures, counted=False)

    try:
        single = [s for s in SCENARIOS if s in SINGLE]
        if single:
            pair = [Warren(work, 1, 5800), Rabbit(work, 1, 5820)]
            if BASELINE:
                pair.append(Warren(work, 1, 6000, BASELINE))
            brokers[:] = pair
            for b in pair:
                b.start()
            run_set(pair, SINGLE, single)
            stop_all(pair)
        cluster = [s for s in SCENARIOS if s in CLUSTER or s in ("8", "9")]
        names = [s for s in ALL if s in CLUSTER and (s in cluster or (s == "6" and
                 ("8" in cluster or "9" in cluster)))]
        if names:
            pair = [Warren(work, 3, 5840), Rabbit(work, 3, 5860)]
            if BASELINE:
                pair.append(Warren(work, 3, 6040, BASELINE))
            brokers[:] = pair
            for b in pair:
                b.start()
            run_set(pair, CLUSTER, names)
            stop_all(pair)
        brokers[:] = []
    finally:
        stop_all(brokers)
        if "BENCH_KEEP" not in os.environ:
            shutil.rmtree(work, ignore_errors=True)

    log("")
    log("medians; ratio = Warren / RabbitMQ (for figures where lower is better, < 1 is a win)")
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        log(f"\nscenario {scenario}: {TITLES[scenario]}")
        extra = f" {'baseline':>12} {'/baseline':>9}" if BASELINE else ""
        log(f"  {'figure':<28} {'warren':>12} {'rabbitmq':>12} {'ratio':>8}{extra}")
        rows = [r for r in results if r["scenario"] == scenario]

        def of(broker, fig):
            return [r["figures"][fig] for r in rows if r["broker"] == broker and fig in r["figures"]]

        for fig in FIGURES:
            w, q = of("warren", fig), of("rabbitmq", fig)
            if not w or not q:
                continue
            mw, mq = statistics.median(w), statistics.median(q)
            ratio = f"{mw / mq:.2f}" if mq else "-"
            line = f"  {fig:<28} {mw:>12.4g} {mq:>12.4g} {ratio:>8}"
            base = of("baseline", fig)
            if base:
                mb = statistics.median(base)
                line += f" {mb:>12.4g} {(f'{mw / mb:.2f}' if mb else '-'):>9}"
            log(line)
    log(f"\nraw results: {out_path}")


if __name__ == "__main__":
    main()
