"""A real PostgreSQL on loopback for the usage ledger's tests, the bench and the local
cluster: Debian's ``postgresql`` package (15), one server per state directory.

The server lives in ``STATE_DIR/postgres``: its data directory, its unix socket (inside
the state directory, never ``/var/run/postgresql``) and its log. It listens on a free
loopback port with trust authentication for 127.0.0.1 only, and has a database
``gpuyard`` owned by the superuser ``gpuyard``.

initdb and postgres refuse to run as root. As root they run as ``nobody`` through
``setpriv`` with the ambient capability CAP_DAC_READ_SEARCH: a state directory under
``/root`` (mode 0700) or pytest's ``/tmp/pytest-of-root`` cannot be traversed by
``nobody`` otherwise, so ``runuser -u nobody`` alone fails there. The capability only
lets the server find its directory; what it writes, it owns.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Where Debian's postgresql-15 installs its server programs.
DEBIAN_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"))
DATABASE = "gpuyard"
SUPERUSER = "gpuyard"
START_TIMEOUT = 60.0
#: The unprivileged account the server runs as when we are root.
UNPRIVILEGED_UID = 65534
SERVER_FILE = "server.json"
#: Set to 1 (CI does) to make the unit tests fail, not skip, when initdb is missing.
REQUIRE_ENV = "GPUYARD_REQUIRE_POSTGRES"


class PostgresMissingError(RuntimeError):
    """No initdb here: install Debian's postgresql package (hack/install-system-deps.sh)."""


def bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and pg_isready."""
    for directory in DEBIAN_BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory.resolve() if directory.is_symlink() else directory
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise PostgresMissingError(
        "initdb not found in /usr/lib/postgresql/15/bin, /usr/local/bin or PATH: "
        "install Debian's postgresql package (hack/install-system-deps.sh)"
    )


@dataclass(frozen=True)
class PostgresServer:
    """One server: where it lives and how to reach it."""

    base_dir: str
    port: int
    bin_dir: str

    @property
    def data_dir(self) -> Path:
        return Path(self.base_dir) / "data"

    @property
    def socket_dir(self) -> Path:
        return Path(self.base_dir) / "socket"

    @property
    def log_file(self) -> Path:
        return Path(self.base_dir) / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def save(self) -> None:
        (Path(self.base_dir) / SERVER_FILE).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, base_dir: Path) -> PostgresServer:
        return cls(**json.loads((base_dir / SERVER_FILE).read_text()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return [
        "setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}",
        "--clear-groups", "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
        "--", *args,
    ]  # fmt: skip


def _run(args: list[str], *, what: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.strip()}")


def init(state_dir: Path) -> PostgresServer:
    """A new cluster in ``state_dir/postgres`` (refused if one is there already)."""
    base = state_dir / "postgres"
    if (base / "data").exists():
        raise RuntimeError(f"a PostgreSQL data directory exists already in {base}")
    bins = bin_dir()
    server = PostgresServer(base_dir=str(base), port=_free_port(), bin_dir=str(bins))
    server.socket_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        for path in (base, server.socket_dir):
            os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    _run(
        _as_server_user([
            str(bins / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        ]),
        what="initdb",
    )  # fmt: skip
    # Trust for loopback TCP and for the socket inside the state directory, nobody else.
    (server.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\n"
    )
    server.save()
    return server


def start(server: PostgresServer, timeout: float = START_TIMEOUT) -> None:
    """Start the server and return once it accepts connections to its database."""
    options = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.socket_dir} "
        "-c unix_socket_permissions=0700"
    )
    _run(
        _as_server_user([
            str(Path(server.bin_dir) / "pg_ctl"), "-D", str(server.data_dir),
            "-l", str(server.log_file), "-o", options, "--no-wait", "start",
        ]),
        what="pg_ctl start",
    )  # fmt: skip
    wait_ready(server, timeout)


def accepts_connections(server: PostgresServer, database: str = "postgres") -> bool:
    result = subprocess.run(
        [str(Path(server.bin_dir) / "pg_isready"), "-q", "-h", "127.0.0.1",
         "-p", str(server.port), "-U", SUPERUSER, "-d", database],
        capture_output=True, check=False,
    )  # fmt: skip
    return result.returncode == 0


def wait_ready(server: PostgresServer, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not accepts_connections(server):
        if time.monotonic() > deadline:
            tail = (
                server.log_file.read_text(errors="replace")[-3000:]
                if (server.log_file.exists())
                else "(no log)"
            )
            raise TimeoutError(f"PostgreSQL not ready after {timeout:.0f}s; log tail:\n{tail}")
        time.sleep(0.05)


def create_database(server: PostgresServer, name: str = DATABASE) -> None:
    _run(
        [str(Path(server.bin_dir) / "createdb"), "-h", "127.0.0.1", "-p", str(server.port),
         "-U", SUPERUSER, name],
        what=f"createdb {name}",
    )  # fmt: skip


def stop(server: PostgresServer) -> None:
    """Stop the server (fast: sessions are cut, committed data stays); a no-op if it is
    not running."""
    if not (server.data_dir / "postmaster.pid").exists():
        return
    _run(
        _as_server_user([
            str(Path(server.bin_dir) / "pg_ctl"), "-D", str(server.data_dir),
            "-m", "fast", "-w", "-t", str(int(START_TIMEOUT)), "stop",
        ]),
        what="pg_ctl stop",
    )  # fmt: skip


def running(server: PostgresServer) -> bool:
    return (server.data_dir / "postmaster.pid").exists() and accepts_connections(server)


def start_new(state_dir: Path) -> PostgresServer:
    """initdb, start, create the ``gpuyard`` database: a fresh server, ready."""
    server = init(state_dir)
    try:
        start(server)
        create_database(server)
    except BaseException:
        stop(server)
        raise
    return server
