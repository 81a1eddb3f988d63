"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd in a temporary folder.

Debian's ``slurm-wlm`` and ``munge`` packages provide the daemons (``.ci/run`` installs them when it runs
as root). Everything the cluster writes (munge key and socket, slurm.conf, state, spool, logs, the job
completion file) lives in one folder; the ports are free ones picked at start, so it runs beside any other
SLURM on the machine. The daemons are stopped by their own process ids (never by name)::

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["--wrap", "hostname"])
        state, exit_code = cluster.wait(job, timeout=60)

Jobs run as the user who started the daemons (``SlurmUser`` is that user: root on CI). Client commands
get ``SLURM_CONF`` through ``cluster.env()``. Finished jobs stay in ``scontrol show job`` for
``MinJobAge`` (300 s); their end state is also kept in ``<folder>/jobcomp.txt`` (``jobcomp/filetxt``),
since ``sacct`` needs slurmdbd.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel")
# states a job does not leave (Slurm's JOB_STATE_BASE names as scontrol prints them)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "OUT_OF_MEMORY"}


# character devices that stand in for GPU device files (slurmd only needs them to exist)
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class SlurmError(RuntimeError):
    """The cluster could not start, or a command or job did not behave; the message carries the logs."""


def find_binary(name: str) -> str | None:
    """``name`` on PATH or in the sbin folders, where Debian installs the daemons."""
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/local/sbin", "/sbin") if (p := Path(d) / name).is_file()), None)


def missing_binaries() -> list[str]:
    return [n for n in (*DAEMONS, *CLIENTS) if find_binary(n) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pids: Sequence[int]) -> list[int]:
    """The processes below ``pids`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def parse_fields(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of scontrol's and jobcomp/filetxt's output (values without spaces)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """One node named after this host (``hostname -s``, address 127.0.0.1), one default partition."""

    def __init__(self, folder: Path, cpus: int | None = None, gpus: int = 0, partition: str = "debug",
                 start_timeout: float = 60.0, extra_config: Sequence[str] = (), cred_expire: int | None = None):
        """``cpus``: the node's CPUs (default: the real count; more oversubscribes the machine, for jobs whose
        #SBATCH lines ask for many CPUs and cannot be overridden). ``gpus``: stand-in GPUs (gres/gpu backed
        by /dev/null-like files, at most 5) for jobs that ask for GPUs; SLURM sets CUDA_VISIBLE_DEVICES for
        them as usual, so a job on them must choose the CPU itself (e.g. --device cpu). ``cred_expire``: AuthInfo's
        credential lifetime in seconds, which is also how long a requeued job waits before it may start
        again (Slurm's default, None here: 120 s)."""
        if gpus > len(FAKE_GPU_FILES):
            raise ValueError(f"at most {len(FAKE_GPU_FILES)} stand-in GPUs")
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.gpus = gpus
        self.partition = partition
        self.start_timeout = start_timeout
        self.extra_config = list(extra_config)
        self.cred_expire = cred_expire
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.jobcomp = self.folder / "jobcomp.txt"
        self.munge_socket = self.folder / "munge" / "munge.socket"
        self._short_dir: str | None = None
        if len(str(self.munge_socket)) > 100:  # a Unix socket path has at most 107 bytes
            self._short_dir = tempfile.mkdtemp(prefix="munge-")
            self.munge_socket = Path(self._short_dir) / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = {name: self.folder / "log" / f"{name}.log" for name in DAEMONS}
        self.submitted: list[str] = []

    # ------------------------------------------------------------------------------------------ setup

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for client commands: this process's, with SLURM_CONF (and ``extra``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def write_config(self) -> None:
        f = self.folder
        for d in ("munge", "log", "state", "spool", "run"):
            (f / d).mkdir(parents=True, exist_ok=True)
            os.chmod(f / d, 0o711 if d == "munge" else 0o700)  # munged wants its socket's folder searchable
        os.chmod(f, 0o755)
        user = getpass.getuser()
        real_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        lines = [
            "ClusterName=cttest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}"
            + (f",cred_expire={self.cred_expire}" if self.cred_expire is not None else ""),
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # the node as written here, whatever slurmd detects (more CPUs than the machine has, or a
            # machine whose sockets/threads slurmd counts differently from os.cpu_count)
            "SlurmdParameters=config_overrides",
            *(["GresTypes=gpu"] if self.gpus else []),
            *self.extra_config,
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={real_memory}"
            + (f" Gres=gpu:{self.gpus}" if self.gpus else "") + " State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        if self.gpus:
            gres = ["AutoDetect=off", *(f"Name=gpu File={f}" for f in FAKE_GPU_FILES[:self.gpus])]
            (self.folder / "gres.conf").write_text("\n".join(gres) + "\n")

    def start(self) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_config()
        try:
            self._start_munge()
            self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [find_binary("slurmd"), "-D", "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        m = self.folder / "munge"
        self._spawn("munged", [find_binary("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={self.logs['munged']}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._poll(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.folder / "log" / f"{name}.stdout", "wb") as out:  # the daemon keeps its own copy
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _poll(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{what}: {', '.join(dead)} exited\n{self.daemon_logs()}")
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout:.0f} s\n{self.daemon_logs()}")

    def _wait_idle(self) -> None:
        def idle() -> bool:
            r = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%t"], check=False)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        self._poll(idle, self.start_timeout, f"node {self.node} not idle in sinfo")

    def daemon_logs(self, tail: int = 40) -> str:
        parts = []
        for name in ("slurmctld", "slurmd", "munged"):
            # the daemon's log file, or what it printed when it died before opening it
            for p in (self.logs[name], self.folder / "log" / f"{name}.stdout"):
                if p.exists() and p.stat().st_size:
                    lines = p.read_text(errors="replace").splitlines()[-tail:]
                    parts.append(f"--- {p.name} (last {len(lines)} lines)\n" + "\n".join(lines))
                    break
        return "\n".join(parts) or "(no daemon output)"

    def step_daemons(self) -> list[int]:
        """PIDs of this cluster's slurmstepd processes (they detach from slurmd; each has our SLURM_CONF)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if not (proc / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    continue
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile, or not ours to read
                continue
            if f"SLURM_CONF={self.conf}".encode() in env:
                pids.append(int(proc.name))
        return pids

    def stop(self) -> None:
        """Cancel the jobs this object submitted and wait for them to end, stop slurmd, slurmctld and munged
        by their PIDs, then end any of this cluster's slurmstepd left behind."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # every job of this private cluster, also those submitted by other means than sbatch() here
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=20)
                jobs = sorted(set(r.stdout.split())) if r.returncode == 0 else []
                if not jobs:
                    break
                self.run(["scancel", *jobs], check=False, timeout=20)
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        deadline = time.monotonic() + 10
        while (left := self.step_daemons()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in [*left, *descendants(left)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._short_dir:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- jobs

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = 60, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, ...) against this cluster."""
        cmd = [find_binary(argv[0]) or argv[0], *argv[1:]]
        r = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def sbatch(self, args: Sequence[str], env: Mapping[str, str] | None = None,
               cwd: Path | str | None = None) -> str:
        """Submit a job (``sbatch --parsable <args>``); returns its id (an array's job id)."""
        r = self.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd)
        job = r.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"sbatch printed no job id: {r.stdout!r} {r.stderr!r}")
        self.submitted.append(job)
        return job

    def job_info(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job`` fields, one dict per job record (an array job has one per task)."""
        r = self.run(["scontrol", "-o", "show", "job", job], check=False)
        if r.returncode != 0:
            return []
        return [parse_fields(line) for line in r.stdout.splitlines() if line.strip()]

    def jobcomp_records(self) -> list[dict[str, str]]:
        if not self.jobcomp.exists():
            return []
        return [parse_fields(line) for line in self.jobcomp.read_text().splitlines() if line.strip()]

    def wait(self, job: str, timeout: float = 120) -> tuple[str, str]:
        """Wait until job ``job`` (every task of an array) has ended: (state, exit code ``status:signal``).

        For an array, the worst task's state (not COMPLETED first) and its exit code. The state comes from
        ``scontrol show job`` while the job is there, else from the job completion file."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.job_info(job)
            if not records:
                records = [r for r in self.jobcomp_records()
                           if r.get("JobId") == job or r.get("ArrayJobId") == job]
            states = [r.get("JobState", "") for r in records]
            if records and all(s in FINAL_STATES for s in states):
                worst = next((r for r in records if r["JobState"] != "COMPLETED"), records[0])
                return worst["JobState"], worst.get("ExitCode", "")
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job} not finished within {timeout:.0f} s: {states}\n"
                                 f"{self.run(['squeue', '-a'], check=False).stdout}\n{self.daemon_logs()}")
            time.sleep(0.5)


def start_or_skip(folder: Path, **kwargs) -> SlurmCluster:
    """A started cluster, or pytest.skip with the reason (not installed, or the daemons did not start)."""
    import pytest

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)")
    try:
        return SlurmCluster(folder, **kwargs).start()
    except SlurmError as e:
        pytest.skip(f"SLURM did not start: {e}")
