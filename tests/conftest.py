import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's `postgresql` package) on a free port; skips when unavailable.

    The data folder lives in a fresh temporary directory; as root the server runs as the `postgres` user
    (PostgreSQL refuses root). CI installs the package (.ci/run)."""
    import glob
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql); the PostgreSQL tests need it")
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need the psycopg driver (pip install 'psycopg[binary]')")
    bindir = os.path.dirname(bins[-1])
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="gptforge-pg-")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    os.mkdir(data, 0o700)
    if run_as:
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(root, "server.log")
    try:
        subprocess.run(run_as + [f"{bindir}/initdb", "-D", data, "-U", "gptforge", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
                                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://gptforge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)
