"""A real Apache Kafka broker on this machine, installed and run by segflow itself.

On first use the broker's jars (``org.apache.kafka:kafka_2.13`` plus log4j) are fetched
from Maven Central into a cache with Maven's ``dependency:copy-dependencies``. The broker is
one combined KRaft node (broker and controller) on 127.0.0.1; its data directory is kept
across restarts and its output goes to ``broker.log`` next to it.

::

    broker = LocalBroker(Path(".segflow/broker"))
    broker.start()            # installs, formats once, starts, waits until it answers
    broker.bootstrap          # '127.0.0.1:9092'
    broker.stop()
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from segflow.errors import BrokerError
from segflow.runtime.leash import leashed

log = logging.getLogger("segflow.broker")

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
DEFAULT_PORT = 9092

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.segflow</groupId>
  <artifactId>segflow-kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
"""


def cache_dir() -> Path:
    """Where the jars are cached: ``$SEGFLOW_CACHE_DIR`` or ``~/.cache/segflow``."""
    env = os.environ.get("SEGFLOW_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segflow"


def new_cluster_id() -> str:
    """A KRaft cluster id: 22 base64url characters of a UUID, never starting with '-'.

    >>> cid = new_cluster_id()
    >>> len(cid), cid[0] != "-"
    (22, True)
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 12000)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, which outgoing
    connections also draw from: by the time a child process listens on it, a Kafka client's
    long-lived connection may hold it (a service then fails to start with EADDRINUSE, again
    on every restart; seen in the console tests). Ports below that range are only ever taken
    by listeners, so checking that one is free now is enough. One process never gets the same
    port twice.
    """
    top = _ephemeral_floor()
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(10000, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:  # a crowded machine: whatever the kernel gives
        sock.bind(("127.0.0.1", 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(
            f"{tool} was not found on PATH; the local Kafka broker needs it. {hint} "
            "Or point segflow at an existing broker with KAFKA_BOOTSTRAP_SERVERS."
        )
    return path


def java_major_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    text = out.stderr + out.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not match:
        raise BrokerError(f"could not read the Java version from: {text.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def install(version: str = KAFKA_VERSION, quiet: bool = False) -> Path:
    """Fetch the broker jars from Maven Central once; returns the folder of jars."""
    target = cache_dir() / f"kafka-{version}"
    libs = target / "libs"
    marker = target / ".complete"
    if marker.exists():
        return libs
    java = _require(
        "java", "Install Java 17 or newer (e.g. apt-get install openjdk-17-jre-headless)."
    )
    if java_major_version(java) < 17:
        raise BrokerError("Kafka 4 needs Java 17 or newer; `java -version` reports an older one")
    mvn = _require("mvn", "Install Apache Maven (e.g. apt-get install maven) to fetch the jars.")
    target.mkdir(parents=True, exist_ok=True)
    (target / "pom.xml").write_text(POM.format(kafka=version, log4j=LOG4J_VERSION))
    if libs.exists():
        shutil.rmtree(libs)
    if not quiet:
        print(f"segflow: fetching Apache Kafka {version} jars from Maven Central into {libs}")
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(target / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={libs}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(libs.glob(f"kafka_2.13-{version}.jar")):
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise BrokerError(f"Maven could not fetch Kafka {version}: {tail}")
    marker.write_text(version)
    return libs


@dataclass
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_file: Path


class LocalBroker:
    """One single-node KRaft Kafka broker, its files under ``home``."""

    def __init__(
        self,
        home: Path,
        port: int = DEFAULT_PORT,
        controller_port: int | None = None,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        extra: dict[str, str] | None = None,
    ) -> None:
        """``extra``: more server properties, over the defaults (e.g. for a test)."""
        self.home = home.resolve()
        self.port = port
        self.controller_port = controller_port or port + 1
        self.version = version
        self.heap = heap
        self.extra = dict(extra or {})
        self.data_dir = self.home / "data"
        self.log_file = self.home / "broker.log"
        self.pid_file = self.home / "broker.pid"
        self.config_file = self.home / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- files ---------------------------------------------------------------------------
    def _properties(self) -> str:
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={self.data_dir}",
                "num.partitions=4",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "log.cleaner.dedupe.buffer.size=33554432",
                "log.cleaner.enable=true",
                "auto.create.topics.enable=false",
                "log.retention.hours=-1",
                "transaction.max.timeout.ms=900000",
                # How often the transaction coordinator looks for transactions past their
                # timeout and aborts them (Kafka's default: every 10 s). A transaction left
                # open by a producer killed with kill -9 blocks read_committed readers, and
                # a partition's restore by its new owner (segflow.runtime.state), until that
                # abort: checking every second ends the wait within ~1 s of the timeout
                # instead of up to 10 s later. The check is a scan of this one broker's
                # in-memory transaction states: cheap for the few producers run here.
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
                *(f"{key}={value}" for key, value in self.extra.items()),
                "",
            ]
        )

    def _configure(self, libs: Path) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._properties())
        (self.home / "log4j2.properties").write_text(LOG4J2)
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self._java(libs),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            new_cluster_id(),
            "-c",
            str(self.config_file),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(
                f"formatting {self.data_dir} failed: {(result.stdout + result.stderr)[-1500:]}"
            )

    def _java(self, libs: Path) -> list[str]:
        return [
            _require("java", "Install Java 17 or newer."),
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:ParallelGCThreads=2",
            "-XX:ConcGCThreads=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.home}",
            "-cp",
            f"{libs}/*",
        ]

    # -- process -------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid if it is running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"kafka.Kafka" not in cmdline or str(self.config_file).encode() not in cmdline:
            return None
        return pid

    def _alive(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:  # our child: /proc cmdline may not show java until exec
            return proc.poll() is None
        return self.pid() is not None

    def status(self) -> BrokerStatus:
        pid = self.pid()
        return BrokerStatus(pid is not None, pid, self.bootstrap, self.data_dir, self.log_file)

    def start(self, timeout: float = 90.0, leash: bool = False) -> None:
        """Install if needed, format once, start, and wait until it accepts requests.

        ``leash``: the broker dies with this process, however it dies (SIGKILL included;
        see :mod:`segflow.runtime.leash`). ``segflow broker start`` leaves it off (the broker
        is meant to outlive the command); the demo, ``up`` and the test fixtures turn it on."""
        if self.pid() is not None:
            self.wait_ready(timeout)
            return
        libs = install(self.version)
        self._configure(libs)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                raise BrokerError(
                    f"port {self.port} on 127.0.0.1 is already taken by another process; "
                    "choose another with --port or SEGFLOW_BROKER_PORT"
                )
        logf = self.log_file.open("ab")
        argv = [*self._java(libs), "kafka.Kafka", str(self.config_file)]
        proc = subprocess.Popen(
            leashed(argv) if leash else argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
            start_new_session=True,
        )
        logf.close()
        self.pid_file.write_text(str(proc.pid))
        self._proc = proc
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll until the broker answers a metadata request (not just a TCP connect)."""
        from segflow.runtime.kafka import make_admin
        from segflow.runtime.settings import Settings

        deadline = time.monotonic() + timeout
        admin = None  # one client for all the checks, made once the port listens
        try:
            while time.monotonic() < deadline:
                if not self._alive():
                    raise BrokerError(
                        f"the broker exited during start-up; see {self.log_file}:\n"
                        + self._log_tail()
                    )
                with socket.socket() as sock:
                    sock.settimeout(1.0)
                    listening = sock.connect_ex(("127.0.0.1", self.port)) == 0
                if listening:
                    admin = admin or make_admin(Settings(bootstrap_servers=self.bootstrap))
                    try:
                        md = admin.list_topics(timeout=5)
                        if md.brokers:
                            return
                    except Exception:  # not ready yet (KafkaException / timeouts)
                        pass
                time.sleep(0.2)
        finally:
            if admin is not None:
                admin.__exit__(None, None, None)  # destroys the client now
        raise BrokerError(
            f"the broker did not become ready in {timeout:.0f}s; see "
            f"{self.log_file}:\n" + self._log_tail()
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); False if not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker at once (failure tests)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        proc = getattr(self, "_proc", None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.pid == pid:
                if proc.poll() is not None:
                    return True
            elif not Path(f"/proc/{pid}").exists():
                return True
            else:
                try:  # reap if it happens to be our child
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return True
                except ChildProcessError:
                    stat = Path(f"/proc/{pid}/stat")
                    try:
                        if stat.read_text().split(")")[-1].split()[0] == "Z":
                            return True
                    except OSError:
                        return True
            time.sleep(0.1)
        return False
