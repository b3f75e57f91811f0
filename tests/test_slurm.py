"""A real one-node Slurm (munged, slurmctld, slurmd started here on 127.0.0.1) runs the project's sbatch
templates: training preempted twice (the USR1 warning to the batch shell, then SIGTERM to srun or
torchrun itself), requeued and resumed each time; a job submitted with --export=NONE that gets its
environment from the SETUP hook; a sweep array over srun --mpi=pmix followed by the dependent report
job, and a report job cancelled when its sweep fails."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY, free_port
from gist_dist.dist import slurm_port  # the port launchers/trainer_env.sh derives too

pytestmark = pytest.mark.slow
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
if missing:
    pytest.skip(
        f"Slurm/munge not installed ({', '.join(missing)} missing: apt slurm-wlm munge, or `make setup-test`)",
        allow_module_level=True,
    )
if os.geteuid() != 0:
    pytest.skip("slurmd must run as root to start job steps", allow_module_level=True)

SLURM_CONF = """\
ClusterName=gisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
MailProg=/bin/true
# No systemd or cgroup needed: processes tracked by parent pid, tasks not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """munged + slurmctld + slurmd in the foreground as our own children, so teardown can stop them."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.held: dict[str, int] = {}  # requeued job -> when it was first seen held
        # Clients see only our cluster: no Slurm variables from an outer job leak into the tests.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1")

    def start(self):
        d = self.root
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o755)  # munged insists the socket directory is reachable by all
        subprocess.run([sbin("mungekey"), "-c", "-k", d / "munge" / "munge.key"], check=True)
        self._spawn(
            [
                sbin("munged"),
                "-F",
                f"--socket={d}/munge/munge.sock",
                f"--key-file={d}/munge/munge.key",
                f"--pid-file={d}/munge/munged.pid",
                f"--log-file={d}/munge/munged.log",
                f"--seed-file={d}/munge/seed",
            ],
            "munged",
        )
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                d=d,
                cpus=os.cpu_count(),
                ctld_port=free_port(),
                slurmd_port=free_port(),
            )
        )
        self._wait_for(lambda: (d / "munge" / "munge.sock").exists(), "munged socket")
        self._spawn([sbin("slurmctld"), "-D", "-f", self.conf], "slurmctld")
        self._spawn([sbin("slurmd"), "-D", "-f", self.conf, "-N", "localhost"], "slurmd")
        self._wait_for(
            lambda: self.cmd(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle", "node localhost idle"
        )

    def _spawn(self, cmd, name):
        log = open(self.root / f"{name}.stdout", "w")
        self.procs.append(
            subprocess.Popen(
                [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        )

    def _wait_for(self, ready, what, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        raise AssertionError(f"Slurm test cluster: {what} not reached (exited: {dead or 'none'})\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        # Who holds ports of the job-port range: a job that fails at its rendezvous names the holder.
        if shutil.which("ss"):
            held = subprocess.run(
                ["ss", "-Htanp", "( sport >= :10000 and sport <= :29999 )"], capture_output=True, text=True
            ).stdout
            out.append("--- sockets on ports 10000-29999\n" + (held.strip() or "none"))
        return "\n".join(out)

    def cmd(self, args, check=True, env=None, cwd=ROOT):
        proc = subprocess.run(
            [str(a) for a in args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
        return proc

    def sbatch(self, args, env, cwd=ROOT) -> str:
        """Submit (by default from the checkout: the templates find slurm/ there); returns the job id."""
        return self.cmd(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.cmd(["scontrol", "-o", "show", "job", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def release_if_held(self, job_id: str, info: dict):
        """Slurm holds a requeued job for ~2 minutes before it may start again; this lets it start
        sooner, as a busy cluster eventually would. Not in the second it was requeued in, though:
        slurmd revokes the old run's job credential with a time stamp in whole seconds and refuses
        a new one issued in that same second ("Job credential revoked": the requeued run fails
        before its script starts, with nothing in its output). Slurm's hold exists for that."""
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = self.held.setdefault(job_id, int(time.time()))  # the requeue was no later
            if int(time.time()) > held_since:
                self.cmd(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        else:
            self.held.pop(job_id, None)

    def wait_for(self, job_id: str, ready, what: str, timeout=600) -> dict:
        """Poll the job (releasing it when requeued) until ready(info) holds; fail if it ends first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if ready(info):
                return info
            if info.get("JobState") in DONE:
                raise AssertionError(f"job {job_id} ended before {what}: {info}")
            self.release_if_held(job_id, info)
            time.sleep(0.3)
        raise AssertionError(f"job {job_id}: no {what} after {timeout}s: {self.job(job_id)}\n{self.logs()}")

    def wait_done(self, job_id: str, timeout=600) -> dict:
        """Wait until the job has ended."""
        return self.wait_for(job_id, lambda info: info.get("JobState") in DONE, "end", timeout)

    def stop(self):
        # Jobs first (their slurmstepd and tasks), then the daemons in reverse order of start.
        self.cmd(["scancel", "--full", "--user", "root"], check=False)
        deadline = time.time() + 30
        while time.time() < deadline and self.cmd(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp dir: munged wants every directory above its socket open to all (0755).
    root = Path(tempfile.mkdtemp(prefix="gist-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"step"') if path.exists() else 0


def read_metrics(out: Path):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "start"], [r for r in records if "step" in r]


def stops_logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"stop"' in line] if path.exists() else []


def torchrun_pid(job: str, restart: int) -> int | None:
    """The torchrun process (under its python) of this job's run number `restart`."""
    for proc in Path("/proc").iterdir():
        try:
            argv = [Path(a.decode()).name for a in (proc / "cmdline").read_bytes().split(b"\0")[:2]]
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if "torchrun" in argv and {f"SLURM_JOB_ID={job}".encode(), f"SLURM_RESTART_COUNT={restart}".encode()} <= env:
            return int(proc.name)
    return None


def sigterm_without_warning(slurm, job: str, launch: str) -> bool:
    """SIGTERM with no USR1 warning first, once the requeued run trains: to torchrun itself, or, on
    the srun path, to the ranks of the step (as Slurm terminates a step; SIGTERM to srun itself
    makes srun SIGKILL its tasks, which is why the templates ask for the warning)."""
    if launch == "torchrun":
        pid = torchrun_pid(job, restart=1)
        pid and os.kill(pid, signal.SIGTERM)
        return bool(pid)
    steps = slurm.cmd(["squeue", "-h", "-s", "-j", job, "-o", "%i"], check=False).stdout.split()
    step = next((s for s in steps if re.fullmatch(rf"{job}\.\d+", s)), None)
    return bool(step) and slurm.cmd(["scancel", "--signal=TERM", step], check=False).returncode == 0


# srun: one task per rank, each exits 75. torchrun: one task running torchrun with 2 ranks on the
# task's 2 CPUs (so 1 thread each), which exits 1 however its ranks ended; the trainer's "stop"
# record is what makes the job requeue. OMP_NUM_THREADS is left to the template to derive.
LAUNCHES = {
    "srun": (["--ntasks=2"], {}, "slurm", 120),
    "torchrun": (
        ["--ntasks=1", "--cpus-per-task=2"],
        {"LAUNCH": "torchrun", "NPROC_PER_NODE": "2", "SBATCH_SIGNAL": "B:USR1@300"},
        "torchrun",
        300,
    ),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_sbatch_training_is_preempted_requeued_and_resumes(slurm, tmp_path, launch):
    """Preempted twice: the --signal=B:USR1 warning to the batch shell, then SIGTERM without warning
    (to torchrun itself; to the ranks on the srun path); each time the ranks save, the job requeues
    on exit 75 or on the stop record and resumes, and every step runs exactly once."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    sbatch_args, env, launcher, lead = LAUNCHES[launch]
    job = slurm.sbatch(
        [
            *sbatch_args,
            f"--output={log}",
            ROOT / "slurm" / "train.sbatch",
            f"train.max_steps={steps}",
            "train.save_every=0",
        ],
        env={"CONFIG": TINY, "OUTPUT_DIR": str(out), "VENV": str(BIN.parent), "OMP_NUM_THREADS": "", **env},
    )
    # The preemption warning, as --signal=B:USR1@LEAD sends it: USR1 to the batch shell only.
    slurm.wait_for(job, lambda _: steps_logged(out) >= 2, "2 training steps", timeout=300)
    slurm.cmd(["scancel", "--signal=USR1", "--batch", job])
    # Resumed: two more steps, then SIGTERM, not to the batch shell.
    slurm.wait_for(
        job,
        lambda _: (
            stops_logged(out)
            and steps_logged(out) >= stops_logged(out)[0]["after_step"] + 2
            and sigterm_without_warning(slurm, job, launch)
        ),
        "SIGTERM to the resumed training",
    )
    info = slurm.wait_done(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-3000:]}\n{slurm.logs(60)}"
    assert info["Restarts"] == "2", text[-3000:]
    assert text.count("requeueing job") == 2 and text.count("resumed from") == 2
    starts, step_records = read_metrics(out)
    # Every step exactly once across the three allocations; the run began once (no fresh restart).
    assert [r["step"] for r in step_records] == list(range(1, steps + 1))
    assert len(starts) == 1 and starts[0]["launcher"] == launcher and starts[0]["world_size"] == 2
    stops = stops_logged(out)
    assert len(stops) == 2 and (out / "checkpoints" / stops[-1]["checkpoint"]).is_dir()
    assert (out / "final" / "model.safetensors").is_file()
    assert step_records[-1]["loss"] < step_records[0]["loss"]
    # Each run: its own port (job id and restart count; or, if that one was held, a free one), threads =
    # task CPUs / ranks, the lead time.
    ports = re.findall(r"\(restart \d\): master localhost:(\d+)(?: \(the job's port (\d+) is held)?", text)
    assert [held or port for port, held in ports] == [str(slurm_port(int(job), r)) for r in range(3)], text[-3000:]
    assert text.count("torch threads per rank [1, 1] (OMP_NUM_THREADS 1, 1)") == 3
    assert f"preemption warning {lead} s ahead (torchrun waits {lead - 10} s)" in text


def test_export_none_job_gets_its_environment_from_the_setup_hook(slurm, tmp_path):
    """A site's sbatch --export=NONE: nothing of the submitter's environment reaches the job; the
    gist-setup.sh hook in the submit directory sets it all up (as `module load` would), and the job
    steps see it. One srun task with 2 CPUs: srun is given them, and the rank runs 2 threads."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    site = {
        k: os.environ[k]
        for k in ("GIST_DIST_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "PYTHONPATH")
        if k in os.environ
    }
    site.update(REPO=str(ROOT), VENV=str(BIN.parent), CONFIG=TINY, OUTPUT_DIR=str(out))
    (tmp_path / "gist-setup.sh").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in site.items()) + 'echo "gist-setup.sh sourced"\n'
    )
    job = slurm.sbatch(
        [
            "--export=NONE",
            "--ntasks=1",
            "--cpus-per-task=2",
            f"--output={log}",
            ROOT / "slurm" / "train.sbatch",
            "train.max_steps=2",
            "train.eval_batches=1",
        ],
        env={"CONFIG": "/not/this/one.yaml", "OMP_NUM_THREADS": "7"},
        cwd=tmp_path,
    )
    info = slurm.wait_done(job)
    text = log.read_text() if log.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-3000:]}\n{slurm.logs(30)}"
    assert text.startswith("gist-setup.sh sourced")
    assert "srun --cpus-per-task=2" in text and "torch threads per rank [2] (OMP_NUM_THREADS 2)" in text
    _, step_records = read_metrics(out)
    assert len(step_records) == 2 and (out / "final" / "model.safetensors").is_file()


def test_job_whose_port_is_held_on_its_host_takes_a_free_one(slurm, tmp_path):
    """Something on the first host holds the port derived from the job id: the batch shell picks a
    free one instead, says so, and both ranks meet there (rather than failing at the rendezvous)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm.sbatch(
        [
            "--hold",
            "--ntasks=2",
            f"--output={log}",
            ROOT / "slurm" / "train.sbatch",
            "train.max_steps=1",
            "train.eval_batches=1",
        ],
        env={"CONFIG": TINY, "OUTPUT_DIR": str(out), "VENV": str(BIN.parent)},
    )
    port = slurm_port(int(job))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier job's TIME_WAIT is no hold
        holder.bind(("127.0.0.1", port))
        holder.listen()
        slurm.cmd(["scontrol", "release", job])
        info = slurm.wait_done(job)
    text = log.read_text() if log.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-3000:]}\n{slurm.logs(30)}"
    chosen = re.search(rf"master localhost:(\d+) \(the job's port {port} is held on this host\)", text)
    assert chosen and int(chosen[1]) != port, text[-3000:]
    starts, step_records = read_metrics(out)
    assert starts[0]["world_size"] == 2 and len(step_records) == 1


def test_sweep_array_over_srun_pmix_then_dependent_report(slurm, tmp_path):
    """One array task (gist, k=2) trains and evaluates on 2 PMIx ranks; the report job waits for it."""
    out = tmp_path / "sweep"
    env = {
        "CONFIG": TINY,
        "OUTPUT_DIR": str(out),
        "VENV": str(BIN.parent),
        "RUNS": "gist:2",
        "ARRAY_ARGS": f"--ntasks=2 --output={tmp_path}/array-%a.out",
        "REPORT_SBATCH_ARGS": f"--output={tmp_path}/report.out",
        # srun --mpi=pmix starts the ranks; discovery reads PMIX_RANK and asks mpi4py for the sizes.
        "SRUN_ARGS": "--mpi=pmix",
        "GIST_DIST_LAUNCHER": "pmix",
        "REPORT_ARGS": "--no-plots --peak-gflops 100",
    }
    proc = slurm.cmd(
        [ROOT / "slurm" / "submit_sweep.sh", "train.max_steps=3", "data.num_eval=4", "eval_max_new_tokens=4"], env=env
    )
    array_job, report_job = proc.stdout.split()
    assert slurm.job(report_job).get("Dependency", "").startswith("afterok:")
    slurm.wait_done(report_job)
    array_log = (tmp_path / "array-0.out").read_text()
    assert slurm.job(report_job)["JobState"] == "COMPLETED", array_log[-3000:] + (tmp_path / "report.out").read_text()
    run_dir = out / "gist-k2"
    starts, step_records = read_metrics(run_dir)
    assert starts[0]["launcher"] == "pmix" and starts[0]["world_size"] == 2 and starts[0]["num_gist"] == 2
    assert len(step_records) == 3
    assert json.loads((run_dir / "eval.json").read_text())["world_size"] == 2
    report = json.loads((out / "report.json").read_text())
    assert str(run_dir) in json.dumps(report)
    assert (out / "report.md").is_file()

    # eval.sbatch on the trained run handles the warning it asks for: the evaluation step is stopped
    # and the job requeued, which evaluates from the start again.
    (run_dir / "eval.json").unlink()
    log = tmp_path / "eval.out"
    job = slurm.sbatch(
        [
            "--ntasks=2",
            f"--output={log}",
            ROOT / "slurm" / "eval.sbatch",
            "mask=gist",
            "num_gist=2",
            "data.num_eval=4",
            "eval_max_new_tokens=4",
        ],
        env={**env, "OUTPUT_DIR": str(run_dir)},
    )
    slurm.wait_for(
        job,
        lambda _: f"{job}.0" in slurm.cmd(["squeue", "-h", "-s", "-j", job, "-o", "%i"]).stdout.split(),
        "the evaluation step",
    )
    slurm.cmd(["scancel", "--signal=USR1", "--batch", job])
    info = slurm.wait_done(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-3000:]}"
    assert "requeueing job" in text and json.loads((run_dir / "eval.json").read_text())["world_size"] == 2


def test_report_job_is_cancelled_when_a_sweep_task_fails(slurm, tmp_path):
    """--kill-on-invalid-dep=yes: the report's afterok can never be met, so it leaves the queue."""
    env = {
        "CONFIG": str(tmp_path / "missing.yaml"),
        "OUTPUT_DIR": str(tmp_path / "sweep"),
        "VENV": str(BIN.parent),
        "RUNS": "gist:1",
        "ARRAY_ARGS": f"--ntasks=1 --output={tmp_path}/array-%a.out",
        "REPORT_SBATCH_ARGS": f"--output={tmp_path}/report.out",
    }
    array_job, report_job = slurm.cmd([ROOT / "slurm" / "submit_sweep.sh"], env=env).stdout.split()
    info = slurm.wait_done(report_job, timeout=300)
    assert slurm.job(f"{array_job}_0")["JobState"] == "FAILED"
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
    assert not (tmp_path / "report.out").exists()
